"""The coordinator's side of the wire: publish Tasks, await their TaskResults.

This is RabbitMQ's RPC pattern: each coordinator (job) has its own reply
queue, bound to the replies exchange under its job id; each Task awaited
with `ask` carries `reply_to` (the job id) and a `correlation_id` (the task
id). A reply resolves the asyncio future registered for its correlation id,
on the event loop that is waiting for it, so many requests to many silos are
in flight at once and nothing on any event loop blocks on the network.
A task sent with `send` is one-way: no `reply_to`, nothing awaited but the
broker's confirm (see `silo_executor` for why most requests go that way).

`TaskClient` is the API and wires the parts; each guarantee lives in one:

* `publish`: a task is persistent, its publish confirmed, and it expires in
  the broker at its deadline;
* `calls`: the calls awaited, each with its timeout (cut to the invocation's
  deadline) and at most one chunked transfer, dropped when the call ends;
* `silo_watch`: a silo whose queue has had no consumer for `silo_grace_s` is
  lost to the calls waiting for it, not at their timeout;
* `replies`: a reply settles its call only if it comes from the silo asked
  (as that silo's broker user, with `silo_users`), names the task its
  `correlation_id` does, and is the first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from google.protobuf import message as protobuf_message

from flaap_mq.broker import link as broker_link
from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.credentials import credential_files
from flaap_mq.broker.link import BrokerLink, Delivery
from flaap_mq.coordinator import calls, errors, publish, replies
from flaap_mq.coordinator.outbox import Outbox

# Re-exported: importable from here, as before the watch had its own module.
from flaap_mq.coordinator.silo_watch import CONSUMER_CHECK_INTERVAL_S as CONSUMER_CHECK_INTERVAL_S
from flaap_mq.coordinator.silo_watch import DEFAULT_SILO_GRACE_S, SiloWatch
from flaap_mq.logs import get_logger
from flaap_mq.protocol import chunking, collector, envelope, topology

log = get_logger("flaap_mq.coordinator")

# How long closing waits for each of the broker's answers (consumer
# cancelled, reply queue deleted) before leaving the queue to expire.
_CLOSE_STEP_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class Answer:
    """A silo's response to an awaited request: as it arrived, parsed on first use.

    A large answer stays in the buffer its slices were written into:
    `payload` is a view of it (`coordinator.value_read` reads arrays from it).
    """

    payload: chunking.Buffer
    response_type: type[protobuf_message.Message]
    incarnation: str  # the worker incarnation that answered (see worker.incarnation)

    @functools.cached_property
    def response(self) -> protobuf_message.Message:
        return self.response_type.FromString(self.payload)


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One request sent, as an observer sees it (sizes of the TFF payloads)."""

    silo_id: str
    request: str  # the request's kind, e.g. "CreateValue"
    bytes_sent: int
    bytes_received: int  # 0 for a one-way request, and for one that failed


Observer = Callable[[Exchange], None]


