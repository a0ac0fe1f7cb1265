"""Broker URLs: parsing, several nodes for fail-over, and redaction for logs.

A broker URL may name several nodes of one cluster, separated by commas
(`amqp://u:p@node1:5672/,amqp://u:p@node2:5672/`); the link tries them in
turn. The password never appears in what `redacted` returns, and only
`redacted` is ever logged.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse

import pika

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
BROKER_URL_ENV = "FLAAP_MQ_BROKER_URL"


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***`."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclasses.dataclass(frozen=True)
class BrokerAddress:
    """One broker node to connect to, with the client options we always set."""

    url: str
    connection_name: str = "flaap-mq"
    socket_timeout_s: float = 10.0
    heartbeat_s: int = 30

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    @property
    def username(self) -> str:
        return self.parameters().credentials.username

    def parameters(self) -> pika.URLParameters:
        try:
            params = pika.URLParameters(self.url)
        except Exception as e:
            raise ValueError(f"not a valid AMQP URL: {self.redacted}: {e}") from None
        params.connection_attempts = 1
        params.socket_timeout = self.socket_timeout_s
        params.stack_timeout = self.socket_timeout_s * 2
        params.blocked_connection_timeout = 120
        params.heartbeat = self.heartbeat_s
        params.client_properties = {"connection_name": self.connection_name}
        return params


def parse_broker_urls(urls: str | None, *, connection_name: str = "flaap-mq") -> list[BrokerAddress]:
    """Parses one URL or a comma-separated list; `None` reads the environment."""
    if urls is None:
        urls = os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL)
    addresses = []
    for url in (u.strip() for u in urls.split(",")):
        if not url:
            continue
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("amqp", "amqps"):
            raise ValueError(f"broker URL must start with amqp:// or amqps://, got {redact_url(url)}")
        address = BrokerAddress(url, connection_name=connection_name)
        address.parameters()  # raises a clear ValueError now rather than on connect
        addresses.append(address)
    if not addresses:
        raise ValueError("no broker URL given")
    return addresses
