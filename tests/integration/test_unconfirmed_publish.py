"""A broker that takes messages and never confirms them: the publish fails, it does not hang.

A quorum queue whose leader is up but whose majority is down says nothing
about what is published to it (tests/faults/test_cluster_node_loss.py shows
that on three nodes). A broker in a memory alarm does the same to every
publisher, and is the cheap way to get there on one private node:
`set_vm_memory_high_watermark absolute 1` raises the alarm at once. The
link cannot tell the two apart, and its error says so.
"""

from __future__ import annotations

import pytest

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.link import BrokerError, BrokerLink, default_properties
from flaap_mq.local.private_node import PrivateBrokerNode
from flaap_mq.protocol import topology

pytestmark = pytest.mark.broker_node

QUEUE = "unconfirmed"


def test_a_publish_the_broker_never_confirms_fails_after_the_confirm_timeout():
    with PrivateBrokerNode() as node:
        link = BrokerLink(
            parse_broker_urls(node.url),
            name="unconfirmed",
            declarations=lambda: [topology.Queue(QUEUE, {"x-queue-type": "quorum"})],
            confirm_timeout=2.0,
        )
        try:
            link.start(30)
            link.publish("", QUEUE, b"before", default_properties()).result(10)
            assert link.trouble() is None
            node.rabbitmqctl("set_vm_memory_high_watermark", "absolute", "1")
            stuck = link.publish("", QUEUE, b"during", default_properties())
            with pytest.raises(BrokerError, match=r"has not confirmed a message .* within 2 s"):
                stuck.result(20)
            # Said before the publish failed, for the key it was sent to only.
            assert "confirmed nothing for 2 s" in (link.trouble(QUEUE) or "")
            assert link.trouble("another-queue") is None
            node.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
            # The broker now takes "during" too, and confirms it: a confirm for
            # a message already failed is dropped, not given to "after".
            after = link.publish("", QUEUE, b"after", default_properties())
            after.result(30)
            assert after.exception() is None
            assert link.trouble() is None, "a confirm for that key clears it"
        finally:
            link.close()
