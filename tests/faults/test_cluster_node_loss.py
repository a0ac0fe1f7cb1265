"""Any one node of a three-node RabbitMQ cluster may die: nothing the federation needs is lost.

Three private nodes on this machine, clustered with `rabbitmqctl
join_cluster`, shared by the tests of this module (each uses a topology
prefix of its own, and starts again whatever node the last one stopped).
Every queue is a quorum queue with a member on each node
(`topology`: "nothing the federation needs lives on one node").

Who sits where is set, not left to chance: the coordinator connects to node
0, both workers to node 1, and queue leaders are moved
(`ra:transfer_leadership`) so that the node a test stops plays exactly the
role it names and no other. A node is stopped mid-round and not restarted
within the test: the round ends right, and the next one too; no task is
lost or run twice; nothing is left in any queue.
"""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.data import digits
from flaap_mq.data.fleet import SiloDataFleet
from flaap_mq.data.silo import read_silo_dataset
from flaap_mq.local.private_node import PrivateBrokerNode
from flaap_mq.local.workers import WorkerFleet
from flaap_mq.protocol import topology
from flaap_mq.testing.tff_local import local_cpp_contexts
from flaap_mq.training.config import TrainingConfig
from flaap_mq.training.fedavg import SiloFedAvg
from tests.faults import comps, support
from tests.faults.rounds import BackgroundRound, wait_for_pending

pytestmark = [pytest.mark.faults, pytest.mark.broker_node]

SILOS = ["a", "b"]
DATA = [[float(i + 1)] * 6 for i in range(4)]
EXPECTED = sum(sum(d) for d in DATA)
# A round long enough (24 readings of 250 ms per client: 6 s and more) that
# stopping a node, which takes a few seconds, ends well before the round does.
LONG_DATA = [[float(i + 1)] * 24 for i in range(4)]
LONG_EXPECTED = sum(sum(d) for d in LONG_DATA)


class Cluster:
    """Three clustered private nodes; `ensure_up` starts any a test left stopped."""

    def __init__(self, nodes: list[PrivateBrokerNode]) -> None:
        self.nodes = nodes

    def ensure_up(self) -> None:
        for node in self.nodes:
            if not node.os_processes():
                node.start()  # same data directory: it rejoins its cluster
        status = json.loads(self.nodes[0].rabbitmqctl("cluster_status", "--formatter", "json"))
        for node in self.nodes:
            assert node.node_name in status["running_nodes"], f"{node.node_name} is not running"

    def wait_safe_to_stop(self, node: PrivateBrokerNode, timeout: float = 180.0) -> None:
        """Waits until stopping `node` leaves every quorum queue a majority.

        What operators check between the steps of a rolling restart
        (`rabbitmq-queues check_if_node_is_quorum_critical`): a member that
        has just come back may still be catching up on its queue's log.
        """
        count = 'io:format("~p~n", [length(rabbit_quorum_queue:list_with_minimum_quorum())]).'
        support.wait_until(
            lambda: node.rabbitmqctl("eval", count).split()[0] == "0",
            timeout,
            f"no quorum queue needs {node.node_name} for its majority",
        )

    def leader(self, queue: str) -> str:
        for node in self.nodes:
            if not node.os_processes():
                continue
            for line in node.rabbitmqctl("list_queues", "-q", "name", "leader").splitlines():
                fields = line.split()
                if len(fields) == 2 and fields[0] == queue:
                    return fields[1]
            raise AssertionError(f"queue {queue} not found")
        raise AssertionError("no node is running")

    def move_leader(self, queue: str, to: PrivateBrokerNode) -> None:
        """Makes `to` lead the quorum queue `queue` (Raft leadership transfer)."""
        expr = (
            f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), '
            "{RaName, Leader} = amqqueue:get_pid(Q), "
            f"ra:transfer_leadership({{RaName, Leader}}, {{RaName, '{to.node_name}'}})."
        )
        deadline = time.monotonic() + 30
        while self.leader(queue) != to.node_name:
            assert time.monotonic() < deadline, f"{queue} would not move to {to.node_name}"
            self.nodes[0].rabbitmqctl("eval", expr)
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(PrivateBrokerNode()) for _ in range(3)]
        for node in nodes[1:]:
            node.join_cluster(nodes[0])
        yield Cluster(nodes)
    assert not any(n.os_processes() for n in nodes), "a cluster node was left running"


def _urls(nodes: list[PrivateBrokerNode]) -> str:
    return ",".join(n.url for n in nodes)


