"""Two workers for one silo: one active, one hot standby that takes over."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pika
import pytest
import tensorflow_federated as tff
from tensorflow.python.data.experimental.ops.testing import sleep as dataset_sleep

import flaap_mq
from flaap_mq.broker.declare import declare_blocking
from flaap_mq.local.workers import WorkerProcess, queue_consumers
from flaap_mq.protocol import topology

SLOW = tff.SequenceType(np.float32)


@tff.tensorflow.computation(SLOW)
def slow_sum(readings):
    # Each reading waits 0.3 s without using the CPU, so a round lasts long
    # enough to kill a worker in the middle of it.
    return readings.apply(dataset_sleep(300_000)).reduce(np.float32(0.0), lambda a, x: a + x)


@tff.federated_computation(tff.FederatedType(SLOW, tff.CLIENTS))
def slow_total(readings):
    return tff.federated_sum(tff.federated_map(slow_sum, readings))


def _events(worker: WorkerProcess, name: str) -> list[dict]:
    events = []
    for line in worker.log_text().splitlines():
        if line.startswith("{") and f'"event": "{name}"' in line:
            events.append(json.loads(line))
    return events


def _tasks_handled(worker: WorkerProcess) -> int:
    return len(_events(worker, "task"))


def _start_pair(broker_url: str, prefix: str, tmp_path) -> list[WorkerProcess]:
    pair = [
        WorkerProcess(broker_url, "s", prefix=prefix, log_path=tmp_path / f"worker-{i}.log")
        for i in range(2)
    ]
    # A quorum queue with a single active consumer counts only the active
    # one in its consumer count, so readiness is read from the workers' logs.
    queue = topology.Names(prefix).silo_queue("s")
    deadline = time.monotonic() + 120
    try:
        while not (
            all(_events(w, "worker_standby") for w in pair)
            and (queue_consumers(broker_url, queue) or 0) >= 1
        ):
            for worker in pair:
                assert worker.process.poll() is None, worker.log_text()[-2000:]
            assert time.monotonic() < deadline, "the two workers did not both start consuming"
            time.sleep(0.2)
    except BaseException:
        for worker in pair:
            worker.stop()
        raise
    return pair


@pytest.fixture
def pair(broker_url, prefix, tmp_path):
    workers = _start_pair(broker_url, prefix, tmp_path)
    yield workers
    for worker in workers:
        worker.stop()


def test_only_one_of_two_workers_receives_tasks(pair, broker_url, prefix):
    with (
        flaap_mq.create_execution_context(
            broker_url, ["s"], topology_prefix=prefix, task_timeout=60
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        for i in range(3):
            assert slow_total([[1.0], [float(i)]]) == pytest.approx(1.0 + i)
    handled = sorted(_tasks_handled(w) for w in pair)
    assert handled[0] == 0, f"both workers ran tasks of one silo: {handled}"
    assert handled[1] > 0
    active = next(w for w in pair if _tasks_handled(w) > 0)
    standby = next(w for w in pair if w is not active)
    assert _events(active, "worker_active")
    assert not _events(standby, "worker_active")
    assert _events(standby, "worker_standby")


def test_standby_takes_over_when_the_active_worker_dies_mid_round(pair, broker_url, prefix):
    data = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
    outcome: dict[str, object] = {}
    with flaap_mq.create_execution_context(
        broker_url, ["s"], topology_prefix=prefix, task_timeout=60
    ) as context:

        def run_round() -> None:
            with tff.framework.get_context_stack().install(context):
                try:
                    outcome["result"] = slow_total(data)
                except Exception as e:  # reported by the assertion below
                    outcome["error"] = e

        round_thread = threading.Thread(target=run_round)
        round_thread.start()
        deadline = time.monotonic() + 60
        while not any(_events(w, "worker_active") for w in pair):
            assert time.monotonic() < deadline, "no worker became active"
            time.sleep(0.1)
        active = next(w for w in pair if _events(w, "worker_active"))
        standby = next(w for w in pair if w is not active)
        # Wait until the round is really under way on the active worker.
        while _tasks_handled(active) < 3:
            assert time.monotonic() < deadline, "the round did not start"
            time.sleep(0.05)
        killed_at = time.time()
        active.kill()  # SIGKILL; its executor dies with it (PDEATHSIG)
        round_thread.join(120)
        assert not round_thread.is_alive(), "the round hung after the take-over"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"] == pytest.approx(45.0)
    took_over = _events(standby, "worker_active")
    assert took_over, "the standby never became active"
    takeover_s = _timestamp(took_over[0]) - killed_at
    print(f"\nstandby take-over: first task {takeover_s:.2f} s after the active worker was killed")
    # The standby answered requests for the dead worker's executors as
    # lost state (retryable), not by running them against its own.
    outcomes = [e.get("outcome") for e in _events(standby, "task")]
    assert "state_lost" in outcomes or outcomes.count("ok") >= 3


def _timestamp(event: dict) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_queue_without_single_active_consumer_is_refused_with_migration_advice(
    broker_url, prefix, tmp_path
):
    names = topology.Names(prefix)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    declare_blocking(channel, topology.shared_declarations(names))
    # As an older deployment would have declared it: no single active consumer.
    channel.queue_declare(
        names.silo_queue("old"),
        durable=True,
        arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": names.dead_letter_exchange},
    )
    connection.close()
    worker = WorkerProcess(broker_url, "old", prefix=prefix, log_path=tmp_path / "old.log")
    try:
        worker.process.wait(120)
    finally:
        worker.stop()
    assert worker.process.returncode == 1
    output = worker.log_text()
    assert "x-single-active-consumer" in output
    assert "docs/topology.md" in output
    assert "Traceback" not in output
