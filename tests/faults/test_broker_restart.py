"""The broker restarted mid-round (a private node, stopped and started on its data).

Coordinator and worker reconnect with bounded backoff, declare the topology
again, and publish again whatever was not confirmed; persistent tasks in the
durable quorum queues survive. The round completes, or TFF retries it; it
never hangs.
"""

from __future__ import annotations

import random
import time

import pytest

import flaap_mq
from flaap_mq.local.private_node import PrivateBrokerNode
from flaap_mq.local.workers import WorkerFleet
from flaap_mq.protocol import topology
from tests.faults import comps, support
from tests.faults.rounds import BackgroundRound, wait_for_pending

pytestmark = pytest.mark.broker_node

SILOS = ["a", "b"]
DATA = [[float(i + 1)] * 6 for i in range(4)]
EXPECTED = sum(sum(d) for d in DATA)


def _restart_rounds(
    node: PrivateBrokerNode, prefix: str, log_dir, restarts: int, rng: random.Random | None
) -> dict:
    names = topology.Names(prefix)
    fleet = WorkerFleet(node.url, SILOS, prefix=prefix, log_dir=log_dir).start()
    executor_pids = {p for w in fleet.workers.values() for p in w.executor_pids()}
    survived, restart_seconds = 0, []
    try:
        context = flaap_mq.create_execution_context(
            node.url, SILOS, topology_prefix=prefix, task_timeout=90, max_attempts=4
        )
        for _ in range(restarts):
            round_ = BackgroundRound(context, comps.slow_total, DATA)
            if rng is None:
                wait_for_pending(context, "a", "Compute")
                time.sleep(0.3)
            else:
                time.sleep(rng.uniform(0.0, 3.0))
            began = time.monotonic()
            node.restart()
            restart_seconds.append(round(time.monotonic() - began, 1))
            assert round_.wait(300) == pytest.approx(EXPECTED)
            survived += 1
        # And a round on the same context with the broker left alone.
        assert BackgroundRound(context, comps.slow_total, DATA).wait(120) == pytest.approx(EXPECTED)
        sent = context.client.requests_sent
        context.close()
        support.wait_queues_empty(node.url, [names.silo_queue(s) for s in SILOS])
    finally:
        support.assert_nothing_left(fleet, executor_pids)

    for silo in SILOS:
        assert support.drain(node.url, names.silo_queue(silo)) == [], silo
    assert support.drain(node.url, names.dead_letter_queue) == []
    events = support.fleet_events(fleet)
    for silo, worker in fleet.workers.items():
        seen = support.read_events([worker.log_path])
        assert any(e["event"] == "broker_reconnected" for e in seen), silo
    counted = support.tally(events)
    assert counted.duplicate_executions == 0, counted.duplicated_ids
    assert len(counted.task_ids) == sent, (len(counted.task_ids), sent)
    return {
        "rounds": restarts + 1,
        "survived": survived + 1,
        "restarts": restarts,
        "restart_seconds": restart_seconds,
        "tasks": len(counted.task_ids),
        "tasks_lost": 0,
        "duplicate_executions": counted.duplicate_executions,
        "redelivered": counted.redelivered,
        "answered_from_cache": counted.cached_answers,
    }


def test_broker_restart_mid_round(private_node, node_prefix, tmp_path):
    figures = _restart_rounds(private_node, node_prefix, tmp_path, restarts=1, rng=None)
    support.record("broker_restart", **figures)


@pytest.mark.faults
def test_broker_restarted_three_times(node_prefix, tmp_path):
    with PrivateBrokerNode() as node:
        figures = _restart_rounds(node, node_prefix, tmp_path, 3, random.Random(3))
    assert not node.os_processes()
    support.record("broker_restart_x3", **figures)
