"""Redelivery without a crash: the worker's connection drops before its ack reaches the broker.

The broker closes the worker's connection (for real, `rabbitmqctl
close_connection`) while the worker runs a task. The broker requeues the
unacked task and redelivers it once the worker has reconnected; the worker
runs it once, answers the redelivered copy from its results cache (or from the
run still in progress), and the coordinator ignores the second reply.
"""

from __future__ import annotations

import time

import pytest

import flaap_mq
from flaap_mq.local.workers import WorkerFleet
from flaap_mq.protocol import topology
from tests.faults import comps, support
from tests.faults.rounds import BackgroundRound, wait_for_pending

pytestmark = pytest.mark.broker_node

# 24 readings of 250 ms per client: the task runs 6 s, well past the second or
# two `rabbitmqctl close_connection` takes to act (with 6 readings it could
# finish first, and there was nothing in flight to redeliver).
DATA = [[1.0] * 24, [2.0] * 24]
EXPECTED = 72.0


def test_redelivered_task_is_answered_from_the_cache_not_run_twice(
    private_node, node_prefix, tmp_path
):
    url = private_node.url
    names = topology.Names(node_prefix)
    fleet = WorkerFleet(url, ["a"], prefix=node_prefix, log_dir=tmp_path).start()
    executor_pids = set(fleet.workers["a"].executor_pids())
    try:
        context = flaap_mq.create_execution_context(
            url, ["a"], topology_prefix=node_prefix, task_timeout=60, max_attempts=1
        )
        round_ = BackgroundRound(context, comps.slow_total, DATA)
        wait_for_pending(context, "a", "Compute")
        time.sleep(0.3)  # the worker is running it now
        assert support.close_connections_of(private_node, fleet.workers["a"].pid) == 1
        # max_attempts=1: the answer must come from this very invocation.
        assert round_.wait(120) == pytest.approx(EXPECTED)
        sent = context.client.requests_sent
        context.close()
        support.wait_queues_empty(url, [names.silo_queue("a")])
    finally:
        support.assert_nothing_left(fleet, executor_pids)

    assert support.drain(url, names.silo_queue("a")) == []
    assert support.drain(url, names.dead_letter_queue) == []
    events = support.fleet_events(fleet)
    names_seen = [e["event"] for e in events]
    assert "broker_connection_lost" in names_seen and "broker_reconnected" in names_seen
    counted = support.tally(events)
    assert counted.duplicate_executions == 0, counted.duplicated_ids
    redelivered = [e for e in events if e.get("event") == "task" and e.get("redelivered")]
    assert redelivered, "the broker did not redeliver the task in flight"
    assert all(e["cached"] for e in redelivered if e["outcome"] == "ok"), redelivered
    assert len(counted.task_ids) == sent
    support.record(
        "redelivery_after_connection_drop",
        rounds=1,
        survived=1,
        tasks=len(counted.task_ids),
        tasks_lost=0,
        duplicate_executions=counted.duplicate_executions,
        redelivered=counted.redelivered,
        answered_from_cache=counted.cached_answers,
    )
