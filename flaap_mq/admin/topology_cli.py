"""`flaap-mq topology`: declare the topology and show what exists on the broker.

With a user that may not declare (a broker whose administrator loaded the
topology with `flaap-mq admin definitions`), it checks passively that every
exchange and queue exists instead, as the workers and the coordinator do.
"""

from __future__ import annotations

import sys

import pika
import pika.exceptions

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.connect import open_connection
from flaap_mq.broker.declare import (
    declare_blocking,
    is_access_refused,
    is_not_found,
    missing_message,
)
from flaap_mq.protocol import topology


def show_topology(broker_url: str, silo_ids: list[str], prefix: str, queue_type: str) -> int:
    names = topology.Names(prefix)
    declarations = topology.shared_declarations(names) + topology.silo_declarations(
        names, silo_ids, topology.QueueType(queue_type)
    )
    address = parse_broker_urls(broker_url, connection_name="flaap-mq-topology")[0]
    # The same one line as every command when the broker cannot be reached.
    connection = open_connection([address])
    try:
        channel = connection.channel()
        passive = False
        try:
            declare_blocking(channel, declarations)
        except pika.exceptions.ChannelClosedByBroker as e:
            if not is_access_refused(e):
                raise _refused(e) from None
            print(
                f"user {address.username!r} may not declare the topology ({e.reply_text}); "
                "checking that it exists",
                file=sys.stderr,
            )
            passive = True
            channel = connection.channel()
            try:
                declare_blocking(channel, declarations, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e2:
                raise _refused(e2) from None
        print(f"broker {address.redacted}, prefix {prefix!r}" + (" (checked)" if passive else ""))
        print(f"  exchange {names.tasks_exchange} (direct, routing key = silo id)")
        print(f"  exchange {names.replies_exchange} (direct, routing key = job id)")
        print(f"  exchange {names.dead_letter_exchange} (fanout)")
        print(f"  {'queue':<40} {'messages':>9} {'consumers':>10}")
        for queue in [*map(names.silo_queue, silo_ids), names.dead_letter_queue]:
            ok = channel.queue_declare(queue, passive=True).method
            print(f"  {queue:<40} {ok.message_count:>9} {ok.consumer_count:>10}")
    finally:
        if connection.is_open:
            connection.close()
    return 0


def _refused(e: pika.exceptions.ChannelClosedByBroker) -> ValueError:
    if is_not_found(e):
        return ValueError(missing_message(e.reply_text))
    if e.reply_code == 406:
        return ValueError(
            f"broker refused the topology: {e.reply_text} (see docs/topology.md, "
            "'Changing queue settings')"
        )
    return ValueError(f"broker refused: {e.reply_text}")
