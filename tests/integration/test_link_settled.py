"""`BrokerLink.all_settled`: what a worker waits for before it closes its link.

Closing a link fails every publish not yet confirmed with `LinkClosed`, even
one the broker took; a draining worker waits for `all_settled` first, so that
its last replies are confirmed and their tasks acked (tests/e2e/
test_worker_shutdown.py shows the race this closes, end to end).
"""

from __future__ import annotations

import os

import pika

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.link import BrokerLink, default_properties


def test_all_settled_resolves_once_every_publish_is_confirmed(broker_url, prefix):
    queue = f"{prefix}.settled"
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    link = BrokerLink(parse_broker_urls(broker_url), name="settled")
    try:
        link.start(30)
        # Persistent and large: the broker confirms them only once on disk,
        # long after `publish` returned.
        body = os.urandom(4 * 1024 * 1024)
        futures = [link.publish("", queue, body, default_properties()) for _ in range(16)]
        link.all_settled().result(60)
        assert all(f.done() for f in futures)
        assert [f.exception() for f in futures] == [None] * len(futures)
        # Nothing pending: it resolves at once.
        link.all_settled().result(5)
    finally:
        link.close()
        channel.queue_delete(queue)
        connection.close()
    assert link.all_settled().done(), "a closed link has nothing pending"
