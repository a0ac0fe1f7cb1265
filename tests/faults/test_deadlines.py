"""Deadlines: stale tasks are dead-lettered `expired`, a dead coordinator clogs nothing.

* A silo that comes back after the coordinator gave up finds its tasks
  dead-lettered with reason `expired` (by the broker, from the per-message
  expiration; or by the worker, from the deadline in the envelope), never run.
* A coordinator SIGKILLed mid-round: its reply queue expires (`x-expires`),
  the worker's reply to it is unroutable, and the worker logs that, acks the
  task and goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import placements

import flaap_mq
from flaap_mq.protocol import topology
from tests.conftest import list_queues
from tests.faults import comps, support

REPO = Path(__file__).resolve().parents[2]


def _install(context):
    return tff.framework.get_context_stack().install(context)


def test_stale_tasks_are_dead_lettered_expired_not_run(workers, broker_url, prefix):
    names = topology.Names(prefix)
    context = flaap_mq.create_execution_context(
        broker_url, ["late"], topology_prefix=prefix, task_timeout=1.5, max_attempts=1
    )
    try:
        with pytest.raises(flaap_mq.SiloTimeoutError), _install(context):
            comps.mean([1.0, 2.0])
        request = executor_pb2.GetExecutorRequest(
            cardinalities=value_serialization.serialize_cardinalities({placements.CLIENTS: 1})
        )
        for _ in range(3):
            with pytest.raises(flaap_mq.SiloTimeoutError):
                asyncio.run(context.client.ask("late", request, timeout_s=1.5))
        sent = context.client.requests_sent
    finally:
        context.close()
    assert sent == 4
    # The silo comes back after the coordinator gave up on all of them.
    fleet = workers(["late"])
    time.sleep(3)
    support.wait_queues_empty(broker_url, [names.silo_queue("late")])
    support.assert_nothing_left(fleet, fleet.workers["late"].executor_pids())

    dead = support.drain(broker_url, names.dead_letter_queue)
    reasons = [support.dead_letter_reason(p) for p, _ in dead]
    assert len(dead) == sent, reasons
    assert all(r and r.startswith("expired") for r in reasons), reasons
    assert support.drain(broker_url, names.silo_queue("late")) == []
    counted = support.tally(support.fleet_events(fleet))
    assert sum(counted.executions.values()) == 0, counted.outcomes
    support.record(
        "stale_tasks_expired",
        tasks=sent,
        dead_lettered_expired=len(dead),
        executed=0,
        tasks_lost=0,
        duplicate_executions=0,
    )


_COORDINATOR = """
import sys
sys.path.insert(0, {repo!r})
from flaap_mq import logs
logs.quiet_tensorflow()
logs.configure("console", "warning")
import tensorflow_federated as tff
import flaap_mq
from tests.faults import comps
# The same reply queue as always, expiring after {expires_s} s unused
# instead of the default 120 s, so the test need not wait two minutes.
context = flaap_mq.create_execution_context(
    {url!r}, ["a"], topology_prefix={prefix!r}, task_timeout=120, max_attempts=1,
    reply_queue_expires={expires_s},
)
print("JOB", context.job_id, flush=True)
with tff.framework.get_context_stack().install(context):
    comps.slow_total([[1.0] * {readings}, [2.0] * {readings}])
print("DONE", flush=True)
"""


def test_dead_coordinator_reply_queue_expires_and_worker_moves_on(
    workers, broker_url, prefix, tmp_path
):
    names = topology.Names(prefix)
    fleet = workers(["a"])
    worker = fleet.workers["a"]
    # The silo must still be computing when the reply queue is gone: it expires
    # 3 s after its coordinator died, noticed on a quorum queue's 5 s tick, so
    # up to about 9 s after the kill; each client's 64 readings take 16 s (with
    # 24, 6 s, a reply sometimes reached the queue before it expired).
    script = _COORDINATOR.format(
        repo=str(REPO), expires_s=3, url=broker_url, prefix=prefix, readings=64
    )
    coordinator = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "coordinator.log", "wb"),  # noqa: SIM115
        text=True,
        env={**os.environ},
    )
    try:
        job_id = coordinator.stdout.readline().split()[1]

        def calls_in_flight() -> bool:
            kinds = [
                e.get("kind")
                for e in support.read_events([worker.log_path])
                if e.get("event") == "task" and e.get("job") == job_id
            ]
            return kinds.count("CreateValue") >= 2  # the slow CreateCall comes next

        support.wait_until(calls_in_flight, 120, "the coordinator's round reached the silo")
        time.sleep(1.0)
        coordinator.send_signal(signal.SIGKILL)  # the coordinator dies mid-round
        coordinator.wait(10)
        reply_queue = names.reply_queue(job_id)
        # Asked with rabbitmqctl: a passive queue.declare counts as a use of
        # the queue and would keep it from expiring.
        assert reply_queue in list_queues(prefix)
        killed_at = time.monotonic()
        # A quorum queue checks its expiry on its periodic tick (5 s).
        support.wait_until(
            lambda: reply_queue not in list_queues(prefix), 30, "reply queue expired"
        )
        expired_after = time.monotonic() - killed_at

        def unroutable_logged() -> bool:
            return any(
                e.get("event") == "reply_unroutable" for e in support.read_events([worker.log_path])
            )

        support.wait_until(unroutable_logged, 60, "the worker logged the unroutable reply")
        support.wait_queues_empty(broker_url, [names.silo_queue("a")])
        assert worker.process.poll() is None, "the worker died"
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait(10)
        coordinator.stdout.close()
    executors = worker.executor_pids()
    support.assert_nothing_left(fleet, executors)
    assert support.drain(broker_url, names.silo_queue("a")) == []
    assert support.drain(broker_url, names.dead_letter_queue) == []
    assert names.reply_queue(job_id) not in list_queues(prefix)
    events = support.read_events([worker.log_path])
    unroutable = [e for e in events if e.get("event") == "reply_unroutable"]
    counted = support.tally(events)
    assert counted.duplicate_executions == 0
    support.record(
        "dead_coordinator",
        reply_queue_expired=True,
        reply_queue_expired_after_s=round(expired_after, 1),
        unroutable_replies_logged=len(unroutable),
        tasks=len(counted.task_ids),
        tasks_lost=0,
        duplicate_executions=0,
        detail=json.dumps(unroutable[0].get("reason", ""))[:120],
    )
