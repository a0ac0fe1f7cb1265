"""`flaap-mq status`: is each silo online, how much waits for it, what went wrong.

Two sources, so that it works on any broker:

* AMQP (always): each silo queue's depth and consumer count, the dead-letter
  queue's depth and its most common reasons (sampled and requeued).
* RabbitMQ's management API, when `--management-url` is given (or
  `FLAAP_MQ_MANAGEMENT_URL`): which worker of a silo is active and which are
  standby, the age of the oldest task where the broker tells it, and the
  coordinators' reply queues. AMQP alone cannot list queues or consumers.

A silo is online when at least one worker consumes its queue. The command
exits 1 when a silo named with `--silo` is offline, so scripts and health
checks can use it.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions

from flaap_mq.broker.urls import BrokerAddress, parse_broker_urls
from flaap_mq.protocol import topology

_DEAD_LETTER_SAMPLE = 200


@dataclasses.dataclass
class Consumer:
    tag: str
    connection: str
    active: bool | None  # None: the broker did not say (no management API)


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

    @property
    def offline(self) -> list[str]:
        return [s.silo_id for s in self.silos if not s.online]


def collect_status(
    broker_url: str,
    silo_ids: Sequence[str],
    *,
    prefix: str = "flaap",
    management_url: str | None = None,
) -> Status:
    names = topology.Names(prefix)
    address = parse_broker_urls(broker_url, connection_name="flaap-mq-status")[0]
    connection = _connect(address)
    try:
        silos = [_silo_over_amqp(connection, names, s) for s in silo_ids]
        dlq_depth, reasons = _dead_letters(connection, names)
    finally:
        connection.close()
    reply_queues = None
    if management_url:
        api = ManagementApi(management_url, address)
        for silo in silos:
            api.fill_silo(silo)
        reply_queues = api.reply_queues(f"{prefix}.reply.")
    return Status(address.redacted, silos, dlq_depth, reasons, reply_queues)


def _connect(address: BrokerAddress) -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(address.parameters())
    except pika.exceptions.ProbableAuthenticationError:
        raise ValueError(f"broker at {address.redacted} refused the login") from None
    except pika.exceptions.ProbableAccessDeniedError:
        raise ValueError(f"broker at {address.redacted} refused access to the vhost") from None
    except pika.exceptions.AMQPConnectionError as e:
        raise ValueError(f"no broker answered at {address.redacted}: {e!r}") from None


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
        reasons[_reason(properties)] += 1
    if tags:
        channel.basic_nack(tags[-1], multiple=True, requeue=True)
    channel.close()
    return method.message_count, reasons.most_common(5)


def _reason(properties: pika.BasicProperties) -> str:
    headers = properties.headers or {}
    if "x-flaap-reason" in headers:
        reason = str(headers["x-flaap-reason"])
        return reason.split(":", 1)[0]  # "malformed: <details>" -> "malformed"
    deaths = headers.get("x-death") or []
    if deaths:
        return str(deaths[0].get("reason", "unknown"))
    return "unknown"


class ManagementApi:
    """The few calls of RabbitMQ's HTTP API that status needs."""

    def __init__(self, url: str, address: BrokerAddress) -> None:
        self._base = url.rstrip("/")
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
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise ValueError(
                f"management API at {self._base} answered {e.code}: {e.reason}"
            ) from None
        except OSError as e:
            raise ValueError(f"management API at {self._base} did not answer: {e}") from None

    def fill_silo(self, silo: SiloStatus) -> None:
        queue = self._get(f"queues/{self._vhost}/{urllib.parse.quote(silo.queue, safe='')}")
        if not queue:
            return
        details = queue.get("consumer_details") or []
        silo.workers = [
            Consumer(
                tag=d.get("consumer_tag", "?"),
                connection=(d.get("channel_details") or {}).get("connection_name", "?"),
                active=d.get("activity_status", "single_active") in ("single_active", "up"),
            )
            for d in details
        ]
        silo.consumers = max(silo.consumers, len(details))
        silo.online = silo.consumers > 0
        head = queue.get("head_message_timestamp")
        if head:
            silo.oldest_task_age_s = max(0.0, time.time() - float(head))

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


def render_text(status: Status) -> str:
    lines = [f"broker {status.broker}"]
    lines.append(f"  {'silo':<20} {'state':<8} {'tasks':>6} {'oldest':>8}  workers")
    for silo in status.silos:
        state = "online" if silo.online else ("offline" if silo.exists else "no queue")
        oldest = f"{silo.oldest_task_age_s:.0f}s" if silo.oldest_task_age_s is not None else "-"
        if silo.workers:
            workers = ", ".join(
                f"{w.connection} ({'active' if w.active else 'standby'})" for w in silo.workers
            )
        else:
            workers = f"{silo.consumers} consuming"
        lines.append(f"  {silo.silo_id:<20} {state:<8} {silo.depth:>6} {oldest:>8}  {workers}")
    reasons = ", ".join(f"{reason} x{count}" for reason, count in status.dead_letter_reasons)
    lines.append(
        f"  dead letters: {status.dead_letter_depth}" + (f" ({reasons})" if reasons else "")
    )
    if status.reply_queues is None:
        lines.append("  coordinators: (give --management-url to list reply queues)")
    else:
        for q in status.reply_queues:
            lines.append(
                f"  coordinator reply queue {q['queue']}: {q['messages']} messages, "
                f"{q['consumers']} consumers"
            )
    return "\n".join(lines)


def render_json(status: Status) -> str:
    return json.dumps(dataclasses.asdict(status) | {"offline": status.offline}, indent=2)
