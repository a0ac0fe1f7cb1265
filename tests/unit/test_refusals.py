"""The broker's closes, classified on RabbitMQ's exact words (`flaap_mq.broker.refusals`)."""

from __future__ import annotations

import pika.exceptions
import pytest

from flaap_mq.broker import refusals
from flaap_mq.broker.refusals import Cause

# Texts as RabbitMQ 3.10 sends them (seen on private nodes here).
HOME_DOWN = (
    "NOT_FOUND - home node 'rabbit@n1' of durable queue 'flaap.reply.job-1' in vhost '/' "
    "is down or inaccessible"
)
STOPPING = "NOT_FOUND - queue 'flaap.reply.job-1' in vhost '/' process is stopped by supervisor"
NO_QUORUM = (
    "INTERNAL_ERROR - Cannot declare quorum queue 'flaap.reply.job-2' in vhost '/' on node "
    "'rabbit@n1' with leader on node 'rabbit@n1': cluster_not_formed"
)
MISSING = "NOT_FOUND - no queue 'flaap.silo.a' in vhost '/'"
# A silo may be named anything: its name must not change the cause.
MISSING_ODD_NAME = "NOT_FOUND - no queue 'flaap.silo.timeout-quorum' in vhost '/'"
METADATA_TIMEOUT = (
    "INTERNAL_ERROR - Could not declare quorum queue 'flaap.reply.job-3' on node 'rabbit@n1' "
    "because the metadata store operation timed out"
)
DENIED = "ACCESS_REFUSED - access to queue 'flaap.silo.b' in vhost '/' refused for user 'silo-a'"
TOO_LARGE = (
    "PRECONDITION_FAILED - message size 20971520 is larger than configured max size 16777216"
)
MISMATCH = (
    "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'flaap.silo.a' in vhost "
    "'/': received 'quorum' but current is 'classic'"
)


@pytest.mark.parametrize(
    ("code", "text", "cause", "outage", "queue"),
    [
        (404, HOME_DOWN, Cause.QUEUE_HOME_DOWN, True, "flaap.reply.job-1"),
        (404, STOPPING, Cause.QUEUE_HOME_DOWN, True, "flaap.reply.job-1"),
        (541, NO_QUORUM, Cause.NO_QUORUM, True, "flaap.reply.job-2"),
        (541, METADATA_TIMEOUT, Cause.NO_QUORUM, True, "flaap.reply.job-3"),
        (404, MISSING, Cause.NOT_FOUND, False, "flaap.silo.a"),
        (404, MISSING_ODD_NAME, Cause.NOT_FOUND, False, "flaap.silo.timeout-quorum"),
        (403, DENIED, Cause.PERMISSION, False, "flaap.silo.b"),
        (406, TOO_LARGE, Cause.TOO_LARGE, False, None),
        (406, MISMATCH, Cause.MISMATCH, False, "flaap.silo.a"),
        (320, "CONNECTION_FORCED - broker forced connection closure", Cause.OTHER, False, None),
        (None, None, Cause.OTHER, False, None),
    ],
)
def test_each_close_gets_its_cause(code, text, cause, outage, queue):
    refusal = refusals.classify(code, text)
    assert refusal.cause is cause
    assert refusal.is_outage is outage
    assert refusal.queue == queue


def test_a_size_refusal_carries_the_brokers_limit():
    assert refusals.classify(406, TOO_LARGE).limit_bytes == 16777216
    assert refusals.classify(406, MISMATCH).limit_bytes is None


def test_an_outage_names_the_queue_and_the_node_and_never_says_unreachable():
    home = refusals.classify(404, HOME_DOWN).explain()
    assert "flaap.reply.job-1" in home and "rabbit@n1" in home and "is down" in home
    quorum = refusals.classify(541, NO_QUORUM).explain()
    assert "flaap.reply.job-2" in quorum and "no quorum" in quorum and "majority" in quorum
    for line in (home, quorum):
        assert "the broker answers" in line
        assert "reachable" not in line


def test_only_closes_by_the_broker_are_refusals():
    by_broker = pika.exceptions.ChannelClosedByBroker(403, DENIED)
    assert refusals.from_close(by_broker).cause is Cause.PERMISSION
    connection = pika.exceptions.ConnectionClosedByBroker(541, NO_QUORUM)
    assert refusals.from_close(connection).cause is Cause.NO_QUORUM
    assert refusals.from_close(pika.exceptions.ChannelClosedByClient(200, "Normal")) is None
    assert refusals.from_close(pika.exceptions.StreamLostError("lost")) is None


def test_the_link_leaves_a_connection_close_to_its_connection_handler():
    """pika closes each channel with its connection's reason first (a 320 on a
    node's shutdown): while declaring, that must not read as a refused topology."""
    from flaap_mq.broker.address import parse_broker_urls
    from flaap_mq.broker.link import BrokerLink

    link = BrokerLink(parse_broker_urls("amqp://guest:guest@127.0.0.1:1/"), name="dispatch")
    channel = object()
    link._channel = channel  # declaring: not ready yet
    shutdown = pika.exceptions.ConnectionClosedByBroker(
        320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    )
    link._on_channel_closed(channel, shutdown)
    assert link.failure is None
    assert link._channel is None
    # A channel-level refusal while declaring still stops the link.
    link._channel = channel
    link._on_channel_closed(channel, pika.exceptions.ChannelClosedByBroker(406, MISMATCH))
    assert "inequivalent arg" in str(link.failure)
