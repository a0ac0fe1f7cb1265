"""`flaap-mq status`: is each silo online, how much waits for it, what went wrong.

Two sources, so that it works on any broker:

* AMQP (always): each silo queue's depth and consumer count, the dead-letter
  queue's depth and its most common reasons (sampled and requeued).
* RabbitMQ's management API, when `--management-url` is given (or
  `FLAAP_MQ_MANAGEMENT_URL`): which worker of a silo is active and which are
  standby, the age of the oldest task where the broker tells it, and the
  coordinators' reply queues. AMQP alone cannot list queues or consumers.

With no `--silo` named, the silos are every queue `PREFIX.silo.*` the
management API lists; without the API, AMQP cannot list queues, and the
report says to name the silos. A management API that does not answer (or
refuses the login) does not fail the command: the report holds what AMQP
tells, with a note saying what is missing and why.

A silo is online when at least one worker consumes its queue. The command
exits 1 when a silo it reports on is offline, so scripts and health checks
can use it.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import ipaddress
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions

from flaap_mq.admin.housekeeping import reason_of
from flaap_mq.broker.address import BrokerAddress, parse_broker_urls
from flaap_mq.broker.connect import open_connection
from flaap_mq.broker.urls import redact_url
from flaap_mq.executor.service import HOST_NETWORK_MARK
from flaap_mq.protocol import topology

_DEAD_LETTER_SAMPLE = 200


@dataclasses.dataclass
class Consumer:
    tag: str
    connection: str
    active: bool | None  # None: the broker did not say (no management API)
    # "host" for a worker run with --executor-network=host, whose executor
    # listens on the network (it says so in its connection's name).
    executor_network: str = "sandbox"


@dataclasses.dataclass
class SiloStatus:
    silo_id: str
    queue: str
    exists: bool
    depth: int
    consumers: int
    online: bool
    oldest_task_age_s: float | None = None
    workers: list[Consumer] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Status:
    broker: str
    silos: list[SiloStatus]
    dead_letter_depth: int
    dead_letter_reasons: list[tuple[str, int]]
    reply_queues: list[dict[str, Any]] | None  # None: needs the management API
    # What the report lacks and why (no silos named, management API unreachable).
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def offline(self) -> list[str]:
        return [s.silo_id for s in self.silos if not s.online]


def collect_status(
    broker_url: str,
    silo_ids: Sequence[str],
    *,
    prefix: str = "flaap",
    management_url: str | None = None,
    management_ca_file: str | None = None,
) -> Status:
    names = topology.Names(prefix)
    address = parse_broker_urls(broker_url, connection_name="flaap-mq-status")[0]
    # Checked before anything is sent anywhere: a URL that would expose the
    # password fails at once.
    api = (
        ManagementApi(management_url, address, ca_file=management_ca_file or address.ca_file)
        if management_url
        else None
    )
    # The same one line as every command when the broker cannot be reached.
    connection = open_connection([address])
    notes: list[str] = []
    try:
        silo_ids = list(silo_ids)
        if not silo_ids:
            silo_ids, api = _listed_silos(api, names, notes)
        silos = [_silo_over_amqp(connection, names, s) for s in silo_ids]
        dlq_depth, reasons = _dead_letters(connection, names)
    finally:
        connection.close()
    reply_queues = None
    if api is not None:
        try:
            for silo in silos:
                api.fill_silo(silo)
            reply_queues = api.reply_queues(f"{prefix}.reply.")
        except ManagementUnavailable as e:
            notes.append(_degraded(e))
    return Status(address.redacted, silos, dlq_depth, reasons, reply_queues, notes)


def _listed_silos(
    api: ManagementApi | None, names: topology.Names, notes: list[str]
) -> tuple[list[str], ManagementApi | None]:
    """Every silo with a queue under the prefix, from the management API, and the API still usable.

    Without the API (or when it does not answer), no silos, and a note
    saying to name them: AMQP cannot list queues.
    """
    name_silos = "no silos named: give --silo ID (repeatable) to report on them"
    if api is None:
        notes.append(
            f"{name_silos}, or --management-url to list every silo queue {names.silo_queue('*')}"
        )
        return [], None
    try:
        return api.silo_ids(names), api
    except ManagementUnavailable as e:
        notes.append(f"{_degraded(e)}; {name_silos}")
        return [], None


def _degraded(error: ManagementUnavailable) -> str:
    return (
        f"{error}: showing what AMQP tells (no standby workers, task ages or "
        "coordinators' reply queues)"
    )


def _passive(connection: pika.BlockingConnection, queue: str) -> Any | None:
    channel = connection.channel()
    try:
        method = channel.queue_declare(queue, passive=True).method
    except pika.exceptions.ChannelClosedByBroker:
        return None
    channel.close()
    return method


def _silo_over_amqp(
    connection: pika.BlockingConnection, names: topology.Names, silo_id: str
) -> SiloStatus:
    queue = names.silo_queue(silo_id)
    method = _passive(connection, queue)
    if method is None:
        return SiloStatus(silo_id, queue, False, 0, 0, False)
    # With a single active consumer, a quorum queue counts only the active
    # one here; the management API lists the standbys too.
    return SiloStatus(
        silo_id,
        queue,
        True,
        method.message_count,
        method.consumer_count,
        method.consumer_count > 0,
    )


def _dead_letters(
    connection: pika.BlockingConnection, names: topology.Names
) -> tuple[int, list[tuple[str, int]]]:
    method = _passive(connection, names.dead_letter_queue)
    if method is None:
        return 0, []
    reasons: collections.Counter[str] = collections.Counter()
    channel = connection.channel()
    tags = []
    # Sampled with basic.get and put back unacknowledged: reading the reasons
    # must not take the messages away from the operator.
    for _ in range(min(method.message_count, _DEAD_LETTER_SAMPLE)):
        got, properties, _body = channel.basic_get(names.dead_letter_queue, auto_ack=False)
        if got is None:
            break
        tags.append(got.delivery_tag)
        reasons[reason_of(properties)] += 1
    if tags:
        channel.basic_nack(tags[-1], multiple=True, requeue=True)
    channel.close()
    return method.message_count, reasons.most_common(5)


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


def _describe(worker: Consumer) -> str:
    described = f"{worker.connection} ({'active' if worker.active else 'standby'})"
    if worker.executor_network == "host":
        described += " INSECURE: its executor listens on the network"
    return described


def render_text(status: Status) -> str:
    lines = [f"broker {status.broker}"]
    lines.append(f"  {'silo':<20} {'state':<8} {'tasks':>6} {'oldest':>8}  workers")
    for silo in status.silos:
        state = "online" if silo.online else ("offline" if silo.exists else "no queue")
        oldest = f"{silo.oldest_task_age_s:.0f}s" if silo.oldest_task_age_s is not None else "-"
        if silo.workers:
            workers = ", ".join(_describe(w) for w in silo.workers)
        else:
            workers = f"{silo.consumers} consuming"
        lines.append(f"  {silo.silo_id:<20} {state:<8} {silo.depth:>6} {oldest:>8}  {workers}")
    reasons = ", ".join(f"{reason} x{count}" for reason, count in status.dead_letter_reasons)
    lines.append(
        f"  dead letters: {status.dead_letter_depth}" + (f" ({reasons})" if reasons else "")
    )
    if status.reply_queues is None:
        if not status.notes:  # a note says why, when there is one
            lines.append("  coordinators: (give --management-url to list reply queues)")
    else:
        for q in status.reply_queues:
            lines.append(
                f"  coordinator reply queue {q['queue']}: {q['messages']} messages, "
                f"{q['consumers']} consumers"
            )
    lines.extend(f"  note: {note}" for note in status.notes)
    return "\n".join(lines)


def render_json(status: Status) -> str:
    return json.dumps(dataclasses.asdict(status) | {"offline": status.offline}, indent=2)
