"""The coordinator's side of the wire: publish Tasks, await their TaskResults.

This is RabbitMQ's RPC pattern: each coordinator (job) has its own reply
queue, bound to the replies exchange under its job id; each Task awaited
with `ask` carries `reply_to` (the job id) and a `correlation_id` (the task
id). A reply resolves the asyncio future registered for its correlation id,
on the event loop that is waiting for it, so many requests to many silos are
in flight at once and nothing on any event loop blocks on the network.
A task sent with `send` is one-way: no `reply_to`, nothing awaited but the
broker's confirm (see `silo_executor` for why most requests go that way).

The guarantees live here:

* a task is persistent, its publish confirmed (`BrokerLink`), and it expires
  in the broker at its deadline, so a silo that comes back late finds it
  dead-lettered rather than runs it;
* the caller waits at most `timeout_s` and then gets a `SiloTimeoutError`
  naming the silo and the request;
* a silo whose queue has had no consumer for `silo_grace_s` is *lost*: its
  calls fail with `SiloLostError` (reason `no-consumer-<grace>s`) then, not at
  the task timeout; a standby worker taking over keeps a consumer on the
  queue and is no loss. Within `invocation_deadline(seconds)` every task
  expires (in the broker too) by that deadline, and a call still waiting
  then fails with `SiloLostError` (reason `deadline-<seconds>s`);
* a reply is accepted only from the silo the task was sent to, and only if
  its body names the task its `correlation_id` does; late and duplicate
  replies (a task redelivered after its reply) are dropped;
* a large result's slices are collected in one `chunking.Collector` within
  its `Limits`, at most one transfer per awaited call (keyed by its task
  id), dropped when the call ends however it ends: a silo can make the
  coordinator hold no more than `Limits.max_transfer_bytes` (and bookkeeping)
  per call it was asked to answer, and all silos together no more than
  `Limits.max_pending_bytes`;
* with `silo_users` (silo id -> broker user), a reply is accepted only if its
  AMQP `user_id` is the user of the silo the task was sent to. The broker
  refuses any message whose `user_id` is not its sender's login, so a silo
  cannot answer for another. Without `silo_users` (local development, one
  shared `guest` login) any user is accepted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence

from google.protobuf import message as protobuf_message

from flaap_mq.broker import link as broker_link
from flaap_mq.broker.link import BrokerLink, Delivery, default_properties
from flaap_mq.broker.urls import credential_files, parse_broker_urls
from flaap_mq.coordinator import errors
from flaap_mq.logs import get_logger
from flaap_mq.protocol import amqp, chunking, envelope, topology
from flaap_mq.protocol.v1 import task_pb2

log = get_logger("flaap_mq.coordinator")

# While a call waits, its silo's queue is asked for its consumers this often
# (at most; one question per silo, shared by all its calls): a silo whose
# worker is gone is reported within this many seconds, not at the timeout.
CONSUMER_CHECK_INTERVAL_S = 5.0
# How long closing waits for each of the broker's answers (consumer
# cancelled, reply queue deleted) before leaving the queue to expire.
_CLOSE_STEP_TIMEOUT_S = 5.0
# How long a timed-out call waits for the broker to say whether anyone
# consumes its silo's queue, for its error message (only on that path).
_CONSUMER_CHECK_TIMEOUT_S = 2.0
# A silo whose queue has had no consumer this long is lost to the calls
# waiting for it (`SiloLostError`), unless told otherwise (`silo_grace_s`).
DEFAULT_SILO_GRACE_S = 60.0


@dataclasses.dataclass(frozen=True)
class _Deadline:
    at: float  # time.monotonic()
    seconds: float  # as given, for the reason (`deadline-30s`)


# The deadline of the invocation the current task belongs to (see
# `TaskClient.invocation_deadline`); asyncio tasks inherit it.
_INVOCATION_DEADLINE: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar(
    "flaap_mq_invocation_deadline", default=None
)


@dataclasses.dataclass
class _SiloWatch:
    """What this coordinator knows of whether a silo's queue has a consumer."""

    probe: concurrent.futures.Future[broker_link.QueueCounts] | None = None
    probed_at: float = float("-inf")  # time.monotonic() the last probe started
    consumers: int | None = None  # None: not known (yet)
    warned: bool = False  # `silo_has_no_worker` logged since a consumer was last seen
    # time.monotonic() of the first answer "no consumer" since one was last
    # seen (None: a consumer was seen in the last answer, or nothing is known).
    no_consumer_since: float | None = None


