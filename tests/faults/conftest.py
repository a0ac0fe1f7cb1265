"""Fixtures of the fault tests: a private broker node to break, and real workers on it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from flaap_mq.local.private_node import PrivateBrokerNode

# Small enough that a test can send a message over it cheaply, large enough
# for every computation these tests run (a few KB to a few hundred KB).
PRIVATE_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="package")
def private_node() -> Iterator[PrivateBrokerNode]:
    """One private node for this package's tests that drop connections or restart it.

    It refuses messages over PRIVATE_MAX_MESSAGE_BYTES, like a production broker
    configured with a `max_message_size` below RabbitMQ's 128 MiB default.
    """
    with PrivateBrokerNode(
        rabbitmq_conf=f"max_message_size = {PRIVATE_MAX_MESSAGE_BYTES}\n"
    ) as node:
        yield node
    assert not node.os_processes(), "the private broker node left processes behind"


@pytest.fixture
def node_prefix() -> str:
    """A topology prefix of this test's own on the private node (the node is discarded)."""
    return f"f{uuid.uuid4().hex[:10]}"
