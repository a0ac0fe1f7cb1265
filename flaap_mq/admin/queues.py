"""How the admin commands look at a queue: its depth and consumers, its head's messages.

A passive `queue.declare` tells depth and consumers without creating the
queue; `basic.get` without automatic acknowledgement reads messages without
taking them (until acked). `status`, `admin remove-silo` and `dead-letters`
all do it this one way. Also the `--prefix` flag to repeat in a command a
message suggests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions

from flaap_mq.broker.declare import is_not_found
from flaap_mq.protocol import topology


@dataclasses.dataclass(frozen=True)
class QueueCounts:
    messages: int
    consumers: int


def queue_counts(
    connection: pika.BlockingConnection, queue: str, *, refused_as_missing: bool = False
) -> QueueCounts | None:
    """The queue's depth and consumers (passive declare), or None if it does not exist.

    A broker that refuses to show the queue (e.g. no permission on it) is a
    `ValueError` naming the queue; with `refused_as_missing`, None as for a
    missing queue (`status` reports what it can see).
    """
    channel = connection.channel()
    try:
        method = channel.queue_declare(queue, passive=True).method
    except pika.exceptions.ChannelClosedByBroker as e:
        if refused_as_missing or is_not_found(e):
            return None
        raise ValueError(f"broker refused to show {queue}: {e.reply_text}") from None
    channel.close()
    return QueueCounts(method.message_count, method.consumer_count)


def get_each(channel: Any, queue: str, limit: int) -> Iterator[tuple[Any, Any]]:
    """At most `limit` messages from the queue's head, with `basic.get` and no
    automatic acknowledgement: (method, properties) of each; the caller acks
    or returns them."""
    for _ in range(limit):
        method, properties, _body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return
        yield method, properties


def prefix_flag(names: topology.Names) -> str:
    """` --prefix P` for a command a message suggests; "" for the default prefix."""
    return "" if names.prefix == "flaap" else f" --prefix {names.prefix}"
