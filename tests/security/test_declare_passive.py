"""Passive declaration: what a client without configure permission sends."""

from __future__ import annotations

from flaap_mq.broker.declare import declare_async, declare_blocking
from flaap_mq.protocol import topology


class RecordingChannel:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []

    def exchange_declare(self, name, _type, *, durable, passive=False, callback=None):
        self.calls.append(("exchange", name, passive))
        if callback:
            callback(None)

    def queue_declare(self, name, *, durable, arguments, passive=False, callback=None):
        self.calls.append(("queue", name, passive))
        if callback:
            callback(None)

    def queue_bind(self, queue, exchange, *, routing_key, callback=None):
        self.calls.append(("bind", f"{exchange}->{queue}", False))
        if callback:
            callback(None)


def _coordinator_declarations(names: topology.Names) -> list[topology.Declaration]:
    return (
        topology.shared_declarations(names)
        + topology.silo_declarations(names, ["a"])
        + topology.reply_declarations(names, "job1")
    )


def test_active_declares_everything():
    channel = RecordingChannel()
    declare_blocking(channel, _coordinator_declarations(topology.Names("p")))
    assert all(not passive for _, _, passive in channel.calls)
    assert ("bind", "p.tasks->p.silo.a", False) in channel.calls


def test_passive_checks_shared_topology_and_still_declares_the_reply_queue():
    names = topology.Names("p")
    for declare in ("blocking", "async"):
        channel = RecordingChannel()
        done = []
        if declare == "blocking":
            declare_blocking(channel, _coordinator_declarations(names), passive=True)
        else:
            declare_async(
                channel, _coordinator_declarations(names), lambda d=done: d.append(1), passive=True
            )
            assert done == [1]
        assert channel.calls == [
            ("exchange", "p.tasks", True),
            ("exchange", "p.replies", True),
            ("exchange", "p.dead-letter", True),
            ("queue", "p.dead-letter", True),
            ("queue", "p.silo.a", True),
            # The coordinator's own: declared (it has configure on p.reply.*).
            ("queue", "p.reply.job1", False),
            ("bind", "p.replies->p.reply.job1", False),
        ]


def test_shared_flag_does_not_change_equality():
    assert topology.Queue("q", {}, shared=False) == topology.Queue("q", {})
