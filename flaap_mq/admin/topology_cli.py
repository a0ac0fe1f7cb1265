"""`flaap-mq topology`: declare the topology and show what exists on the broker."""

from __future__ import annotations

import pika
import pika.exceptions

from flaap_mq.broker.urls import parse_broker_urls
from flaap_mq.protocol import topology


def show_topology(broker_url: str, silo_ids: list[str], prefix: str, queue_type: str) -> int:
    names = topology.Names(prefix)
    declarations = topology.shared_declarations(names) + topology.silo_declarations(
        names, silo_ids, topology.QueueType(queue_type)
    )
    address = parse_broker_urls(broker_url, connection_name="flaap-mq-topology")[0]
    try:
        connection = pika.BlockingConnection(address.parameters())
    except pika.exceptions.ProbableAuthenticationError as e:
        raise ValueError(f"broker at {address.redacted} refused the login: {e}") from None
    except pika.exceptions.AMQPConnectionError as e:
        raise ValueError(f"no broker answered at {address.redacted}: {e!r}") from None
    try:
        channel = connection.channel()
        try:
            topology.declare_blocking(channel, declarations)
        except pika.exceptions.ChannelClosedByBroker as e:
            raise ValueError(
                f"broker refused the topology: {e.reply_text} (see docs/topology.md, "
                "'Changing queue settings')"
            ) from None
        print(f"broker {address.redacted}, prefix {prefix!r}")
        print(f"  exchange {names.tasks_exchange} (direct, routing key = silo id)")
        print(f"  exchange {names.replies_exchange} (direct, routing key = job id)")
        print(f"  exchange {names.dead_letter_exchange} (fanout)")
        print(f"  {'queue':<40} {'messages':>9} {'consumers':>10}")
        for queue in [*map(names.silo_queue, silo_ids), names.dead_letter_queue]:
            ok = channel.queue_declare(queue, passive=True).method
            print(f"  {queue:<40} {ok.message_count:>9} {ok.consumer_count:>10}")
    finally:
        connection.close()
    return 0
