"""Declaring the topology on a channel: the pika calls for `flaap_mq.protocol.topology`'s data.

`topology` says what exists (names, queues and their arguments, bindings);
this sends it to a broker, on a `pika.BlockingChannel` (`declare_blocking`:
the CLI, the admin commands, tests) or, chained through callbacks, on a
channel of a `SelectConnection` (`declare_async`: `BrokerLink`).

A client without configure permission (a broker whose administrator loaded
the topology with `flaap-mq admin definitions`) declares passively
(`passive=True`): each shared exchange and queue is only checked to exist;
bindings, which AMQP cannot check, are left to the administrator; what a
client owns itself (a coordinator's reply queue) is still declared.
`BrokerLink` and `flaap-mq topology` switch to that on the broker's first
ACCESS_REFUSED (`is_access_refused`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flaap_mq.protocol.topology import Binding, Declaration, Exchange, Names, Queue


def declare_blocking(
    channel: Any, declarations: Sequence[Declaration], *, passive: bool = False
) -> None:
    """Declares on a `pika.BlockingChannel` (CLI and tests)."""
    for decl, check_only in _plan(declarations, passive):
        _declare_one(channel, decl, check_only)


def declare_async(
    channel: Any,
    declarations: Sequence[Declaration],
    on_done: Callable[[], None],
    *,
    passive: bool = False,
) -> None:
    """Declares on a pika `Channel` of a `SelectConnection`, one after another.

    Declarations are chained through their completion callbacks so that a
    binding is only sent once its queue and exchange exist. A declaration the
    broker refuses (for example a queue declared earlier with other
    arguments) closes the channel with the broker's reason, which the owner
    of the channel reports.
    """
    pending = _plan(declarations, passive)

    def next_one(_frame: Any = None) -> None:
        if not pending:
            on_done()
            return
        decl, check_only = pending.pop(0)
        _declare_one(channel, decl, check_only, callback=next_one)

    next_one()


def _declare_one(channel: Any, decl: Declaration, check_only: bool, callback: Any = None) -> None:
    """One declaration; `callback` (a `SelectConnection` channel's) gets the broker's ok."""
    # Only an async channel takes (and needs) a callback: a blocking one waits.
    extra = {"callback": callback} if callback is not None else {}
    match decl:
        case Exchange():
            channel.exchange_declare(
                decl.name, decl.type, durable=decl.durable, passive=check_only, **extra
            )
        case Queue():
            channel.queue_declare(
                decl.name,
                durable=decl.durable,
                arguments=decl.arguments,
                passive=check_only,
                **extra,
            )
        case Binding():
            channel.queue_bind(decl.queue, decl.exchange, routing_key=decl.routing_key, **extra)


def _plan(declarations: Sequence[Declaration], passive: bool) -> list[tuple[Declaration, bool]]:
    """(declaration, declare it passively) for each one to send; see the module docstring."""
    if not passive:
        return [(d, False) for d in declarations]
    # AMQP has no passive bind: a shared binding is the administrator's.
    return [(d, d.shared) for d in declarations if not (isinstance(d, Binding) and d.shared)]


def is_access_refused(error: BaseException) -> bool:
    """True for the broker's ACCESS_REFUSED (403) on a channel: no permission."""
    return getattr(error, "reply_code", None) == 403


def is_not_found(error: BaseException) -> bool:
    """True for the broker's NOT_FOUND (404), e.g. a passive declare of a missing queue."""
    return getattr(error, "reply_code", None) == 404


def missing_message(reply_text: str) -> str:
    """What to tell an operator when a passive declare finds nothing."""
    return (
        f"the broker has no such topology: {reply_text}; this user may not declare it, so an "
        "administrator must load it (flaap-mq admin definitions ... with this silo, then "
        "rabbitmqctl import_definitions; see docs/deploy.md)"
    )


__all__ = [
    "declare_async",
    "declare_blocking",
    "is_access_refused",
    "is_not_found",
    "missing_message",
]


def delete_topology(
    broker_url: str,
    names: Names,
    *,
    silos: Iterable[str] = (),
    jobs: Iterable[str] = (),
    queues: Iterable[str] = (),
) -> None:
    """Deletes a prefix's topology: the silos' and jobs' queues, `queues`, the
    dead-letter queue and the three exchanges; what does not exist is skipped.

    How the demo, the benchmarks and the tests leave the broker as they found
    it (an operator removes a silo with `flaap-mq admin remove-silo`, which
    checks first). Connects to the first of `broker_url`'s nodes.
    """
    import pika
    import pika.exceptions

    from flaap_mq.broker.address import BrokerAddress

    doomed = [
        *map(names.silo_queue, silos),
        *map(names.reply_queue, jobs),
        *queues,
        names.dead_letter_queue,
    ]
    exchanges = [names.tasks_exchange, names.replies_exchange, names.dead_letter_exchange]
    connection = pika.BlockingConnection(BrokerAddress(broker_url.split(",")[0]).parameters())
    try:
        # A missing queue or exchange closes the channel (404): one channel each.
        for queue in dict.fromkeys(doomed):
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                connection.channel().queue_delete(queue)
        for exchange in exchanges:
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                connection.channel().exchange_delete(exchange)
    finally:
        connection.close()
