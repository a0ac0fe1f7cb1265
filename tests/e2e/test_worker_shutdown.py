"""Stopping a worker: SIGTERM and the first Ctrl-C drain, a second Ctrl-C stops at once.

Draining: the worker stops consuming, finishes what is in flight, has its
replies confirmed before it closes its link, and exits 0 (SIGTERM) or 130
(Ctrl-C). The second Ctrl-C returns the tasks in flight to the silo queue for
the next worker and stops the executor. Ctrl-C is SIGINT to the worker's
whole process group, as a terminal sends it; the executor, in a session of
its own, is not in that group.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.python.data.experimental.ops.testing import sleep as dataset_sleep

import flaap_mq
from flaap_mq.executor.service import wait_until_gone
from flaap_mq.local.workers import WorkerProcess
from tests.e2e.test_standby import SLOW, _events, _timestamp, slow_total


def test_sigterm_finishes_the_task_in_flight_then_exits_0(broker_url, prefix, tmp_path):
    worker = WorkerProcess(broker_url, "s", prefix=prefix, log_path=tmp_path / "w.log")
    try:
        deadline = time.monotonic() + 120
        while not _events(worker, "worker_standby"):
            assert worker.process.poll() is None, worker.log_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with flaap_mq.create_execution_context(
            broker_url, ["s"], topology_prefix=prefix, task_timeout=30, max_attempts=1
        ) as context:
            errors: list[BaseException] = []

            def run_round() -> None:
                with tff.framework.get_context_stack().install(context):
                    try:
                        slow_total([[1.0] * 6, [2.0] * 6])  # 6 x 0.3 s per client
                    except BaseException as e:
                        errors.append(e)  # expected: nobody serves the rest

            thread = threading.Thread(target=run_round, daemon=True)
            thread.start()
            # GetExecutor and CreateValues are quick; the slow CreateCall
            # comes next: SIGTERM while it runs.
            while len(_events(worker, "task")) < 3:
                assert time.monotonic() < deadline, "the round did not start"
                time.sleep(0.05)
            time.sleep(0.3)
            signalled_at = time.time()
            code = worker.stop(grace_s=60)
            thread.join(60)
    finally:
        worker.stop()
    assert code == 0, worker.log_text()[-3000:]
    stopped = _events(worker, "worker_stopped")
    assert stopped, "the worker did not log its orderly stop"
    tasks = _events(worker, "task")
    assert all(t["outcome"] != "error" for t in tasks), tasks
    assert "drain_timed_out" not in worker.log_text()
    # Replies are confirmed before the link closes (this used to log one).
    assert "reply_not_confirmed" not in worker.log_text()
    # Every task it took was answered before it left, including the one
    # running when the signal came.
    assert stopped[0]["tasks_handled"] == len(tasks)
    finished_after_signal = [t for t in tasks if _timestamp(t) > signalled_at]
    assert finished_after_signal, "no task was in flight at SIGTERM: the test did not test it"
    assert all(t["outcome"] == "ok" for t in finished_after_signal)


def _ready_worker(broker_url: str, prefix: str, log_path: Path) -> WorkerProcess:
    """A worker in a process group of its own, as if started from a terminal, once it consumes."""
    worker = WorkerProcess(
        broker_url, "s", prefix=prefix, log_path=log_path, own_process_group=True
    )
    deadline = time.monotonic() + 120
    try:
        while not _events(worker, "worker_standby"):
            assert worker.process.poll() is None, worker.log_text()[-2000:]
            assert time.monotonic() < deadline, "the worker did not start consuming"
            time.sleep(0.2)
    except BaseException:
        worker.stop()
        raise
    return worker


def _start_round(context: object, data: list[list[float]], outcome: dict) -> threading.Thread:
    """Runs `slow_total(data)` on `context` in a thread; its result or error lands in `outcome`."""

    def run() -> None:
        with tff.framework.get_context_stack().install(context):
            try:
                outcome["result"] = slow_total(data)
            except Exception as e:  # reported by the test's assertions
                outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for_slow_call(worker: WorkerProcess, after: str) -> None:
    """Returns once the round's slow call is running on `worker`.

    The coordinator awaits GetExecutor, then sends a chain of one-way
    Create* tasks and the Compute that reads its result all at once; the
    chain runs slow_sum's readings (in the CreateCall or the Compute, as TFF
    decides) while the Compute waits. So once the worker has run the quick
    task `after` of that chain, its Compute is delivered and running, for
    seconds.
    """
    deadline = time.monotonic() + 120
    while not any(t.get("kind") == after for t in _events(worker, "task")):
        assert worker.process.poll() is None, worker.log_text()[-3000:]
        assert time.monotonic() < deadline, "the round did not start"
        time.sleep(0.05)
    time.sleep(0.5)
    slow = [t for t in _events(worker, "task") if t["duration_ms"] > 1000]
    assert not slow, f"the slow call finished before the signal: the test did not test it: {slow}"


def _wait_for_event(worker: WorkerProcess, name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not _events(worker, name):
        assert worker.process.poll() is None, worker.log_text()[-3000:]
        assert time.monotonic() < deadline, f"no {name} in the worker's log"
        time.sleep(0.05)


# 64 MB per client: the broker takes a while to confirm a reply this large, as
# it writes it to disk, which is what a worker closing its link before the
# confirms raced against (the race shows with this size, not with a float).
BIG = 16_000_000


@tff.tensorflow.computation(SLOW)
def slow_big(readings: tf.data.Dataset) -> tf.Tensor:
    """BIG copies of the sum of `readings`, each reading waiting 0.3 s."""
    total = readings.apply(dataset_sleep(300_000)).reduce(np.float32(0.0), lambda a, x: a + x)
    return tf.fill([BIG], total)


@tff.federated_computation(tff.FederatedType(SLOW, tff.CLIENTS))
def slow_big_per_client(readings: object) -> object:
    return tff.federated_map(slow_big, readings)


@pytest.mark.parametrize(
    ("ctrl_c", "exit_code", "again"),
    [
        (True, 130, "Ctrl-C again to stop now"),
        (False, 0, "SIGINT or SIGTERM again to stop now"),  # SIGTERM, as systemd stops it
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_a_drain_mid_compute_answers_has_the_reply_confirmed_and_exits(
    broker_url, prefix, tmp_path, ctrl_c, exit_code, again
):
    outcome: dict[str, object] = {}
    worker = _ready_worker(broker_url, prefix, tmp_path / "w.log")
    try:
        with flaap_mq.create_execution_context(
            broker_url, ["s"], topology_prefix=prefix, task_timeout=60, max_attempts=1
        ) as context:

            def run_round() -> None:
                with tff.framework.get_context_stack().install(context):
                    try:
                        # One client, 10 readings x 0.3 s in its Compute.
                        outcome["result"] = slow_big_per_client([[1.0] * 10])
                    except Exception as e:  # reported by the assertions below
                        outcome["error"] = e

            thread = threading.Thread(target=run_round, daemon=True)
            thread.start()
            # One part, run whole on the silo: the computation's and the
            # client's CreateValue, a quick CreateCall, then the slow Compute.
            _wait_for_slow_call(worker, after="CreateCall")
            signalled_at = time.time()
            if ctrl_c:
                worker.interrupt()  # SIGINT to the worker's whole process group
            else:
                worker.process.send_signal(signal.SIGTERM)
            code = worker.process.wait(60)
            thread.join(60)
            assert not thread.is_alive(), "the round hung after the drain"
    finally:
        worker.stop()
    log_text = worker.log_text()
    assert code == exit_code, log_text[-3000:]
    assert "error" not in outcome, outcome.get("error")
    [result] = outcome["result"]
    assert result.shape == (BIG,)
    assert np.all(result == 10.0)
    draining = _events(worker, "worker_draining")
    assert len(draining) == 1, log_text[-3000:]
    assert re.fullmatch(rf"draining \d+ tasks?; {again}", draining[0]["detail"])
    assert draining[0]["in_flight"] >= 1
    slow = [t for t in _events(worker, "task") if t["duration_ms"] > 1000]
    assert [(t["kind"], t["outcome"]) for t in slow] == [("Compute", "ok")], slow
    assert _timestamp(slow[0]) > signalled_at
    # Its reply was confirmed (and the task acked) before the link closed.
    assert "reply_not_confirmed" not in log_text
    assert "drain_timed_out" not in log_text
    assert "worker_stopping_now" not in log_text
    assert _events(worker, "worker_stopped")


def test_second_ctrl_c_stops_at_once_and_the_task_goes_to_the_next_worker(
    broker_url, prefix, tmp_path
):
    data = [[1.0] * 30]  # one client, 30 x 0.3 s = 9 s in its Compute
    outcome: dict[str, object] = {}
    first = _ready_worker(broker_url, prefix, tmp_path / "first.log")
    second: WorkerProcess | None = None
    try:
        with flaap_mq.create_execution_context(
            broker_url, ["s"], topology_prefix=prefix, task_timeout=180
        ) as context:
            thread = _start_round(context, data, outcome)
            _wait_for_slow_call(first, after="CreateValue")
            executors = first.executor_pids()
            first.interrupt()
            _wait_for_event(first, "worker_draining")
            second_signal_at = time.monotonic()
            first.interrupt()
            code = first.process.wait(30)
            stopped_in_s = time.monotonic() - second_signal_at
            # The task went back to the silo queue: a worker started now answers it.
            second = _ready_worker(broker_url, prefix, tmp_path / "second.log")
            thread.join(180)
            assert not thread.is_alive(), "the round hung after the second worker started"
    finally:
        first.stop()
        if second is not None:
            second.stop()
    first_log = first.log_text()
    assert code == 130, first_log[-3000:]
    assert stopped_in_s < 8, f"the second Ctrl-C took {stopped_in_s:.1f} s to stop the worker"
    assert executors, "no executor found under the first worker"
    assert all(wait_until_gone(pid, 10) for pid in executors)
    assert _events(first, "executor_service_stopped"), "the executor was not stopped in order"
    assert _events(first, "worker_stopping_now"), first_log[-3000:]
    assert _events(first, "worker_stopped"), first_log[-3000:]
    assert not any(
        t.get("kind") == "Compute" and t["outcome"] == "ok" for t in _events(first, "task")
    ), "the Compute finished on the first worker: it was not stopped at once"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"] == pytest.approx(30.0)
    # The second worker got the Compute again (redelivered) and answered it: by
    # running it, or with "state lost", after which TFF ran the call again there.
    second_tasks = _events(second, "task")
    redelivered = [t for t in second_tasks if t.get("redelivered")]
    assert any(t.get("kind") == "Compute" for t in redelivered), second_tasks
    assert any(t.get("kind") == "Compute" and t["outcome"] == "ok" for t in second_tasks)
