"""Topology names, arguments and id validation."""

from __future__ import annotations

import pytest

from flaap_mq.protocol import topology


def test_names():
    names = topology.Names("p")
    assert names.tasks_exchange == "p.tasks"
    assert names.replies_exchange == "p.replies"
    assert names.silo_queue("a") == "p.silo.a"
    assert names.reply_queue("j") == "p.reply.j"
    assert names.dead_letter_queue == "p.dead-letter"


def test_silo_queues_are_durable_quorum_with_dead_lettering_and_one_consumer():
    decls = topology.silo_declarations(topology.Names("p"), ["a"])
    queue = next(d for d in decls if isinstance(d, topology.Queue))
    assert queue.durable
    assert queue.arguments["x-queue-type"] == "quorum"
    assert queue.arguments["x-dead-letter-exchange"] == "p.dead-letter"
    assert queue.arguments["x-single-active-consumer"] is True
    assert topology.Binding("p.silo.a", "p.tasks", "a") in decls


def test_classic_silo_queues_are_selectable():
    decls = topology.silo_declarations(topology.Names("p"), ["a"], topology.QueueType.CLASSIC)
    queue = next(d for d in decls if isinstance(d, topology.Queue))
    assert queue.arguments["x-queue-type"] == "classic"
    assert "x-delivery-limit" not in queue.arguments


def test_reply_queue_is_a_quorum_queue_that_expires_bound_to_the_replies_exchange():
    decls = topology.reply_declarations(topology.Names("p"), "job1", expires_ms=5000)
    assert topology.Queue("p.reply.job1", {"x-expires": 5000, "x-queue-type": "quorum"}) in decls
    assert topology.Binding("p.reply.job1", "p.replies", "job1") in decls


@pytest.mark.parametrize("bad", ["", "a b", "a.b", "a/b", "x" * 101, "é"])
def test_ids_that_would_break_names_are_refused(bad):
    with pytest.raises(ValueError, match="silo id"):
        topology.validate_id("silo", bad)


def test_every_queue_the_federation_needs_is_a_quorum_queue():
    """No queue lives on one node: the cluster keeps each through a minority's loss."""
    names = topology.Names("p")
    decls = (
        topology.shared_declarations(names)
        + topology.silo_declarations(names, ["a", "b"])
        + topology.reply_declarations(names, "job1")
    )
    queues = [d for d in decls if isinstance(d, topology.Queue)]
    assert {q.name for q in queues} == {"p.dead-letter", "p.silo.a", "p.silo.b", "p.reply.job1"}
    assert all(q.arguments["x-queue-type"] == "quorum" and q.durable for q in queues), queues