@dataclasses.dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[_Reply]
    silo_id: str
    request: str
    started: float
    expires_at: float  # time.monotonic() at the call's deadline
    # A reply (or chunk error) has settled the call: later slices are dropped.
    answered: bool = False


@dataclasses.dataclass(frozen=True)
class Answer:
    """A silo's response to an awaited request."""

    response: protobuf_message.Message
    incarnation: str  # the worker incarnation that answered (see worker.incarnation)


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One request sent, as an observer sees it (sizes of the TFF payloads)."""

    silo_id: str
    request: str  # the request's kind, e.g. "CreateValue"
    bytes_sent: int
    bytes_received: int  # 0 for a one-way request, and for one that failed


Observer = Callable[[Exchange], None]

# What a reply resolves a call with: the result, and its response payload
# (a view of the message, or the slices of a chunked one, joined by the caller).
_Reply = tuple[task_pb2.TaskResult, memoryview | chunking.Parts]


def _set_outcome(
    future: asyncio.Future[_Reply],
    result: _Reply | None,
    error: BaseException | None,
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


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
        chunk_limits: chunking.Limits | None = None,
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
        self.silo_grace_s = silo_grace_s
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
        self._chunk_bytes = chunk_bytes
        # What silos' chunked results may make this process hold (`chunking`).
        self._collector = chunking.Collector(chunk_limits)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._watches = {s: _SiloWatch() for s in self.silo_ids}
        self.consumer_check_interval_s = CONSUMER_CHECK_INTERVAL_S
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
            on_unavailable=self._fail_all_pending,
        )
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
            self._check_silo(silo_id)

    @property
    def transfer_bytes(self) -> int:
        """What silos' chunked results make this process hold now (for meters and tests).

        Charged as `chunking.Collector.pinned_bytes`: never above the
        `chunk_limits`' `max_pending_bytes`, and 0 once no call is waiting.
        """
        return self._collector.pinned_bytes

    def close(self) -> None:
        """Fails what is pending, deletes the reply queue and closes the connection.

        The reply queue would expire by itself (`x-expires`), as it does when
        a coordinator dies; deleting it leaves the broker as it was at once.
        A reply a worker sends after that is unroutable: the worker logs it
        and acks its task (nobody awaits it any more).
        """
        self._fail_all_pending(broker_link.LinkClosed("the coordinator was closed"))
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

    async def call(
        self,
        silo_id: str,
        request: envelope.Request,
        *,
        incarnation: str = "",
        timeout_s: float | None = None,
    ) -> protobuf_message.Message:
        """Runs one executor request on `silo_id` and returns its response."""
        answer = await self.ask(silo_id, request, incarnation=incarnation, timeout_s=timeout_s)
        return answer.response

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
        future: asyncio.Future[_Reply] = loop.create_future()
        task_id = envelope.new_task_id()
        started = time.monotonic()
        pending = _Pending(loop, future, silo_id, spec.name, started, started + timeout_s)
        with self._lock:
            self._pending[task_id] = pending
        sent = received = 0
        try:
            published, sent = self._publish(
                silo_id, request, task_id, timeout_s, incarnation=incarnation, reply=True
            )
            for part in published:
                part.add_done_callback(lambda f: self._on_published(task_id, f))
            result, payload = await self._wait(pending, task_id, timeout_s, deadline)
            if result.WhichOneof("outcome") == "error":
                raise errors.error_from_result(silo_id, spec.name, result.error)
            if isinstance(payload, chunking.Parts):
                try:
                    payload = payload.join()  # here, not on the I/O thread every silo shares
                except chunking.ChunkError as e:
                    raise errors.SiloRetryableError(silo_id, spec.name, str(e)) from None
            received = len(payload)
            response = spec.response_type()
            response.ParseFromString(payload)
        finally:
            self._forget(task_id)
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
        return Answer(response, result.worker_incarnation)

    def _timeout_now(self, timeout_s: float | None) -> tuple[float, _Deadline | None]:
        """A task's timeout: `timeout_s` (default the task timeout), cut to the
        invocation's deadline if that comes first (then also that deadline)."""
        timeout_s = self.task_timeout_s if timeout_s is None else timeout_s
        deadline = _INVOCATION_DEADLINE.get()
        if deadline is not None:
            remaining = deadline.at - time.monotonic()
            if remaining < timeout_s:
                return max(0.001, remaining), deadline
        return timeout_s, None

    @contextlib.contextmanager
    def invocation_deadline(self, seconds: float | None) -> Iterator[None]:
        """Every task sent from this context (and the asyncio tasks it starts)
        expires `seconds` from now, in the broker too, and a call still
        waiting then fails with `SiloLostError` (`deadline-<seconds>s`).
        None: no deadline but each task's own timeout."""
        if seconds is None:
            yield
            return
        token = _INVOCATION_DEADLINE.set(_Deadline(time.monotonic() + seconds, seconds))
        try:
            yield
        finally:
            _INVOCATION_DEADLINE.reset(token)

    async def _wait(
        self, pending: _Pending, task_id: str, timeout_s: float, by: _Deadline | None = None
    ) -> _Reply:
        """The call's reply, or `SiloTimeoutError` after `timeout_s`.

        While it waits, the silo's queue is checked for a consumer every
        `check_interval_s` (`_check_silo`, which warns), without
        delaying the reply or moving the deadline. Once the queue has had no
        consumer for `silo_grace_s`, the call fails with `SiloLostError`; if
        `by` (the invocation's deadline) ends the wait, likewise.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self.lost_reason(pending.silo_id) is not None:
            # Known lost: ask again before saying so (its worker may be back).
            await self._has_no_consumer(pending.silo_id)
        while True:
            self._raise_if_lost(pending)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            done, _ = await asyncio.wait(
                {pending.future}, timeout=min(remaining, self.check_interval_s)
            )
            if done:
                return pending.future.result()
            if loop.time() < deadline:
                self._check_silo(pending.silo_id)
        if not pending.future.done():
            pending.future.cancel()
        if by is not None:
            reason = f"deadline-{by.seconds:g}s"
            self._log.warning(
                "silo_lost", silo=pending.silo_id, reason=reason, request=pending.request
            )
            raise errors.SiloLostError(
                pending.silo_id,
                pending.request,
                reason,
                f"no answer by the invocation's deadline ({by.seconds:g} s): lost to this "
                "invocation; its tasks expire with that deadline",
            )
        message = f"no answer within the task timeout of {timeout_s:g} s"
        if await self._has_no_consumer(pending.silo_id):
            message += "; " + self._no_worker_hint(pending.silo_id)
        raise errors.SiloTimeoutError(pending.silo_id, pending.request, message)

    # ------------------------------------------------------- silo consumers

    @property
    def check_interval_s(self) -> float:
        """How often a waiting call's silo is asked for its consumers: at most
        `consumer_check_interval_s`, and often enough to tell a silo lost
        within about a quarter of `silo_grace_s` after its grace."""
        return min(self.consumer_check_interval_s, max(0.25, self.silo_grace_s / 4))

    def lost_reason(self, silo_id: str) -> str | None:
        """`no-consumer-<grace>s` if the silo's queue has had no consumer for
        `silo_grace_s` (as far as the broker's last answer tells), else None."""
        with self._lock:
            since = self._watches[silo_id].no_consumer_since
        if since is None or time.monotonic() - since < self.silo_grace_s:
            return None
        if self._link.trouble(silo_id) is not None:
            # The broker is not taking messages (e.g. its queues lost their
            # quorum): no worker can consume then, and the silo is not to
            # blame. The calls fail with the broker's own cause instead.
            return None
        return f"no-consumer-{self.silo_grace_s:g}s"

    def _raise_if_lost(self, pending: _Pending) -> None:
        reason = self.lost_reason(pending.silo_id)
        if reason is None:
            return
        if not pending.future.done():
            pending.future.cancel()
        self._log.warning("silo_lost", silo=pending.silo_id, reason=reason, request=pending.request)
        raise errors.SiloLostError(
            pending.silo_id,
            pending.request,
            reason,
            f"lost ({reason}): no worker has consumed "
            f"{self._names.silo_queue(pending.silo_id)} for {self.silo_grace_s:g} s "
            "(silo_grace); its tasks expire by their deadline. "
            + self._no_worker_hint(pending.silo_id),
        )

    def consumers(self, silo_id: str) -> int | None:
        """The consumers of the silo's queue in the broker's last answer (None: unknown)."""
        with self._lock:
            return self._watches[silo_id].consumers

    async def refresh_silos(self, silo_ids: Sequence[str]) -> None:
        """Brings what is known of the silos' consumers up to date (`consumers`, `lost_reason`).

        Asks the broker again about every silo not known to have a consumer
        (so one whose worker came back is seen), waiting at most 2 s for
        the answers; silos known to have one are refreshed in the background
        (at most every `check_interval_s`).
        """
        asked = []
        for silo_id in silo_ids:
            with self._lock:
                consumers = self._watches[silo_id].consumers
            if consumers:
                self._check_silo(silo_id)
            else:
                asked.append(asyncio.wrap_future(self._check_silo(silo_id, fresh=True)))
        if asked:
            # Shielded: the probes are shared; an unanswered one is judged by the last answer.
            await asyncio.wait(
                [asyncio.shield(a) for a in asked], timeout=_CONSUMER_CHECK_TIMEOUT_S
            )

    def _no_worker_hint(self, silo_id: str) -> str:
        """What a silo without a worker means, and the commands that fix and check it."""
        prefix = "" if self._names.prefix == "flaap" else f" --prefix {self._names.prefix}"
        return (
            f"no worker is consuming {self._names.silo_queue(silo_id)}: start one on that "
            f"silo (flaap-mq worker --silo-id {silo_id}{prefix}) and check with "
            f"`flaap-mq status --silo {silo_id}{prefix}`"
        )

    def _check_silo(
        self, silo_id: str, *, fresh: bool = False
    ) -> concurrent.futures.Future[broker_link.QueueCounts]:
        """Asks the broker (passive declare) how many consumers the silo's queue has.

        One question per silo at a time, at most one per
        `consumer_check_interval_s` unless `fresh`: the future of the
        question in flight or just answered is shared. When the answer is no
        consumer, logs `silo_has_no_worker` (a warning naming the queue and
        the command to run), once until a consumer is seen again.
        """
        now = time.monotonic()
        with self._lock:
            watch = self._watches[silo_id]
            probe = watch.probe
            if probe is not None and (
                not probe.done() or (not fresh and now - watch.probed_at < self.check_interval_s)
            ):
                return probe
            probe = self._link.queue_counts(self._names.silo_queue(silo_id))
            watch.probe, watch.probed_at = probe, now
        probe.add_done_callback(lambda done: self._on_silo_checked(silo_id, done))
        return probe

    def _on_silo_checked(
        self, silo_id: str, done: concurrent.futures.Future[broker_link.QueueCounts]
    ) -> None:
        error = "cancelled" if done.cancelled() else done.exception()
        if error is not None:
            self._log.debug("silo_check_failed", silo=silo_id, error=str(error))
            return
        counts = done.result()
        with self._lock:
            watch = self._watches[silo_id]
            watch.consumers = counts.consumers
            if counts.consumers > 0:
                watch.no_consumer_since = None
            elif watch.no_consumer_since is None:
                watch.no_consumer_since = watch.probed_at
            warn = counts.consumers == 0 and not watch.warned
            came_back = counts.consumers > 0 and watch.warned
            watch.warned = counts.consumers == 0
        if warn:
            self._log.warning(
                "silo_has_no_worker",
                silo=silo_id,
                queue=self._names.silo_queue(silo_id),
                tasks_waiting=counts.messages,
                fix=self._no_worker_hint(silo_id),
            )
        elif came_back:
            self._log.info("silo_worker_consuming", silo=silo_id, consumers=counts.consumers)

    async def _has_no_consumer(self, silo_id: str) -> bool:
        """True if the broker says (now, else in its last answer) that nobody consumes the queue."""
        probe = self._check_silo(silo_id, fresh=True)
        with contextlib.suppress(Exception):
            # Shielded: the probe is shared, and a cancelled one could not be answered.
            counts = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(probe)), _CONSUMER_CHECK_TIMEOUT_S
            )
            return counts.consumers == 0
        with self._lock:
            return self._watches[silo_id].consumers == 0

    def _forget(self, task_id: str) -> None:
        """Ends a call: its pending entry goes, and with it any partial transfer for it.

        Called however the call ends (answered, failed, timed out, cancelled,
        not even sent), under the lock `_on_reply` collects slices under, so
        no slice can start a transfer for a call already over.
        """
        with self._lock:
            self._pending.pop(task_id, None)
            self._collector.discard(task_id)

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
        parts, size = self._publish(
            silo_id, request, task_id, timeout_s, incarnation=incarnation, reply=False
        )
        self._observed(Exchange(silo_id, name, size, 0))
        sent: concurrent.futures.Future[None] = concurrent.futures.Future()

        def settle(done: concurrent.futures.Future[None]) -> None:
            error = done.exception()
            if error is None:
                sent.set_result(None)
            else:
                sent.set_exception(self._publish_error(silo_id, name, error))

        broker_link.all_confirmed(parts).add_done_callback(settle)
        return sent

    def _publish(
        self,
        silo_id: str,
        request: envelope.SerializedRequest,
        task_id: str,
        timeout_s: float,
        *,
        incarnation: str,
        reply: bool,
    ) -> tuple[list[concurrent.futures.Future[None]], int]:
        """Publishes the task, split into chunks if its request is large.

        Returns the publish futures of its messages, and the request's size.
        """
        task = envelope.task_envelope(
            kind=request.spec.kind,
            job_id=self.job_id,
            silo_id=silo_id,
            task_id=task_id,
            deadline_unix_ms=envelope.deadline_after(timeout_s),
            incarnation=incarnation,
        )
        self.requests_sent += 1
        messages = envelope.encode_task(task, request.payload, self._chunk_bytes)
        futures = [
            self._link.publish(
                self._names.tasks_exchange,
                silo_id,
                message,
                default_properties(
                    **amqp.task_properties(
                        task_id=task_id,
                        kind_name=envelope.kind_name(task.kind),
                        reply_to=self.job_id if reply else None,
                        timeout_s=timeout_s,
                        index=i,
                        count=len(messages),
                    )
                ),
            )
            for i, message in enumerate(messages)
        ]
        return futures, len(request.payload)

    def _on_published(self, task_id: str, published: concurrent.futures.Future[None]) -> None:
        error = published.exception()
        if error is None:
            return
        with self._lock:
            pending = self._pending.get(task_id)
        if pending is None:
            return
        self._resolve(pending, None, self._publish_error(pending.silo_id, pending.request, error))

    @staticmethod
    def _publish_error(silo_id: str, request: str, error: BaseException) -> errors.SiloError:
        if isinstance(error, broker_link.MessageTooLarge):
            return errors.MessageTooLargeError(silo_id, request, str(error))
        if isinstance(error, broker_link.Unroutable):
            return errors.SiloProtocolError(
                silo_id,
                request,
                f"the broker has no queue for this silo ({error}); was it deleted?",
            )
        return errors.SiloRetryableError(
            silo_id, request, f"task not delivered to the broker: {error}"
        )

    # ---------------------------------------------------------------- replies

    def _on_reply(self, delivery: Delivery) -> None:
        """Runs on the I/O thread for every message in our reply queue.

        A reply settles the call its `correlation_id` names, if its body
        names the same task and it comes from the silo asked (and that
        silo's broker user, `_from_silo_user`); anything else is logged and
        dropped before it can touch the call, or fill its transfer.
        """
        self._link.ack(delivery)
        try:
            result, payload = envelope.read_result(delivery.body)
        except envelope.MalformedEnvelope as e:
            self._log.warning("reply_malformed", error=str(e))
            return
        task_id = delivery.properties.correlation_id
        if task_id != result.task_id:
            self._log.warning(
                "reply_id_mismatch",
                correlation_id=task_id,
                task_id=result.task_id,
                silo=result.silo_id,
                note="dropped: a reply's body must name the task its correlation_id names",
            )
            return
        with self._lock:
            pending = self._pending.get(task_id)
            if pending is None or pending.answered:
                # A reply to a disposal, a second reply to a redelivered task,
                # or more slices for a call already settled.
                self._log.debug("reply_unclaimed", task_id=task_id, silo=result.silo_id)
                return
            if result.silo_id != pending.silo_id:
                self._log.warning(
                    "reply_from_wrong_silo",
                    task_id=task_id,
                    expected=pending.silo_id,
                    got=result.silo_id,
                )
                return
            if not self._from_silo_user(pending, delivery, task_id):
                return
            reply: _Reply | None = (result, payload)
            error: BaseException | None = None
            if chunking.is_chunked(result.chunk):
                reply, error = self._collect_slice(pending, result, payload)
                if reply is None and error is None:
                    return
            pending.answered = True
        self._resolve(pending, reply, error)

    def _from_silo_user(self, pending: _Pending, delivery: Delivery, task_id: str) -> bool:
        """True if the reply's broker-checked `user_id` is the asked silo's user."""
        if self._silo_users is None:
            return True
        expected = self._silo_users[pending.silo_id]
        user = delivery.properties.user_id
        if user == expected:
            return True
        self._log.warning(
            "reply_from_wrong_user",
            task_id=task_id,
            silo=pending.silo_id,
            expected_user=expected,
            user=user,
            note="dropped: only the silo a task was sent to may answer it",
        )
        return False

    def _collect_slice(
        self, pending: _Pending, part: task_pb2.TaskResult, payload: memoryview
    ) -> tuple[_Reply | None, BaseException | None]:
        """Stores one slice of a call's large result: the reply once all are in, or why not.

        Runs under `self._lock`, so the call cannot end (and `_forget` drop
        its transfer) between the check that it is pending and the slice
        stored. The transfer is keyed by the call's task id, so each call has
        at most one, and it expires with the call's deadline. Only collected
        here: `ask` joins and checks the slices, off the I/O thread.
        """
        try:
            parts = self._collector.add(
                part.task_id, part.chunk, payload, expires_at=pending.expires_at
            )
        except chunking.ChunkError as e:
            self._log.warning(
                "reply_chunks_invalid", task_id=part.task_id, silo=pending.silo_id, error=str(e)
            )
            return None, errors.SiloRetryableError(pending.silo_id, pending.request, str(e))
        if parts is None:
            return None, None
        part.ClearField("chunk")
        return (part, parts), None

    def _resolve(
        self,
        pending: _Pending,
        result: _Reply | None,
        error: BaseException | None,
    ) -> None:
        # RuntimeError: the caller's event loop is closed; nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            pending.loop.call_soon_threadsafe(_set_outcome, pending.future, result, error)

    def _fail_all_pending(self, error: BaseException) -> None:
        with self._lock:
            pending = list(self._pending.values())
        for p in pending:
            self._resolve(
                p, None, errors.SiloRetryableError(p.silo_id, p.request, f"broker: {error}")
            )
