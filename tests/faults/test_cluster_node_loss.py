"""A three-node RabbitMQ cluster loses the node leading a silo's quorum queue mid-round.

Three private nodes on this machine, clustered with `rabbitmqctl
join_cluster`; silo queues are quorum queues with a member on every node.
The workers' URL lists name all three nodes, so a worker whose node goes away
reconnects to another, and the queue elects a new leader among the two
left. The round is not lost.
"""

from __future__ import annotations

import contextlib
import time

import pytest

import flaap_mq
from flaap_mq.protocol import topology
from flaap_mq.testing.broker import PrivateBrokerNode
from flaap_mq.testing.workers import WorkerFleet
from tests.faults import comps, support
from tests.faults.rounds import BackgroundRound, wait_for_pending

pytestmark = [pytest.mark.faults, pytest.mark.broker_node]

SILOS = ["a", "b"]
DATA = [[float(i + 1)] * 6 for i in range(4)]
EXPECTED = sum(sum(d) for d in DATA)


def _leader(node: PrivateBrokerNode, queue: str) -> str:
    for line in node.rabbitmqctl("list_queues", "-q", "name", "leader").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == queue:
            return fields[1]
    raise AssertionError(f"queue {queue} not found")


def _urls(nodes: list[PrivateBrokerNode]) -> str:
    return ",".join(n.url for n in nodes)


def test_stopping_the_node_leading_a_silo_queue_does_not_lose_the_round(node_prefix, tmp_path):
    names = topology.Names(node_prefix)
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(PrivateBrokerNode()) for _ in range(3)]
        for node in nodes[1:]:
            node.join_cluster(nodes[0])
        # Workers list every node, starting with the second.
        fleet = WorkerFleet(
            _urls(nodes[1:] + nodes[:1]), SILOS, prefix=node_prefix, log_dir=tmp_path
        ).start()
        executors = {p for w in fleet.workers.values() for p in w.executor_pids()}
        try:
            queue = names.silo_queue("a")
            leader = _leader(nodes[0], queue)
            doomed = next(n for n in nodes if n.node_name == leader)
            # The coordinator starts on a node that stays: its reply queue is a
            # classic queue, which lives on one node only (see docs/reliability.md).
            others = [n for n in nodes if n is not doomed]
            context = flaap_mq.create_execution_context(
                _urls([*others, doomed]),
                SILOS,
                topology_prefix=node_prefix,
                task_timeout=120,
                max_attempts=4,
            )
            assert BackgroundRound(context, comps.slow_total, DATA).wait(120) == pytest.approx(
                EXPECTED
            )
            round_ = BackgroundRound(context, comps.slow_total, DATA)
            wait_for_pending(context, "a", "Compute")
            time.sleep(0.3)
            began = time.monotonic()
            doomed.stop()
            stopped_in = time.monotonic() - began
            assert round_.wait(300) == pytest.approx(EXPECTED)
            new_leader = _leader(others[0], queue)
            assert new_leader != leader
            # And the next round, with one node down.
            assert BackgroundRound(context, comps.slow_total, DATA).wait(120) == pytest.approx(
                EXPECTED
            )
            sent = context.client.requests_sent
            context.close()
            support.wait_queues_empty(others[0].url, [names.silo_queue(s) for s in SILOS])
        finally:
            support.assert_nothing_left(fleet, executors)
        for silo in SILOS:
            assert support.drain(others[0].url, names.silo_queue(silo)) == [], silo
        assert support.drain(others[0].url, names.dead_letter_queue) == []
    assert not any(n.os_processes() for n in nodes), "a cluster node was left running"
    counted = support.tally(support.fleet_events(fleet))
    assert counted.duplicate_executions == 0, counted.duplicated_ids
    assert len(counted.task_ids) == sent, (len(counted.task_ids), sent)
    support.record(
        "cluster_node_loss",
        nodes=3,
        rounds=3,
        survived=3,
        stopped_node_led="silo queue a",
        stop_seconds=round(stopped_in, 1),
        tasks=len(counted.task_ids),
        tasks_lost=0,
        duplicate_executions=counted.duplicate_executions,
        redelivered=counted.redelivered,
        answered_from_cache=counted.cached_answers,
    )


def test_losing_the_coordinators_own_node_is_an_outage_not_a_refusal(node_prefix, tmp_path):
    """The node hosting the coordinator's reply queue (a classic queue) goes away.

    Back within the link's outage window (30 s): the round completes. Gone for
    good: the round fails with a retryable error naming the cause, well before
    its task timeout, and never hangs.
    """
    names = topology.Names(node_prefix)
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(PrivateBrokerNode()) for _ in range(3)]
        for node in nodes[1:]:
            node.join_cluster(nodes[0])
        home = nodes[0]  # the coordinator connects here first, so its reply queue lives here
        fleet = WorkerFleet(_urls(nodes[1:]), SILOS, prefix=node_prefix, log_dir=tmp_path).start()
        executors = {p for w in fleet.workers.values() for p in w.executor_pids()}
        try:
            context = flaap_mq.create_execution_context(
                _urls(nodes), SILOS, topology_prefix=node_prefix, task_timeout=300, max_attempts=4
            )
            assert BackgroundRound(context, comps.slow_total, DATA).wait(120) == pytest.approx(
                EXPECTED
            )
            # Down for a few seconds, mid-round: the round completes.
            round_ = BackgroundRound(context, comps.slow_total, DATA)
            wait_for_pending(context, "a", "Compute")
            home.stop()
            time.sleep(3)
            home.start()
            assert round_.wait(300) == pytest.approx(EXPECTED)
            # Down for good, mid-round: a clear error, long before the 300 s task timeout.
            round_ = BackgroundRound(context, comps.slow_total, DATA)
            wait_for_pending(context, "a", "Compute")
            began = time.monotonic()
            home.stop()
            with pytest.raises(flaap_mq.SiloError) as raised:
                round_.wait(200)
            failed_after = time.monotonic() - began
            assert failed_after < 120, failed_after
            message = str(raised.value)
            assert "is down or inaccessible" in message or "no broker reachable" in message, message
            context.close()
            assert all(w.process.poll() is None for w in fleet.workers.values())
        finally:
            support.assert_nothing_left(fleet, executors)
        for silo in SILOS:
            # Nothing clogs the silo queues: whatever the last round left there
            # was taken by the workers.
            assert support.drain(nodes[1].url, names.silo_queue(silo)) == [], silo
    assert not any(n.os_processes() for n in nodes), "a cluster node was left running"
    counted = support.tally(support.fleet_events(fleet))
    assert counted.duplicate_executions == 0, counted.duplicated_ids
    support.record(
        "cluster_coordinator_node_loss",
        nodes=3,
        rounds=3,
        survived=2,
        failed_clearly_after_s=round(failed_after, 1),
        error=str(raised.value)[:240],
        duplicate_executions=counted.duplicate_executions,
    )