ROLES = ["reply_queue_leader", "silo_queue_leader", "coordinator_connection", "worker_connection"]


@pytest.mark.parametrize("role", ROLES)
def test_losing_any_one_node_mid_round_loses_nothing(cluster, role, node_prefix, tmp_path):
    cluster.ensure_up()
    n0, n1, n2 = cluster.nodes
    names = topology.Names(node_prefix)
    fleet = WorkerFleet(_urls([n1, n2, n0]), SILOS, prefix=node_prefix, log_dir=tmp_path).start()
    executors = {p for w in fleet.workers.values() for p in w.executor_pids()}
    context = None
    try:
        context = flaap_mq.create_execution_context(
            _urls([n0, n1, n2]), SILOS, topology_prefix=node_prefix, task_timeout=120
        )
        assert BackgroundRound(context, comps.slow_total, DATA).wait(120) == pytest.approx(EXPECTED)
        reply, silo_a, silo_b = (
            names.reply_queue(context.job_id),
            names.silo_queue("a"),
            names.silo_queue("b"),
        )
        # The node to stop, and where every queue's leader goes first, so that
        # the stopped node plays the named role and no other.
        doomed, leaders = {
            "reply_queue_leader": (n2, {reply: n2, silo_a: n0, silo_b: n0}),
            "silo_queue_leader": (n2, {reply: n0, silo_a: n2, silo_b: n0}),
            "coordinator_connection": (n0, {reply: n2, silo_a: n2, silo_b: n2}),
            "worker_connection": (n1, {reply: n0, silo_a: n2, silo_b: n2}),
        }[role]
        for queue, node in leaders.items():
            cluster.move_leader(queue, node)
        survivor = next(n for n in cluster.nodes if n is not doomed)

        round_ = BackgroundRound(context, comps.slow_total, LONG_DATA)
        wait_for_pending(context, "a", "Compute")
        time.sleep(0.3)  # the silos are busy with it
        doomed.stop()
        assert not round_.done(), "the round ended before the node was down: make it longer"
        assert round_.wait(300) == pytest.approx(LONG_EXPECTED)
        took = round_.seconds
        assert BackgroundRound(context, comps.slow_total, DATA).wait(120) == pytest.approx(EXPECTED)
        sent = context.client.requests_sent
        context.close()
        support.wait_queues_empty(survivor.url, [silo_a, silo_b])
    finally:
        if context is not None:
            context.close()
        support.assert_nothing_left(fleet, executors)
    for queue in (silo_a, silo_b):
        assert support.drain(survivor.url, queue) == [], queue
    assert support.drain(survivor.url, names.dead_letter_queue) == []
    assert not support.queue_exists(survivor.url, reply), (
        "the closed coordinator's reply queue is left"
    )
    counted = support.tally(support.fleet_events(fleet))
    assert counted.duplicate_executions == 0, counted.duplicated_ids
    assert len(counted.task_ids) == sent, (len(counted.task_ids), sent)
    support.record(
        f"cluster_node_loss_{role}",
        nodes=3,
        rounds=3,
        survived=3,
        stopped=role,
        round_seconds=round(took, 1),
        tasks=len(counted.task_ids),
        tasks_lost=0,
        duplicate_executions=counted.duplicate_executions,
        redelivered=counted.redelivered,
        answered_from_cache=counted.cached_answers,
    )


def test_two_nodes_of_three_down_is_a_clear_error_then_recovery(cluster, node_prefix, tmp_path):
    """Without a majority, quorum queues take no message: say so, then carry on when one returns."""
    cluster.ensure_up()
    n0, n1, n2 = cluster.nodes
    names = topology.Names(node_prefix)
    fleet = WorkerFleet(_urls([n1, n2, n0]), SILOS, prefix=node_prefix, log_dir=tmp_path).start()
    executors = {p for w in fleet.workers.values() for p in w.executor_pids()}
    context = None
    try:
        context = flaap_mq.create_execution_context(
            _urls([n0, n1, n2]),
            SILOS,
            topology_prefix=node_prefix,
            task_timeout=120,
            max_attempts=2,
        )
        assert BackgroundRound(context, comps.slow_total, DATA).wait(120) == pytest.approx(EXPECTED)
        n1.stop()
        n2.stop()
        began = time.monotonic()
        with pytest.raises(flaap_mq.SiloError) as raised:
            BackgroundRound(context, comps.slow_total, DATA).wait(200)
        failed_after = time.monotonic() - began
        message = str(raised.value)
        assert "quorum" in message and "majority" in message, message
        assert "no broker reachable" not in message, message
        n1.start()
        assert BackgroundRound(context, comps.slow_total, DATA).wait(180) == pytest.approx(EXPECTED)
        sent = context.client.requests_sent
        context.close()
        support.wait_queues_empty(n0.url, [names.silo_queue(s) for s in SILOS])
    finally:
        if context is not None:
            context.close()
        support.assert_nothing_left(fleet, executors)
    for silo in SILOS:
        assert support.drain(n0.url, names.silo_queue(silo)) == [], silo
    counted = support.tally(support.fleet_events(fleet))
    assert counted.duplicate_executions == 0, counted.duplicated_ids
    assert len(counted.task_ids) <= sent
    support.record(
        "cluster_majority_lost",
        nodes=3,
        stopped=2,
        failed_clearly_after_s=round(failed_after, 1),
        error=message[:300],
        recovered_with_nodes=2,
        duplicate_executions=counted.duplicate_executions,
    )


