"""Silos that drop out and come back (issue 12): `min_silos`, `silo_grace`, the soundness rule.

Real RabbitMQ, real workers, real TFF. A small `silo_grace` (3 s) keeps each
test short; the bounds on durations are no-hang checks, not benchmarks.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.python.data.experimental.ops.testing import sleep as dataset_sleep

import flaap_mq
from flaap_mq.examples import temperature_average
from flaap_mq.executor import wait_until_gone
from flaap_mq.local.workers import WorkerProcess
from tests.faults import support

GRACE_S = 3.0


@tff.tensorflow.computation
def one() -> tf.Tensor:
    return tf.constant(1.0, tf.float32)


@tff.federated_computation
def count_clients():
    """Data made on the silos, a SERVER result: a silo may be dropped."""
    return tff.federated_sum(tff.federated_eval(one, tff.CLIENTS))


@tff.tensorflow.computation
def slow_one() -> tf.Tensor:
    # 12 elements of 0.5 s each, without using the CPU: a 6 s invocation.
    data = tf.data.Dataset.from_tensors(np.float32(1.0)).repeat(12)
    return data.apply(dataset_sleep(500_000)).reduce(np.float32(0.0), lambda a, x: a + x) / 12.0


@tff.federated_computation
def slow_count_clients():
    return tff.federated_sum(tff.federated_eval(slow_one, tff.CLIENTS))


@tff.federated_computation
def per_client_ones():
    """A CLIENTS-placed result: it cannot do without a silo."""
    return tff.federated_eval(one, tff.CLIENTS)


CLIENTS = {"a": 1, "b": 2, "c": 4}


def _values_made(worker: WorkerProcess) -> int:
    """CreateValue tasks the worker has finished (its CreateCall runs the work, and
    is logged only once done)."""
    events = support.read_events([worker.log_path])
    return sum(1 for e in events if e.get("event") == "task" and e.get("kind") == "CreateValue")


def _context(broker_url: str, prefix: str, silos: list[str], **options: object):
    return flaap_mq.create_execution_context(
        broker_url,
        silos,
        topology_prefix=prefix,
        clients_per_silo={s: CLIENTS.get(s, 1) for s in silos},
        silo_grace=GRACE_S,
        task_timeout=120,
        **options,
    )


def _run(context, comp, *args):
    with tff.framework.get_context_stack().install(context):
        return comp(*args)


def test_by_default_a_silo_without_a_worker_fails_the_invocation_after_silo_grace(
    broker_url: str, prefix: str, workers
) -> None:
    fleet = workers(["a"])
    with _context(broker_url, prefix, ["a", "ghost"]) as context:
        started = time.monotonic()
        with pytest.raises(flaap_mq.SiloLostError) as raised:
            _run(context, count_clients)
        took = time.monotonic() - started
        print(f"\n{raised.value}\nfailed after {took:.1f} s")
        # Not the task timeout (120 s): silo_grace plus a few probes.
        assert took < GRACE_S + 20
        assert raised.value.silo_id == "ghost"
        assert raised.value.reason == f"no-consumer-{GRACE_S:g}s"
        assert f"no worker has consumed {prefix}.silo.ghost for 3 s" in str(raised.value)
        assert not isinstance(raised.value, tff.framework.RetryableError)
        # Known lost now: the next invocation fails at once, naming it.
        started = time.monotonic()
        with pytest.raises(flaap_mq.NotEnoughSilosError) as again:
            _run(context, count_clients)
        assert time.monotonic() - started < 5
        assert again.value.lost == {"ghost": f"no-consumer-{GRACE_S:g}s"}
        assert "every silo must answer" in str(again.value)
        assert "min_silos" in str(again.value)
    support.assert_nothing_left(fleet)


def test_with_min_silos_an_invocation_completes_over_the_silos_that_answer(
    broker_url: str, prefix: str, workers
) -> None:
    """A silo that never starts: invocations run without it from the first."""
    fleet = workers(["a", "b"])
    with _context(broker_url, prefix, ["a", "b", "c"], min_silos=2) as context:
        started = time.monotonic()
        # As if silo c (4 clients) held none: 1 + 2.
        assert _run(context, count_clients) == pytest.approx(3.0)
        assert time.monotonic() - started < GRACE_S + 20
        assert context.last_participation.silos == ("a", "b")
        assert context.last_participation.dropped == {"c": "no-consumer"}
        assert context.last_participation.dropped_field == "c:no-consumer"
        # min_silos not met: a clear error at once, no hang.
        fleet.workers["b"].stop()
        started = time.monotonic()
        with pytest.raises(flaap_mq.NotEnoughSilosError) as raised:
            _run(context, count_clients)
        print(f"\n{raised.value}")
        assert time.monotonic() - started < GRACE_S + 20
        assert set(raised.value.lost) == {"b", "c"}
        assert raised.value.answered == ["a"]
        assert "fewer than min_silos=2" in str(raised.value)
        assert context.last_participation is None
        # c's worker comes (and b's comes back): both take part from the next invocation.
        fleet.start_worker("b", wait=False)
        fleet.start_worker("c", wait=False)
        fleet.wait_consuming(["b", "c"])
        assert _run(context, count_clients) == pytest.approx(7.0)
        assert context.last_participation.silos == ("a", "b", "c")
        assert context.last_participation.dropped == {}
    support.wait_queues_empty(broker_url, [f"{prefix}.silo.{s}" for s in "abc"])
    support.assert_nothing_left(fleet)


def test_a_worker_killed_mid_invocation_is_dropped_after_silo_grace_and_rejoins(
    broker_url: str, prefix: str, workers
) -> None:
    fleet = workers(["a", "c"])
    with _context(broker_url, prefix, ["a", "c"], min_silos=1) as context:
        assert _run(context, count_clients) == pytest.approx(5.0)  # both: warm
        executors = fleet.workers["c"].executor_pids()
        worker_c = fleet.workers["c"]
        made_before = _values_made(worker_c)

        def kill_once_computing() -> None:
            # c has made the computation's value: the call that runs it (6 s)
            # comes next. Kill it now.
            support.wait_until(lambda: _values_made(worker_c) > made_before, 60, "silo c computing")
            worker_c.kill()
            killed.append(time.monotonic())

        killed: list[float] = []
        killer = threading.Thread(target=kill_once_computing)
        killer.start()
        try:
            result = _run(context, slow_count_clients)
        finally:
            killer.join()
        took = time.monotonic() - killed[0]
        print(f"\nc killed mid-invocation; it completed without c {took:.1f} s later")
        assert result == pytest.approx(1.0)
        assert context.last_participation.silos == ("a",)
        assert context.last_participation.dropped == {"c": f"no-consumer-{GRACE_S:g}s"}
        assert took < GRACE_S + 20
        for pid in executors:
            assert wait_until_gone(pid, 15)
        # Not restarted: the next invocation runs without it at once.
        assert _run(context, count_clients) == pytest.approx(1.0)
        assert context.last_participation.dropped == {"c": "no-consumer"}
        # Restarted: it starts clean and takes part again.
        fleet.start_worker("c")
        assert _run(context, count_clients) == pytest.approx(5.0)
        assert context.last_participation.silos == ("a", "c")
    support.wait_queues_empty(broker_url, [f"{prefix}.silo.{s}" for s in "ac"])
    support.assert_nothing_left(fleet)


def test_a_computation_with_a_per_client_part_is_not_completed_without_a_silo(
    broker_url: str, prefix: str, workers
) -> None:
    fleet = workers(["a"])
    with _context(broker_url, prefix, ["a", "ghost"], min_silos=1) as context:
        # The rule's other side first: an aggregate over silo-held data may drop it.
        assert _run(context, count_clients) == pytest.approx(1.0)
        # A CLIENTS-placed result: a clear error, not a shorter list.
        with pytest.raises(flaap_mq.NotEnoughSilosError) as raised:
            _run(context, per_client_ones)
        print(f"\n{raised.value}")
        assert raised.value.lost == {"ghost": f"no-consumer-{GRACE_S:g}s"}
        assert "per-client (CLIENTS-placed) part" in str(raised.value)
        assert "its result" in str(raised.value)
        # CLIENTS-placed values passed in: not silently left out either.
        with pytest.raises(flaap_mq.NotEnoughSilosError) as passed:
            _run(context, temperature_average, [[1.0], [2.0]])
        assert "its argument has a per-client" in str(passed.value)
    support.assert_nothing_left(fleet)


def test_a_silo_that_misses_the_invocation_deadline_is_lost_to_it(
    broker_url: str, prefix: str, workers
) -> None:
    fleet = workers(["a"])
    with _context(broker_url, prefix, ["a"], invocation_timeout=2.0) as context:
        started = time.monotonic()
        with pytest.raises(flaap_mq.SiloLostError) as raised:
            _run(context, slow_count_clients)  # 6 s of client work
        took = time.monotonic() - started
        print(f"\n{raised.value}\nfailed after {took:.1f} s")
        assert raised.value.silo_id == "a"
        assert raised.value.reason == "deadline-2s"
        assert "invocation's deadline (2 s)" in str(raised.value)
        assert took < 2 + 10  # the deadline, not the 6 s of work nor the task timeout
    # The silo itself is fine: the next coordinator runs on it (no deadline to race
    # against the 6 s call still finishing there).
    with _context(broker_url, prefix, ["a"]) as context:
        assert _run(context, count_clients) == pytest.approx(1.0)
        assert context.last_participation.silos == ("a",)
    support.assert_nothing_left(fleet)
