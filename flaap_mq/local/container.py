"""A disposable RabbitMQ container via testcontainers, where a Docker engine answers.

The second choice of `flaap_mq.local.broker.throwaway_broker`, after a broker
that already answers: `docker_available` says whether an engine answers, and
`TestcontainersBroker` runs one container, removed on leaving its `with`
block. testcontainers and docker are optional (the dev extra), imported only
when used.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

from flaap_mq.local.lifecycle import Lifecycle

logger = logging.getLogger(__name__)

DEFAULT_CONTAINER_IMAGE = "rabbitmq:3.10"  # same minor version as the OS package on our machines


def docker_available(timeout: float = 1.0) -> bool:
    """True if a Docker engine answers a ping within about ``timeout`` seconds."""
    try:
        import docker  # optional: comes with testcontainers (dev extra)

        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:  # any failure at all means "no usable engine"
        logger.debug("no Docker engine: %r", exc)
        return False


class TestcontainersBroker(Lifecycle):
    """A RabbitMQ container via testcontainers; needs a Docker engine (see docker_available)."""

    __test__ = False  # its name starts with "Test"; keep pytest from collecting it

    def __init__(self, image: str = DEFAULT_CONTAINER_IMAGE) -> None:
        self.image = image
        self._container: Any = None

    @property
    def url(self) -> str:
        c = self._container
        if c is None:
            raise RuntimeError("container not started")
        user, password, vhost = (
            urllib.parse.quote(v, safe="") for v in (c.username, c.password, c.vhost)
        )
        host, port = c.get_container_host_ip(), c.get_exposed_port(c.port)
        return f"amqp://{user}:{password}@{host}:{port}/{vhost}"

    def start(self) -> None:
        try:
            from testcontainers.community.rabbitmq import RabbitMqContainer
        except ImportError:  # testcontainers < 4.14 kept the module at the top level
            from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer(self.image)
        # Set before start(): if start() fails halfway, stop() still removes the container.
        self._container = container
        container.start()

    def stop(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            container.stop()

    def close(self) -> None:
        """What leaving the `with` block does: `stop()`."""
        self.stop()