TRAIN_SILOS = digits.silo_ids(3)
TRAIN_ROUNDS = 100  # about 1.7 s each here: long enough for three node restarts
SEED = 7


@pytest.mark.timeout(1500)
def test_a_rolling_restart_of_every_node_during_training_is_a_non_event(
    cluster, tmp_path, digits_split
):
    """How operators upgrade RabbitMQ: stop, start, wait until back, next; `train` never notices."""
    cluster.ensure_up()
    prefix = f"roll{time.monotonic_ns() % 10**8}"
    data_dir = digits_split(3)
    urls = _urls(cluster.nodes)
    out = tmp_path / "out"
    with SiloDataFleet(
        _urls(cluster.nodes[1:] + cluster.nodes[:1]),
        {silo: data_dir / silo for silo in TRAIN_SILOS},
        prefix=prefix,
        log_dir=tmp_path,
    ) as fleet:
        executors = {p for w in fleet.workers.values() for p in w.executor_pids()}
        train = subprocess.Popen(
            [
                sys.executable, "-m", "flaap_mq.cli", "train",
                "--broker-url", urls,
                "--prefix", prefix,
                *[arg for silo in TRAIN_SILOS for arg in ("--silo", silo)],
                "--rounds", str(TRAIN_ROUNDS),
                "--seed", str(SEED),
                "--test-set", str(data_dir / digits.TEST_FILE),
                "--out", str(out),
                "--log-format", "json",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / "train.log").open("w"),
            text=True,
        )  # fmt: skip
        try:
            metrics = out / "metrics.csv"
            support.wait_until(
                lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
                300,
                "training under way (round 1 done)",
            )
            restarted = []
            for node in cluster.nodes:
                cluster.wait_safe_to_stop(node)
                node.stop()
                node.start()
                cluster.ensure_up()
                restarted.append(node.node_name)
                assert train.poll() is None, "training ended before the rolling restart did"
            stdout, _ = train.communicate(timeout=900)
        finally:
            if train.poll() is None:
                train.kill()
                train.wait(10)
        log_text = (tmp_path / "train.log").read_text()
        assert train.returncode == 0, log_text[-5000:]
        assert "final test accuracy:" in stdout
        support.wait_queues_empty(
            cluster.nodes[0].url, [topology.Names(prefix).silo_queue(s) for s in TRAIN_SILOS]
        )
    support.assert_nothing_left(fleet, executors)
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == list(range(TRAIN_ROUNDS + 1)), "every round once"
    with np.load(out / "weights.npz") as saved:
        remote = [saved[f"arr_{i}"] for i in range(len(saved.files))]

    # The same training on TFF's local runtime, without any restart.
    algorithm = SiloFedAvg(TrainingConfig(seed=SEED, rounds=TRAIN_ROUNDS))
    datasets = [
        read_silo_dataset(data_dir / s, digits.DEFAULT_NAME, digits.ELEMENT_SPEC)
        for s in TRAIN_SILOS
    ]
    with (
        local_cpp_contexts(with_sync=True) as (_, local),
        tff.framework.get_context_stack().install(local),
    ):
        state = algorithm.initial_state()
        for _ in range(TRAIN_ROUNDS):
            state, _ = algorithm.round_with_data(state, datasets)
        expected = [np.asarray(w) for w in algorithm.model_weights(state).trainable]
    for got, want in zip(remote, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    support.record(
        "cluster_rolling_restart",
        nodes=3,
        restarted=len(restarted),
        rounds=TRAIN_ROUNDS,
        rounds_recorded=len(rows) - 1,
        final_accuracy=float(rows[-1]["test_accuracy"]),
    )
