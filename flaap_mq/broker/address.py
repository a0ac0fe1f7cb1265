"""`BrokerAddress`: one broker node's URL made into pika's connection parameters.

`parse_broker_urls` turns one URL or a comma-separated list (several nodes
of one cluster) into addresses, checking each at once so that a bad URL is a
clear `ValueError` before any connection is tried. `BrokerAddress.parameters`
gives fresh pika parameters with the client options we always set, and the
TLS context `flaap_mq.broker.tls` builds for an `amqps://` URL.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import urllib.parse

import pika

from flaap_mq.broker.credentials import resolve_broker_url
from flaap_mq.broker.tls import (
    CA_FILE_ENV,
    CA_FILE_OPTION,
    CERT_FILE_ENV,
    CERT_FILE_OPTION,
    KEY_FILE_ENV,
    KEY_FILE_OPTION,
    TLS_OPTIONS,
    verifying_ssl_options,
    with_tls_options,
)
from flaap_mq.broker.urls import (
    STARTS_WITH_SCHEME,
    check_unambiguous,
    invalid_url_error,
    redact_url,
    split_broker_urls,
)


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

    @functools.cached_property
    def _split(self) -> tuple[str, dict[str, str]]:
        """The URL for pika (our TLS options taken out) and those options."""
        check_unambiguous(self.url)
        parts = urllib.parse.urlsplit(self.url)
        ours: dict[str, str] = {}
        rest = []
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key in TLS_OPTIONS:
                if key in ours:
                    raise ValueError(f"{key} given twice in {self.redacted}")
                ours[key] = value
            else:
                rest.append((key, value))
        pika_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
        return pika_url, ours

    @property
    def tls(self) -> bool:
        return self.url.lower().startswith("amqps://")

    @property
    def key_file(self) -> str | None:
        """The TLS client key this address logs in with, if any (a secret)."""
        return self._split[1].get(KEY_FILE_OPTION)

    @property
    def ca_file(self) -> str | None:
        """The CA file this URL trusts (`?cacertfile=`, or `--ca-file` put there)."""
        return self._split[1].get(CA_FILE_OPTION)

    @functools.cached_property
    def username(self) -> str:
        """The login, as pika sends it (the broker checks replies' user_id against it)."""
        return self.url_parameters().credentials.username

    def url_parameters(self) -> pika.URLParameters:
        """pika's parameters from the URL alone (no TLS, no client options); `ValueError` if bad."""
        pika_url, _ = self._split
        try:
            return pika.URLParameters(pika_url)
        except Exception as e:
            raise invalid_url_error(self.url, e) from None

    def parameters(self) -> pika.URLParameters:
        """Fresh pika parameters (and TLS context: certificates are read again)."""
        _, tls_options = self._split
        params = self.url_parameters()
        if self.tls:
            params.ssl_options = self.ssl_options(params.host)
        elif any(k in tls_options for k in (CA_FILE_OPTION, CERT_FILE_OPTION, KEY_FILE_OPTION)):
            raise ValueError(
                f"TLS files given for a plain amqp:// URL ({self.redacted}); "
                "use amqps:// and the broker's TLS port (5671)"
            )
        params.connection_attempts = 1
        params.socket_timeout = self.socket_timeout_s
        params.stack_timeout = self.socket_timeout_s * 2
        params.blocked_connection_timeout = 120
        params.heartbeat = self.heartbeat_s
        params.client_properties = {"connection_name": self.connection_name}
        return params

    def ssl_options(self, host: str) -> pika.SSLOptions:
        """TLS that verifies the broker: its certificate chain and its host name."""
        return verifying_ssl_options(self._split[1], host)


def parse_broker_urls(
    urls: str | None, *, connection_name: str = "flaap-mq"
) -> list[BrokerAddress]:
    """Parses one URL or a comma-separated list; `None` reads the environment.

    From the environment (`resolve_broker_url`: `FLAAP_MQ_BROKER_URL_FILE`,
    else `FLAAP_MQ_BROKER_URL`), `FLAAP_MQ_CA_FILE`, `FLAAP_MQ_CERT_FILE`
    and `FLAAP_MQ_KEY_FILE` are applied too (as `with_tls_options`).
    """
    if urls is None:
        urls = with_tls_options(
            resolve_broker_url().url,
            ca_file=os.environ.get(CA_FILE_ENV),
            cert_file=os.environ.get(CERT_FILE_ENV),
            key_file=os.environ.get(KEY_FILE_ENV),
        )
    addresses = []
    listed = split_broker_urls(urls)
    if len({"@" in url for url in listed}) > 1:
        raise ValueError(
            f"broker URLs {redact_url(urls)}: some name a user and some do not; give every "
            "node of the cluster the same login (a password holding a comma must be "
            "percent-encoded, as %2C)"
        )
    for url in listed:
        if not STARTS_WITH_SCHEME.match(url) or url.split(":", 1)[0].lower() not in (
            "amqp",
            "amqps",
        ):
            raise ValueError(
                f"broker URL must start with amqp:// or amqps://, got {redact_url(url)}"
            )
        address = BrokerAddress(url, connection_name=connection_name)
        address.parameters()  # raises a clear ValueError now rather than on connect
        addresses.append(address)
    if not addresses:
        raise ValueError("no broker URL given")
    return addresses
