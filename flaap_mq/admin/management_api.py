"""The few calls of RabbitMQ's management HTTP API that `flaap-mq status` needs.

AMQP cannot list queues or consumers; the management API can: which worker
of a silo is active and which are standby, the age of the oldest task, the
coordinators' reply queues. It gets the broker's login, so the URL is checked
before anything is sent (https with a trusted certificate, or plain http to
this host only; no login in the URL) and redirects are followed within the
same origin only. An API that does not answer is `ManagementUnavailable`:
status goes on without it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from flaap_mq.admin.status_report import Consumer, SiloStatus
from flaap_mq.broker.address import BrokerAddress
from flaap_mq.broker.urls import redact_url
from flaap_mq.executor.service import HOST_NETWORK_MARK
from flaap_mq.protocol import topology


class ManagementUnavailable(ValueError):
    """The management API did not answer, or refused the request: status goes on without it.

    Not raised for what is a configuration error to fix before anything is
    sent (plain http to another host, credentials in the URL), nor for a
    certificate the client does not trust or a redirect elsewhere: those
    still stop the command.
    """


class ManagementRedirected(ValueError):
    """The management API redirected elsewhere; the credentials were not sent there."""


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the API's own origin (scheme, host, port).

    urllib's own handler copies every header, `Authorization` included, to
    wherever a redirect points: another host, or plain http. Here a redirect
    to anywhere else is an error naming the target, and nothing is sent there.
    """

    def __init__(self, origin: tuple[str, str, int]) -> None:
        self._origin = origin

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        try:
            target = _origin(newurl)
        except ValueError:
            target = None
        if target != self._origin:
            raise ManagementRedirected(
                f"management API at {redact_url(req.full_url)} redirected ({code}) to "
                f"{redact_url(newurl)}, another origin: not followed, the broker "
                "credentials go only to the URL given (give the final URL as --management-url)"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


def _is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves this host."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ManagementApi:
    """The few calls of RabbitMQ's HTTP API that status needs, with the broker's login.

    The broker password goes only where it is safe: https to a server whose
    certificate the federation's CA (`ca_file`; else the system's CAs) signed
    for that host name, or plain http to this host only (localhost,
    127.0.0.0/8, ::1; proxies are then bypassed). Redirects are followed
    within the same origin only. The URL itself must not hold a user or
    password: the broker URL's login is used.
    """

    def __init__(self, url: str, address: BrokerAddress, *, ca_file: str | None = None) -> None:
        try:
            parts = urllib.parse.urlsplit(url)
            origin = _origin(url)
        except ValueError:
            raise ValueError(
                f"--management-url {redact_url(url)} is not a valid URL "
                "(e.g. https://broker.example.org:15671)"
            ) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"--management-url must be an https:// (or, on this host, http://) URL with "
                f"a host, got {redact_url(url)}"
            )
        if "@" in parts.netloc:
            raise ValueError(
                f"--management-url {redact_url(url)} holds a user name or password: leave "
                "them out, status logs in with the broker URL's user"
            )
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError(
                f"refusing to send the broker password over plain http to {parts.hostname} "
                f"(--management-url {redact_url(url)}); use https://{parts.hostname}:15671 "
                "(RabbitMQ's management TLS listener) with the federation's CA (--ca-file); "
                "plain http is allowed to localhost only"
            )
        self._base = url.rstrip("/")
        self._ca_file = ca_file
        handlers: list[urllib.request.BaseHandler] = [_SameOriginRedirects(origin)]
        if parts.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=_https_context(ca_file)))
        else:
            handlers.append(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        self._opener = urllib.request.build_opener(*handlers)
        params = address.parameters()
        self._vhost = urllib.parse.quote(params.virtual_host, safe="")
        user = params.credentials.username
        password = params.credentials.password
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(
            f"{self._base}/api/{path}", headers={"Authorization": self._auth}
        )
        try:
            with self._opener.open(request, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 404:
                return None
            raise ManagementUnavailable(
                f"management API at {self._base} answered {e.code}: {e.reason}"
            ) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                trusted = self._ca_file or "the system's CAs"
                raise ValueError(
                    f"management API at {self._base} presented a certificate this client does "
                    f"not trust ({e.reason.verify_message}); trusted: {trusted} (--ca-file)"
                ) from None
            raise ManagementUnavailable(
                f"management API at {self._base} did not answer: {e.reason}"
            ) from None
        except OSError as e:
            raise ManagementUnavailable(
                f"management API at {self._base} did not answer: {e}"
            ) from None

    def fill_silo(self, silo: SiloStatus) -> None:
        queue = self._get(f"queues/{self._vhost}/{urllib.parse.quote(silo.queue, safe='')}")
        if not queue:
            return
        details = queue.get("consumer_details") or []
        silo.workers = []
        for d in details:
            connection = self._client_connection_name(
                (d.get("channel_details") or {}).get("connection_name", "?")
            )
            silo.workers.append(
                Consumer(
                    tag=d.get("consumer_tag", "?"),
                    connection=connection,
                    active=d.get("activity_status", "single_active") in ("single_active", "up"),
                    executor_network="host" if HOST_NETWORK_MARK in connection else "sandbox",
                )
            )
        silo.consumers = max(silo.consumers, len(details))
        silo.online = silo.consumers > 0
        head = queue.get("head_message_timestamp")
        if head:
            silo.oldest_task_age_s = max(0.0, time.time() - float(head))

    def _client_connection_name(self, name: str) -> str:
        """The name the client gave its connection (e.g. `flaap-worker-a`), else the broker's."""
        connection = self._get(f"connections/{urllib.parse.quote(name, safe='')}") or {}
        given = (connection.get("client_properties") or {}).get("connection_name")
        return given or name

    def silo_ids(self, names: topology.Names) -> list[str]:
        """The silo of every queue `PREFIX.silo.*` in the vhost, sorted."""
        start = names.silo_queue("")
        queues = self._get(f"queues/{self._vhost}?columns=name") or []
        return sorted(
            q["name"][len(start) :]
            for q in queues
            if q.get("name", "").startswith(start) and len(q["name"]) > len(start)
        )

    def reply_queues(self, prefix: str) -> list[dict[str, Any]]:
        queues = self._get(f"queues/{self._vhost}") or []
        return [
            {
                "queue": q["name"],
                "messages": q.get("messages", 0),
                "consumers": q.get("consumers", 0),
            }
            for q in queues
            if q.get("name", "").startswith(prefix)
        ]


def _https_context(ca_file: str | None) -> ssl.SSLContext:
    """TLS that verifies the management API's certificate and host name."""
    try:
        # With a CA file, only that CA: the federation's, not any public one.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"CA file {ca_file} cannot be used for the management API: {e}") from None
    if ca_file and not context.get_ca_certs():
        raise ValueError(f"CA file {ca_file} holds no CA certificate (--ca-file)")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
