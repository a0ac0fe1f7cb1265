"""A bare AMQP peer of the silo workers: for tests that publish and read messages by hand.

It declares what a coordinator declares (the shared topology and its own
reply queue) and nothing more: none of flaap-mq's coordinator runs, so a
test can send what the real one never would (a crafted slice, a stale
incarnation) and read exactly what a worker answers.
"""

from __future__ import annotations

import uuid

import pika

from flaap_mq.broker.declare import declare_blocking
from flaap_mq.protocol import topology


class RawPeer:
    """A connection, a confirming channel, and a reply queue of the peer's own job."""

    job_label = "raw"  # the start of the job id, so a test's queues are recognisable

    def __init__(self, broker_url: str, prefix: str) -> None:
        self.names = topology.Names(prefix)
        self.job_id = f"{self.job_label}-{uuid.uuid4().hex[:8]}"
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()
        declare_blocking(
            self.channel,
            topology.shared_declarations(self.names)
            + topology.reply_declarations(self.names, self.job_id),
        )
        self.channel.confirm_delivery()

    def close(self) -> None:
        self.connection.close()
