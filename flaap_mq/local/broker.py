"""Get a RabbitMQ broker for demos and tests, without touching anyone else's.

Three sources, tried in this order by :func:`throwaway_broker`:

1. A broker the caller already has (e.g. the shared node on 127.0.0.1:5672), if it answers.
2. A disposable container via testcontainers, where a Docker engine answers.
3. A private ``rabbitmq-server`` node from the OS package (:class:`PrivateBrokerNode`), on free
   ports with its own data directory. This is what runs on the project machines, which have
   RabbitMQ installed but no Docker engine. Tests that stop, restart or reconfigure a broker
   should always use a private node so the shared one stays untouched.

The container is `flaap_mq.local.container`, the private node
`flaap_mq.local.private_node`. Broker URLs carry passwords; anything this
module logs goes through :func:`redact_url`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pika
import pika.exceptions

from flaap_mq.broker.urls import redact_url
from flaap_mq.local.container import TestcontainersBroker, docker_available
from flaap_mq.local.private_node import PrivateBrokerNode

logger = logging.getLogger(__name__)


def broker_answers(url: str, timeout: float = 2.0) -> bool:
    """True if an AMQP connection to ``url`` can be opened and closed within about ``timeout`` s."""
    try:
        params = pika.URLParameters(url)
    except ValueError:
        logger.debug("not an AMQP URL: %s", redact_url(url))
        return False
    # Override whatever the URL's query asks for: a probe must give up quickly.
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    params.blocked_connection_timeout = timeout
    params.connection_attempts = 1
    params.retry_delay = 0
    try:
        connection = pika.BlockingConnection(params)
        connection.close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        logger.debug("no broker answers at %s: %r", redact_url(url), exc)
        return False
    return True


@contextlib.contextmanager
def throwaway_broker(preferred_url: str | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(url, description)`` for a broker to use; stop whatever was started on exit.

    ``preferred_url`` is used as is if a broker answers there. Otherwise a testcontainers broker
    where Docker answers, else a private rabbitmq-server node. ``description`` says which, and
    never contains the password.
    """
    if preferred_url is not None and broker_answers(preferred_url):
        description = f"existing broker at {redact_url(preferred_url)}"
        logger.info("using %s", description)
        yield preferred_url, description
        return
    if preferred_url is not None:
        logger.info("no broker answers at %s; starting one", redact_url(preferred_url))
    with contextlib.ExitStack() as stack:
        url, description = _start_broker(stack)
        logger.info("using %s", description)
        yield url, description


def _start_broker(stack: contextlib.ExitStack) -> tuple[str, str]:
    if docker_available():
        try:
            container = stack.enter_context(TestcontainersBroker())
        except Exception as exc:  # e.g. image pull failed; a local node may still work
            logger.warning("testcontainers broker failed (%r); trying a private node", exc)
        else:
            url = container.url
            return url, f"testcontainers {container.image} broker at {redact_url(url)}"
    node = stack.enter_context(PrivateBrokerNode())
    return node.url, f"private rabbitmq-server node {node.node_name} at {redact_url(node.url)}"