class TaskClient:
    """Sends TFF executor requests to silos over one AMQP connection."""

    def __init__(
        self,
        broker_url: str | None,
        silo_ids: Sequence[str],
        *,
        job_id: str | None = None,
        names: topology.Names | None = None,
        queue_type: topology.QueueType = topology.QueueType.QUORUM,
        task_timeout_s: float = 600.0,
        connect_timeout_s: float = 30.0,
        max_message_bytes: int = broker_link.DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = chunking.DEFAULT_CHUNK_BYTES,
        silo_users: Mapping[str, str] | None = None,
        chunk_limits: collector.Limits | None = None,
        silo_grace_s: float = DEFAULT_SILO_GRACE_S,
        reply_queue_expires_ms: int = topology.DEFAULT_REPLY_QUEUE_EXPIRES_MS,
    ) -> None:
        if not silo_ids:
            raise ValueError("at least one silo id is needed")
        if silo_users is not None:
            missing = [s for s in silo_ids if not silo_users.get(s)]
            if missing:
                raise ValueError(f"silo_users has no broker user for silos {missing}")
            silo_users = {s: silo_users[s] for s in silo_ids}
        self._silo_users = silo_users
        if len(set(silo_ids)) != len(silo_ids):
            raise ValueError(f"silo ids must be distinct, got {list(silo_ids)}")
        self.silo_ids = [topology.validate_id("silo", s) for s in silo_ids]
        self.job_id = topology.validate_id("job", job_id or f"job-{uuid.uuid4().hex[:12]}")
        self.task_timeout_s = task_timeout_s
        if silo_grace_s <= 0:
            raise ValueError(f"silo_grace must be positive, got {silo_grace_s}")
        if reply_queue_expires_ms < 1:
            raise ValueError(
                "the reply queue's expiry must be at least 1 ms (the broker deletes it that "
                f"long after its coordinator is gone), got {reply_queue_expires_ms} ms"
            )
        # How long the broker keeps the reply queue once nobody consumes it (this
        # coordinator died): then it is deleted, with any replies still in it.
        self._reply_queue_expires_ms = int(reply_queue_expires_ms)
        self._names = names or topology.Names()
        self._queue_type = queue_type
        self._connect_timeout_s = connect_timeout_s
        # The calls awaiting replies, and their chunked results' transfers.
        self._calls = calls.CallTable(chunk_limits)
        self._log = log.bind(job=self.job_id)
        addresses = parse_broker_urls(
            broker_url, connection_name=f"flaap-coordinator-{self.job_id}"
        )
        # What gives this coordinator its login: kept from its TFF executor.
        self.credential_files = credential_files(addresses)
        self._link = BrokerLink(
            addresses,
            name=f"coordinator-{self.job_id}",
            declarations=self._declarations,
            max_message_bytes=max_message_bytes,
            on_unavailable=self._calls.fail_all,
        )
        self._watch = SiloWatch(self._link, self._names, self.silo_ids, silo_grace_s, self._log)
        # One-way tasks wait there for the next message to their silo.
        self._outbox = Outbox(self._link, self._names.tasks_exchange, chunk_bytes=chunk_bytes)
        self._observers: list[Observer] = []
        self.requests_sent = 0

    def _declarations(self) -> list[topology.Declaration]:
        return (
            topology.shared_declarations(self._names)
            + topology.silo_declarations(self._names, self.silo_ids, self._queue_type)
            + topology.reply_declarations(
                self._names, self.job_id, expires_ms=self._reply_queue_expires_ms
            )
        )

    def start(self) -> None:
        self._link.start(self._connect_timeout_s)
        self._link.consume(self._names.reply_queue(self.job_id), self._on_reply)
        self._log.info(
            "coordinator_connected",
            broker=self._link.describe_addresses(),
            silos=self.silo_ids,
            reply_queue=self._names.reply_queue(self.job_id),
            reply_users=self._silo_users or "any (no silo_users given)",
        )
        # A silo with no worker is said at once (`silo_has_no_worker`), not
        # after the first call to it has waited out its timeout.
        for silo_id in self.silo_ids:
            self._watch.check(silo_id)

    @property
    def transfer_bytes(self) -> int:
        """What silos' chunked results make this process hold now (for meters and tests).

        Charged as `collector.Collector.pinned_bytes`: never above the
        `chunk_limits`' `max_pending_bytes`, and 0 once no call is waiting.
        """
        return self._calls.transfers.pinned_bytes

    def close(self) -> None:
        """Fails what is pending, deletes the reply queue and closes the connection.

        The reply queue would expire by itself (`x-expires`), as it does when
        a coordinator dies; deleting it leaves the broker as it was at once.
        A reply a worker sends after that is unroutable: the worker logs it
        and acks its task (nobody awaits it any more).
        """
        self._outbox.close()  # the last disposals, say
        self._calls.fail_all(broker_link.LinkClosed("the coordinator was closed"))
        reply_queue = self._names.reply_queue(self.job_id)
        try:
            self._link.stop_consuming().result(_CLOSE_STEP_TIMEOUT_S)
            self._link.delete_queue(reply_queue).result(_CLOSE_STEP_TIMEOUT_S)
        except (broker_link.BrokerError, concurrent.futures.TimeoutError) as e:
            reason = str(e) or f"no answer within {_CLOSE_STEP_TIMEOUT_S:g} s"
            self._log.info("reply_queue_left_to_expire", queue=reply_queue, reason=reason)
        self._link.close()

    # ------------------------------------------------------------------ calls

    def observe(self, observer: Observer) -> None:
        """Calls `observer` for every request sent from now on (for meters)."""
        self._observers.append(observer)

    def _observed(self, exchange: Exchange) -> None:
        for observer in self._observers:
            observer(exchange)

    async def ask(
        self,
        silo_id: str,
        request: envelope.Request,
        *,
        incarnation: str = "",
        timeout_s: float | None = None,
    ) -> Answer:
        """Runs one executor request on `silo_id`; its response, and who answered.

        `incarnation` is the worker incarnation whose executor `request`
        names (empty for GetExecutor).
        """
        request = envelope.serialized(request)
        spec = request.spec
        timeout_s, deadline = self._timeout_now(timeout_s)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[calls.Reply] = loop.create_future()
        task_id = envelope.new_task_id()
        started = time.monotonic()
        pending = calls.PendingCall(loop, future, silo_id, spec.name, started, started + timeout_s)
        self._calls.add(task_id, pending)
        sent = received = 0
        try:
            published, sent = self._publish(
                silo_id, request, task_id, timeout_s, incarnation=incarnation, reply=True
            )
            published.add_done_callback(lambda f: self._on_published(task_id, f))
            result, payload = await self._watch.await_reply(pending, timeout_s, deadline)
            if result.WhichOneof("outcome") == "error":
                raise errors.error_from_result(silo_id, spec.name, result.error)
            if isinstance(payload, collector.Parts):
                try:
                    payload = payload.view()  # checked here, not on the shared I/O thread
                except chunking.ChunkError as e:
                    raise errors.SiloRetryableError(silo_id, spec.name, str(e)) from None
            received = len(payload)
        finally:
            self._calls.forget(task_id)
            self._observed(Exchange(silo_id, spec.name, sent, received))
        self._log.debug(
            "task_done",
            silo=silo_id,
            kind=spec.name,
            task_id=task_id,
            duration_ms=round((time.monotonic() - pending.started) * 1000, 2),
            silo_duration_ms=round(result.duration_us / 1000, 2),
            bytes_out=sent,
            bytes_in=received,
        )
        return Answer(payload, spec.response_type, result.worker_incarnation)

    def _timeout_now(self, timeout_s: float | None) -> tuple[float, calls.Deadline | None]:
        """A task's timeout: `timeout_s` (default the task timeout), cut to the
        invocation's deadline if that comes first (then also that deadline)."""
        return calls.timeout_now(self.task_timeout_s if timeout_s is None else timeout_s)

    def invocation_deadline(self, seconds: float | None) -> contextlib.AbstractContextManager[None]:
        """Every task sent from this context (and the asyncio tasks it starts)
        expires `seconds` from now, in the broker too, and a call still
        waiting then fails with `SiloLostError` (`deadline-<seconds>s`).
        None: no deadline but each task's own timeout."""
        return calls.invocation_deadline(seconds)

    # ------------------------------------------------------- silo consumers

    @property
    def silo_grace_s(self) -> float:
        """How long a silo's queue may have no consumer before its calls fail (`silo_watch`)."""
        return self._watch.grace_s

    @property
    def consumer_check_interval_s(self) -> float:
        """The longest a waiting call's silo goes unasked for its consumers."""
        return self._watch.consumer_check_interval_s

    @consumer_check_interval_s.setter
    def consumer_check_interval_s(self, seconds: float) -> None:
        self._watch.consumer_check_interval_s = seconds

    @property
    def check_interval_s(self) -> float:
        """How often a waiting call's silo is asked for its consumers (`SiloWatch`)."""
        return self._watch.check_interval_s

    def lost_reason(self, silo_id: str) -> str | None:
        """`no-consumer-<grace>s` if the silo's queue has had no consumer for
        `silo_grace_s` (as far as the broker's last answer tells), else None."""
        return self._watch.lost_reason(silo_id)

    def consumers(self, silo_id: str) -> int | None:
        """The consumers of the silo's queue in the broker's last answer (None: unknown)."""
        return self._watch.consumers(silo_id)

    async def refresh_silos(self, silo_ids: Sequence[str]) -> None:
        """Brings what is known of the silos' consumers up to date (`SiloWatch.refresh`)."""
        await self._watch.refresh(silo_ids)

    # ---------------------------------------------------------------- publish

    def send(
        self,
        silo_id: str,
        request: envelope.Request,
        *,
        incarnation: str = "",
        task_id: str | None = None,
    ) -> concurrent.futures.Future[None]:
        """Publishes a one-way request: no reply, nothing waits for one.

        Returns a future that resolves once the broker holds every part of
        the task, or fails with a `SiloError` saying why it could not be
        sent. Safe from any thread, the garbage collector's included (value
        finalizers dispose of values through here). A Create* request's
        `task_id` names the value it makes.
        """
        task_id = task_id or envelope.new_task_id()
        request = envelope.serialized(request)
        name = request.spec.name
        timeout_s, _ = self._timeout_now(None)
        published, size = self._publish(
            silo_id, request, task_id, timeout_s, incarnation=incarnation, reply=False
        )
        self._observed(Exchange(silo_id, name, size, 0))
        return publish.confirmed(published, silo_id, name)

    @property
    def messages_published(self) -> int:
        """AMQP messages this client has published with tasks (a batch is one)."""
        return self._outbox.messages_published

    def _publish(
        self,
        silo_id: str,
        request: envelope.SerializedRequest,
        task_id: str,
        timeout_s: float,
        *,
        incarnation: str,
        reply: bool,
    ) -> tuple[concurrent.futures.Future[None], int]:
        """Hands the task to the `outbox`: the broker's confirm of it, and its size."""
        self.requests_sent += 1
        out = publish.outgoing(
            request,
            job_id=self.job_id,
            silo_id=silo_id,
            task_id=task_id,
            timeout_s=timeout_s,
            incarnation=incarnation,
            reply=reply,
        )
        return self._outbox.send(out), len(request.payload)

    def _on_published(self, task_id: str, published: concurrent.futures.Future[None]) -> None:
        error = published.exception()
        if error is None:
            return
        pending = self._calls.get(task_id)
        if pending is None:
            return
        pending.settle(None, publish.publish_error(pending.silo_id, pending.request, error))

    # ---------------------------------------------------------------- replies

    def _on_reply(self, delivery: Delivery) -> None:
        """Runs on the I/O thread for every message in our reply queue.

        `replies.take` settles the call the reply answers, or says why it
        dropped it; logged here.
        """
        self._link.ack(delivery)
        dropped = replies.take(self._calls, delivery.body, delivery.properties, self._silo_users)
        if dropped is not None:
            getattr(self._log, dropped.level)(dropped.event, **dropped.fields)
