"""One AMQP connection, owned by one I/O thread, shared by a whole process.

Both the coordinator and the worker talk to the broker through a
`BrokerLink`. pika objects are not thread-safe, so every pika call happens on
the link's own thread; other threads (TFF's event loops, the worker's task
threads, garbage-collector finalizers) hand work over with
`add_callback_threadsafe`, which wakes the I/O loop at once: nothing here
polls on a timer.

The guarantees the link makes, each in one place:

* **publish** resolves its future only when the broker confirms the message
  (publisher confirms), and fails it when the broker refuses it (nack), or
  has said nothing for `confirm_timeout` seconds (a quorum queue without
  its majority; `trouble` then says so). A message the broker cannot route
  (mandatory flag) fails its future with `Unroutable`. A message not yet confirmed when the
  connection drops is published again on the next connection, so a publish is
  at-least-once; receivers deduplicate by task id. `all_settled` tells an
  owner about to close when no publish awaits its confirm any more. The
  bookkeeping (delivery tags, timeouts, nacks, returns) is
  `flaap_mq.broker.confirms.ConfirmTracker`.
* **consume** hands each delivery to the owner with the channel generation it
  came from; `ack` of a delivery from an older channel is dropped, because
  the broker has already requeued it.
* **reconnect**: a lost connection is retried with bounded, jittered
  exponential backoff (tenacity), over every URL given (cluster fail-over);
  topology and consumers are declared again on each new channel. After
  `unavailable_after` seconds without a broker, pending and new publishes
  fail with `BrokerUnavailable` instead of waiting, while reconnecting goes on.
* **declare** (`declare="auto"`): the topology is declared on each channel;
  when the broker refuses that with ACCESS_REFUSED (a user without configure
  permission, on a broker whose administrator loaded the topology), the link
  logs `topology_declared_passively` once and from then on only checks that
  the shared exchanges and queues exist (`flaap_mq.broker.declare`,
  `passive=True`); a missing one stops the link with an error naming it.
  `declare="passive"` starts that way, `"active"` never falls back.
* **refusals** retrying cannot fix (a wrong password, an unknown vhost, an
  untrusted broker certificate, a permission the user lacks) stop the link
  with one `BrokerRefused` line naming what is wrong. A queue whose node or
  majority is down is an outage, retried like a lost connection, and
  reported as what it is, not as an unreachable broker. Which close is
  which is `flaap_mq.broker.refusals.classify`.

Why this is one module of over 400 lines: what remains here is a single
state machine, the pika callbacks of one I/O thread over one connection and
its current channel (`_channel`, `_generation`, `_ready`, `_closing`,
`_outage`, `_unavailable`), each callback moving it from one state to the
next; split across modules, each part would reach into the same attributes
and the transitions would no longer read in one place. The parts that need
none of that state live apart and are tested without a broker: publisher
confirms (`confirms.py`), what a broker's close means (`refusals.py`), the
declarations (`declare.py`), URLs and connect failures (`urls.py`, `address.py`,
`connect.py`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.adapters.select_connection
import pika.exceptions
import pika.spec
import tenacity

from flaap_mq.broker import refusals
from flaap_mq.broker.address import BrokerAddress
from flaap_mq.broker.confirms import DEFAULT_CONFIRM_TIMEOUT_S, ConfirmTracker, Outgoing
from flaap_mq.broker.connect import describe_unreachable, explain_connect_failure, root_cause
from flaap_mq.broker.declare import declare_async, missing_message
from flaap_mq.broker.errors import (
    BrokerError,
    BrokerRefused,
    BrokerUnavailable,
    LinkClosed,
    MessageTooLarge,
    Unroutable,
)
from flaap_mq.broker.errors import describe as _describe
from flaap_mq.logs import get_logger
from flaap_mq.protocol import topology

log = get_logger("flaap_mq.broker")

# RabbitMQ's default max_message_size (3.10): a bigger message closes the
# channel, taking every other message in flight with it, so it is refused
# before it is sent.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Delivery:
    body: bytes
    properties: pika.spec.BasicProperties
    delivery_tag: int
    redelivered: bool
    queue: str
    # Which channel the delivery came on; see `BrokerLink.ack`.
    generation: int


@dataclasses.dataclass(frozen=True)
class QueueCounts:
    """What a passive declare tells of a queue (`BrokerLink.queue_counts`)."""

    messages: int
    consumers: int


@dataclasses.dataclass(frozen=True)
class _Consumer:
    queue: str
    on_delivery: Callable[[Delivery], None]


class _ConnectionDropped(Exception):
    """An open connection was lost: the reconnect budget starts afresh."""


class _ConnectFailed(Exception):
    """A connection attempt failed."""


class BrokerLink:
    """A process's AMQP connection; see the module docstring."""

    def __init__(
        self,
        addresses: Sequence[BrokerAddress],
        *,
        name: str,
        declarations: Callable[[], Sequence[topology.Declaration]] = list,
        prefetch: int = 0,
        unavailable_after: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_unavailable: Callable[[BaseException], None] | None = None,
        on_returned: Callable[[pika.spec.BasicProperties, str], None] | None = None,
        declare: str = "auto",
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT_S,
    ) -> None:
        if not addresses:
            raise ValueError("at least one broker address is needed")
        if declare not in ("auto", "active", "passive"):
            raise ValueError(f"declare must be 'auto', 'active' or 'passive', got {declare!r}")
        self._declare_mode = declare
        self._passive = declare == "passive"
        self._address: BrokerAddress | None = None
        self._addresses = list(addresses)
        self._name = name
        self._declarations = declarations
        self._prefetch = prefetch
        self._unavailable_after = unavailable_after
        self._sweep_timer: Any = None  # runs `_sweep_overdue` while confirms are awaited
        self.max_message_bytes = max_message_bytes
        self._on_unavailable = on_unavailable
        self._on_returned = on_returned
        self._log = log.bind(link=name)
        # Every publish not yet confirmed, queued or sent (`confirms.py`).
        self._confirms = ConfirmTracker(confirm_timeout, log=self._log)

        self._ioloop = pika.adapters.select_connection.IOLoop()
        self._thread: threading.Thread | None = None
        self._connection: pika.SelectConnection | None = None
        self._channel: Any = None
        self._generation = 0
        self._ready = False  # channel open, topology declared, consumers on
        self._closing = False
        self._unavailable: BaseException | None = None
        self._fatal: BaseException | None = None
        self._last_error = ""
        self._down_since: float | None = None
        self._was_ready = False  # this connection got as far as consuming
        # Why the last attempt failed when the broker answered but a queue we
        # need was down (`_on_outage`); None when no broker answered.
        self._outage: refusals.Refusal | None = None
        self._home_node_down_reported = False  # see `_on_outage`
        self._started = threading.Event()
        self._stopped = threading.Event()

        self._consumers: list[_Consumer] = []
        self._cancel_waiters: list[concurrent.futures.Future[None]] = []
        self._deletes: list[concurrent.futures.Future[None]] = []

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Connects, declares the topology and starts consumers, or raises.

        Raises `BrokerRefused` at once for a wrong password or vhost (retrying
        will not help) and `BrokerUnavailable` when no broker answered within
        `timeout` seconds.
        """
        self._thread = threading.Thread(target=self._run, name=f"amqp-{self._name}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            outage = self._outage
            error = self._fatal or BrokerUnavailable(
                f"{outage.explain()}; not ready within {timeout:.0f} s"
                if outage is not None
                else f"no broker answered at {self.describe_addresses()} within {timeout:.0f} s"
                + (f" (last error: {self._last_error})" if self._last_error else "")
            )
            self.close()
            raise error
        if self._fatal is not None:
            self.close()
            raise self._fatal

    def close(self, timeout: float = 10.0) -> None:
        """Cancels consumers, closes the connection and joins the I/O thread.

        A broker that does not answer the close within `timeout` (one busy
        with queues that lost their quorum, say) is left: the I/O loop is
        stopped under the connection, whose socket goes with it.
        """
        if self._thread is None:
            return
        self._ioloop.add_callback_threadsafe(self._begin_close)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._log.warning("broker_close_unanswered", timeout_s=timeout)
            self._ioloop.add_callback_threadsafe(self._ioloop.stop)
            self._thread.join(timeout)
        if self._thread.is_alive():
            self._log.warning("amqp_thread_did_not_stop", timeout_s=2 * timeout)
        self._thread = None

    def describe_addresses(self) -> str:
        return ", ".join(a.redacted for a in self._addresses)

    @property
    def connected(self) -> bool:
        return self._ready

    def trouble(self, routing_key: str | None = None) -> str | None:
        """Why the broker is not taking this link's messages right now; None when it is.

        A queue we need down with its node or its quorum (`_on_outage`), the
        connection lost and not back yet, or publishes left unconfirmed past
        `confirm_timeout` (to `routing_key`, or to any key when None). Owners
        use it to not blame a peer for the broker's outage (a silo whose
        queue shows no consumer because the queue has no quorum is not a silo
        whose worker is gone), and to say why a call went unanswered. Safe
        from any thread: each attribute is read once.
        """
        outage = self._outage
        if outage is not None:
            return outage.explain()
        down_since = self._down_since
        if down_since is not None:
            return (
                f"no connection to the broker at {self.describe_addresses()} for "
                f"{time.monotonic() - down_since:.0f} s (last error: {self._last_error})"
            )
        return self._confirms.trouble(routing_key)

    @property
    def failure(self) -> BaseException | None:
        """Why the link stopped for good (e.g. the broker refused the topology), if it did."""
        return self._fatal

    # ------------------------------------------------------------ public API

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.spec.BasicProperties,
        *,
        mandatory: bool = True,
    ) -> concurrent.futures.Future[None]:
        """Publishes from any thread; the future resolves on the broker's confirm."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        if len(body) > self.max_message_bytes:
            future.set_exception(
                MessageTooLarge(
                    f"message of {len(body)} bytes for {exchange or 'default'}/{routing_key} is "
                    f"over the broker's limit of {self.max_message_bytes} bytes; not sent"
                )
            )
            return future
        if self._unavailable is not None:
            future.set_exception(self._unavailable)
            return future
        if self._stopped.is_set():
            future.set_exception(LinkClosed(f"link {self._name} is closed"))
            return future
        out = Outgoing(exchange, routing_key, body, properties, mandatory, future)
        self._ioloop.add_callback_threadsafe(lambda: self._send(out))
        return future

    def consume(self, queue: str, on_delivery: Callable[[Delivery], None]) -> None:
        """Consumes `queue` now and after every reconnect.

        `on_delivery` runs on the I/O thread: it must hand the work off and
        return at once.
        """
        consumer = _Consumer(queue, on_delivery)
        self._ioloop.add_callback_threadsafe(lambda: self._add_consumer(consumer))

    def stop_consuming(self) -> concurrent.futures.Future[None]:
        """Cancels every consumer; the future resolves once the broker agreed."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._stopped.is_set():
            done.set_result(None)  # a closed link consumes nothing
            return done
        self._cancel_waiters.append(done)
        self._ioloop.add_callback_threadsafe(lambda: self._cancel_consumers(done))
        return done

    def all_settled(self) -> concurrent.futures.Future[None]:
        """Resolves once no publish waits for the broker's confirm any more.

        For an owner about to `close()`: closing first fails every publish
        not yet confirmed with `LinkClosed`, although the broker may have
        taken it (a worker then logged `reply_not_confirmed` for a reply its
        coordinator did receive, and left the task unacked). Checked on the
        I/O thread, after the sends of every earlier `publish`, and the done
        callbacks of confirmed publishes run before it resolves, so whatever
        they queue (an ack) reaches the broker before a later close. Also
        resolves once a lost broker has failed what was pending, and at once
        on a closed link; the caller bounds the wait.
        """
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._stopped.is_set():
            done.set_result(None)
            return done

        self._ioloop.add_callback_threadsafe(lambda: self._confirms.add_settled_waiter(done))
        return done

    def ack(self, delivery: Delivery) -> None:
        self._ioloop.add_callback_threadsafe(lambda: self._settle(delivery, ack=True))

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        self._ioloop.add_callback_threadsafe(
            lambda: self._settle(delivery, ack=False, requeue=requeue)
        )

    def queue_counts(self, queue: str) -> concurrent.futures.Future[QueueCounts]:
        """How many messages wait in `queue` and how many consumers it has, from the broker.

        A passive `queue.declare` on a channel of its own, opened and closed
        for this one question, so that a missing queue (which closes the
        channel asking) never disturbs the channel tasks and replies use. The
        future fails with `BrokerError` when the queue is missing or the link
        is not connected.
        """
        future: concurrent.futures.Future[QueueCounts] = concurrent.futures.Future()
        if self._stopped.is_set():
            future.set_exception(LinkClosed(f"link {self._name} is closed"))
            return future
        self._ioloop.add_callback_threadsafe(lambda: self._ask_queue_counts(queue, future))
        return future

    def delete_queue(self, queue: str) -> concurrent.futures.Future[None]:
        """Deletes `queue` (one the owner declared for itself); resolves on the broker's ok.

        Stop consuming it first (`stop_consuming`): the broker cancels a
        consumer of a deleted queue, and a cancelled consumer makes the link
        open a new channel, which declares the queue again.
        """
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._stopped.is_set():
            future.set_exception(LinkClosed(f"link {self._name} is closed; {queue} not deleted"))
            return future
        self._ioloop.add_callback_threadsafe(lambda: self._delete_queue(queue, future))
        return future

    # ------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        addresses = itertools.cycle(self._addresses)
        try:
            while not self._closing and self._fatal is None:
                try:
                    for attempt in tenacity.Retrying(
                        retry=tenacity.retry_if_exception_type(_ConnectFailed),
                        wait=tenacity.wait_exponential_jitter(initial=0.2, max=5.0, jitter=0.5),
                        sleep=self._sleep_unless_closing,
                        before_sleep=self._before_reconnect,
                    ):
                        with attempt:
                            self._run_connection(next(addresses))
                    return
                except _ConnectionDropped:
                    self._down_since = time.monotonic()
                    continue
        finally:
            self._fail_everything(LinkClosed(f"link {self._name} is closed"))
            for waiter in self._cancel_waiters:
                if not waiter.done():
                    waiter.set_result(None)  # no connection, no consumers
            self._confirms.wake_settled_waiters()  # nothing is pending any more
            self._stopped.set()
            self._started.set()
            self._ioloop.close()

    def _sleep_unless_closing(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._closing and time.monotonic() < deadline:
            # Keep serving queued callbacks (a close request) while we wait;
            # after a close the next attempt returns at once.
            timer = self._ioloop.call_later(
                max(0.0, min(0.1, deadline - time.monotonic())), self._ioloop.stop
            )
            self._ioloop.start()
            self._ioloop.remove_timeout(timer)

    def _before_reconnect(self, state: tenacity.RetryCallState) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        down_for = time.monotonic() - self._down_since
        wait = state.next_action.sleep if state.next_action else 0.0
        self._log.warning(
            "broker_reconnecting",
            attempt=state.attempt_number,
            down_for_s=round(down_for, 1),
            retry_in_s=round(wait, 2),
            error=self._last_error,
        )
        if down_for >= self._unavailable_after and self._unavailable is None:
            if self._outage is not None:
                # A broker answered: saying none is reachable would send the
                # operator to the network instead of the cluster's nodes.
                what = f"{self._outage.explain()} (for {down_for:.0f} s)"
            else:
                what = (
                    f"no broker reachable at {self.describe_addresses()} for {down_for:.0f} s "
                    f"(last error: {self._last_error})"
                )
            error = BrokerUnavailable(f"{what}; still retrying")
            self._unavailable = error
            self._log.error("broker_unavailable", down_for_s=round(down_for, 1))
            self._fail_everything(error)
            if self._on_unavailable is not None:
                self._on_unavailable(error)

    def _run_connection(self, address: BrokerAddress) -> None:
        """Runs one connection until it closes; raises to say how it ended."""
        if self._closing:
            return
        self._was_ready = False
        self._address = address
        try:
            parameters = address.parameters()
        except ValueError as e:  # e.g. a certificate file removed since start
            self._fatal = BrokerRefused(str(e))
            return
        self._connection = pika.SelectConnection(
            parameters=parameters,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )
        self._ioloop.start()
        self._connection = None
        self._channel = None
        self._ready = False
        if self._closing or self._fatal is not None:
            return
        if self._was_ready:
            raise _ConnectionDropped()
        # Never ready (no broker, or one that refused what we need): a failed
        # attempt, so the outage clock keeps running across attempts.
        raise _ConnectFailed(self._last_error)

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, _connection: Any, error: BaseException) -> None:
        self._outage = None  # this attempt found no broker: say that, not an older outage
        # The same line a command prints for this failure (`describe_unreachable`).
        self._last_error = (
            describe_unreachable(self._address, error)
            if self._address
            else _describe(root_cause(error))
        )
        # A wrong password or vhost, or an untrusted certificate: retrying
        # will not help, so say what is wrong, once, and stop.
        refusal = explain_connect_failure(self._address, error) if self._address else None
        if refusal is not None:
            self._fatal = BrokerRefused(refusal)
        self._ioloop.stop()

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        refusal = refusals.from_close(reason)
        if refusal is not None and refusal.is_outage:
            # E.g. declaring a quorum queue without a majority of nodes up
            # closes the connection (541 ... cluster_not_formed).
            self._outage = refusal
            self._last_error = refusal.explain()
        elif not isinstance(reason, pika.exceptions.ConnectionClosedByClient):
            # When we closed it (see `_on_outage`), the reason worth
            # reporting is the one that made us close it.
            self._outage = None
            self._last_error = _describe(reason)
        if not self._closing:
            self._log.warning("broker_connection_lost", reason=self._last_error)
        self._channel_lost()
        self._ioloop.stop()

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        self._confirms.channel_opened()
        self._generation += 1
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_ok)

    def _on_confirm_ok(self, _frame: Any) -> None:
        channel = self._channel
        try:
            declare_async(
                channel, list(self._declarations()), self._on_declared, passive=self._passive
            )
        except Exception as e:  # a bad declaration list is the caller's bug: stop loudly
            self._fatal = BrokerRefused(f"could not declare the topology: {e}")
            self._begin_close()

    def _on_declared(self) -> None:
        if self._prefetch:
            self._channel.basic_qos(prefetch_count=self._prefetch, callback=self._on_qos)
        else:
            self._on_qos(None)

    def _on_qos(self, _frame: Any) -> None:
        for consumer in self._consumers:
            self._start_consumer(consumer)
        self._ready = self._was_ready = True
        self._outage = None
        if self._unavailable is not None or self._down_since is not None:
            self._log.info("broker_reconnected", url=self._connection_url())
        self._unavailable = None
        self._down_since = None
        self._home_node_down_reported = False
        # Everything not confirmed on the lost channel goes out again first.
        while (out := self._confirms.next_queued()) is not None:
            self._send(out)
        self._started.set()

    def _connection_url(self) -> str:
        params = getattr(self._connection, "params", None)
        return f"{params.host}:{params.port}" if params else "?"

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        if isinstance(reason, pika.exceptions.ConnectionClosed):
            # pika closes every channel with the connection's own reason
            # first: that close is `_on_connection_closed`'s to handle (a 320
            # while declaring is a reconnect, not a refused topology).
            self._channel_lost()
            return
        self._last_error = _describe(reason)
        declaring = not self._ready
        refusal = refusals.from_close(reason)
        if refusal is not None and refusal.cause is refusals.Cause.TOO_LARGE:
            self._learn_size_limit(refusal)  # before `_channel_lost` sorts out what was too large
        self._channel_lost()
        if self._closing:
            return
        if refusal is None:  # closed by pika (e.g. a consumer cancelled): a new channel
            self._log.warning("channel_closed", reason=self._last_error)
            self._reopen_channel()
            return
        match refusal.cause:
            case refusals.Cause.QUEUE_HOME_DOWN | refusals.Cause.NO_QUORUM:
                self._on_outage(refusal)
            case refusals.Cause.PERMISSION if (
                declaring and self._declare_mode == "auto" and not self._passive
            ):
                # No configure permission: the administrator owns the topology.
                self._passive = True
                self._log.info(
                    "topology_declared_passively",
                    reason=refusal.text,
                    note="this user may not declare the shared topology; checking that it exists",
                )
                self._reopen_channel()
            case refusals.Cause.PERMISSION:
                # A new channel would be refused the same way.
                self._stop_for_good(
                    f"broker refused user {self._username()!r}: {refusal.text}", "broker_refused"
                )
            case refusals.Cause.NOT_FOUND if self._passive:
                # Topology this user may not create, and nobody loaded.
                self._stop_for_good(missing_message(refusal.text), "broker_refused")
            case refusals.Cause.TOO_LARGE:
                self._reopen_channel()
            case _ if declaring:
                # A refused declaration (e.g. a queue that exists with other
                # arguments) would be refused again: report it, do not loop.
                self._stop_for_good(
                    f"broker refused the topology: {refusal.text} (a queue or exchange exists "
                    "with other settings; see docs/topology.md on migrating)"
                    if refusal.cause is refusals.Cause.MISMATCH
                    else f"broker closed the channel while declaring: {self._last_error}",
                    "topology_refused",
                )
            case _:
                self._log.warning("channel_closed", reason=self._last_error)
                self._reopen_channel()

    def _on_outage(self, refusal: refusals.Refusal) -> None:
        """The broker answers, but a queue we need is down with its node(s).

        It comes back with them, so this is an outage, not a refusal: the
        connection is closed and the attempt counts as a failed connection
        (backoff, and after `unavailable_after` callers get a
        `BrokerUnavailable` that names the queue and the cause). It used to
        stop the link for good, and every call then waited out its task
        timeout (found by tests/faults/test_cluster_node_loss.py).
        """
        self._outage = refusal
        self._last_error = refusal.explain()
        self._log.warning("queue_unavailable", cause=refusal.cause.value, reason=refusal.text)
        if (
            refusal.cause is refusals.Cause.QUEUE_HOME_DOWN
            and self._on_unavailable is not None
            and not self._home_node_down_reported
        ):
            # A classic queue: the broker confirms, then drops, what is routed
            # to it while its node is down, so replies owed to pending calls
            # may be gone. Fail those now (retryable); new calls wait for the
            # queue. (A quorum queue keeps what it confirmed: nothing to fail.)
            self._home_node_down_reported = True
            self._on_unavailable(
                BrokerUnavailable(f"{self._last_error}; replies sent meanwhile are lost")
            )
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _reopen_channel(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.channel(on_open_callback=self._on_channel_open)

    def _stop_for_good(self, message: str, event: str) -> None:
        self._fatal = BrokerRefused(message)
        self._log.error(event, reason=self._last_error)
        self._begin_close()

    def _username(self) -> str:
        return self._address.username if self._address else "?"

    def _channel_lost(self) -> None:
        """Queues every unconfirmed message to go out again on the next channel."""
        self._ready = False
        self._channel = None
        deletes, self._deletes = self._deletes, []
        for future in deletes:
            if not future.done():
                future.set_exception(BrokerError("the channel closed before the queue was deleted"))
        # Those over the limit the broker just told (`_learn_size_limit`) fail.
        self._confirms.requeue_unconfirmed(self.max_message_bytes)

    def _learn_size_limit(self, refusal: refusals.Refusal) -> None:
        """Lowers `max_message_bytes` to the broker's own limit when it refused a message.

        A broker configured with a `max_message_size` below what we were told
        closes the channel on a bigger message. Without this, that message was
        published again on every new channel and its caller waited for its
        timeout; now it fails with `MessageTooLarge` (`_channel_lost`) and
        later ones are refused before sending (found by
        tests/faults/test_message_size.py).
        """
        limit = refusal.limit_bytes
        if limit is not None and limit < self.max_message_bytes:
            self._log.warning("broker_message_size_limit", limit_bytes=limit)
            self.max_message_bytes = limit

    def _ask_queue_counts(self, queue: str, future: concurrent.futures.Future[QueueCounts]) -> None:
        connection = self._connection
        if future.done():
            return
        if connection is None or not connection.is_open or not self._ready:
            future.set_exception(BrokerError(f"not connected to the broker; {queue} not checked"))
            return

        def on_closed(_channel: Any, reason: BaseException) -> None:
            if not future.done():
                future.set_exception(BrokerError(f"{queue} not checked: {_describe(reason)}"))

        def on_open(channel: Any) -> None:
            def on_declare_ok(frame: Any) -> None:
                method = frame.method
                if not future.done():
                    future.set_result(QueueCounts(method.message_count, method.consumer_count))
                if channel.is_open:
                    channel.close()

            channel.add_on_close_callback(on_closed)
            channel.queue_declare(queue, passive=True, callback=on_declare_ok)

        try:
            connection.channel(on_open_callback=on_open)
        except pika.exceptions.AMQPError as e:
            if not future.done():
                future.set_exception(BrokerError(f"{queue} not checked: {_describe(e)}"))

    def _delete_queue(self, queue: str, future: concurrent.futures.Future[None]) -> None:
        channel = self._channel
        if channel is None or not self._ready or not channel.is_open:
            future.set_exception(BrokerError(f"not connected to the broker; {queue} not deleted"))
            return
        self._deletes.append(future)  # failed by `_channel_lost` if the channel goes first

        def on_deleted(_frame: Any) -> None:
            if future in self._deletes:
                self._deletes.remove(future)
            if not future.done():
                future.set_result(None)

        channel.queue_delete(queue, callback=on_deleted)

    def _add_consumer(self, consumer: _Consumer) -> None:
        self._consumers.append(consumer)
        if self._ready:
            self._start_consumer(consumer)

    def _start_consumer(self, consumer: _Consumer) -> None:
        generation = self._generation
        queue = consumer.queue

        def on_message(_ch: Any, method: Any, properties: Any, body: bytes) -> None:
            consumer.on_delivery(
                Delivery(
                    body, properties, method.delivery_tag, method.redelivered, queue, generation
                )
            )

        self._channel.basic_consume(queue, on_message, auto_ack=False)

    def _cancel_consumers(self, done: concurrent.futures.Future[None]) -> None:
        self._consumers.clear()
        channel = self._channel
        if channel is None or not self._ready or not channel.consumer_tags:
            done.set_result(None)
            return
        tags = list(channel.consumer_tags)
        remaining = set(tags)

        def cancelled(tag: str) -> Callable[[Any], None]:
            def callback(_frame: Any) -> None:
                remaining.discard(tag)
                if not remaining and not done.done():
                    done.set_result(None)

            return callback

        for tag in tags:
            channel.basic_cancel(tag, callback=cancelled(tag))

    def _on_consumer_cancelled(self, frame: Any) -> None:
        # The broker cancels a consumer when its queue is deleted or, for a
        # quorum queue, when it cannot serve it; a fresh channel re-declares
        # the queue and consumes again.
        self._log.warning("consumer_cancelled_by_broker", tag=frame.method.consumer_tag)
        if self._channel is not None and self._channel.is_open:
            self._channel.close()

    def _settle(self, delivery: Delivery, *, ack: bool, requeue: bool = False) -> None:
        channel = self._channel
        if channel is None or delivery.generation != self._generation or not channel.is_open:
            # The broker requeued it when the old channel closed.
            return
        if ack:
            channel.basic_ack(delivery.delivery_tag)
        else:
            channel.basic_reject(delivery.delivery_tag, requeue=requeue)

    def _send(self, out: Outgoing) -> None:
        if out.future.done():
            return
        if self._unavailable is not None:
            out.future.set_exception(self._unavailable)
            return
        if not self._ready or self._channel is None:
            self._confirms.queue(out)
            return
        tag = self._confirms.track(out)
        if self._sweep_timer is None:
            self._sweep_timer = self._ioloop.call_later(1.0, self._sweep_overdue)
        try:
            self._channel.basic_publish(
                out.exchange, out.routing_key, out.body, out.properties, mandatory=out.mandatory
            )
        except (
            pika.exceptions.ChannelWrongStateError,
            pika.exceptions.ChannelClosed,
            pika.exceptions.ConnectionClosed,
            pika.exceptions.ConnectionWrongStateError,
        ) as e:  # channel closed under us: it goes out again
            self._log.warning("publish_deferred", error=_describe(e))
        except Exception as e:
            # pika could not encode the message (e.g. a header value it decodes
            # but has no encoder for, such as a double another client sent), so
            # nothing went out and the broker will never confirm this tag. Give
            # the tag back, or every later confirm on this channel would settle
            # the wrong message (found by tests/faults/test_poison.py).
            self._confirms.untrack(tag)
            out.future.set_exception(
                BrokerError(f"message for {out.routing_key!r} could not be encoded: {_describe(e)}")
            )

    def _sweep_overdue(self) -> None:
        """Fails publishes the broker has left unconfirmed (`ConfirmTracker.sweep`).

        Runs every second while any publish awaits its confirm.
        """
        self._sweep_timer = None
        self._confirms.sweep()
        if self._confirms.awaiting_confirm and not self._closing:
            self._sweep_timer = self._ioloop.call_later(1.0, self._sweep_overdue)

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        reason = f"{method.reply_text} (exchange {method.exchange!r}, key {method.routing_key!r})"
        self._confirms.returned(properties, reason)
        if self._on_returned is not None:
            self._on_returned(properties, reason)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        self._confirms.confirmed(
            method.delivery_tag,
            multiple=bool(method.multiple),
            acked=isinstance(method, pika.spec.Basic.Ack),
        )

    def _fail_everything(self, error: BaseException) -> None:
        self._confirms.fail_all(error)

    def _begin_close(self) -> None:
        self._closing = True
        self._consumers.clear()
        connection = self._connection
        # pika connections have no `is_opening`: that check raised
        # AttributeError on the I/O thread when closing during a reconnect.
        if connection is not None and not (connection.is_closing or connection.is_closed):
            try:
                connection.close()
            except pika.exceptions.ConnectionWrongStateError:
                self._ioloop.stop()
        else:
            self._ioloop.stop()


def all_confirmed(
    futures: list[concurrent.futures.Future[None]],
) -> concurrent.futures.Future[None]:
    """One future for several publishes: done when all are, failed if any failed."""
    if len(futures) == 1:
        return futures[0]
    combined: concurrent.futures.Future[None] = concurrent.futures.Future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(future: concurrent.futures.Future[None]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        error = future.exception()
        if error is not None and not combined.done():
            combined.set_exception(error)
        elif last and not combined.done():
            combined.set_result(None)

    for future in futures:
        future.add_done_callback(one_done)
    return combined


def confirmed_in_window(
    publish: Callable[[int], concurrent.futures.Future[None]], count: int, window: int
) -> concurrent.futures.Future[None]:
    """Publishes messages 0 to `count - 1`, at most `window` unconfirmed at a time.

    `publish(i)` makes message `i` and publishes it; it is called for the
    first `window` messages at once, then for the next one each time one is
    confirmed (on whatever thread the confirm arrives, the link's I/O
    thread), so at most `window` of them are held at once, here and in
    pika's buffers. Messages reach `publish` in index order whatever thread
    calls it: the receiver puts slices together in order, and a confirm
    arriving while the caller was still making message i must not send i+1
    first. One future: done when all are confirmed, failed with the first
    failure, after which nothing more is published.
    """
    combined: concurrent.futures.Future[None] = concurrent.futures.Future()
    lock = threading.Lock()  # the counters
    in_order = threading.Lock()  # held from taking an index to handing its message on
    state = {"next": 0, "confirmed": 0, "ended": False}

    def end(error: BaseException | None) -> None:
        with lock:
            if state["ended"]:
                return
            state["ended"] = True
        if error is None:
            combined.set_result(None)
        else:
            combined.set_exception(error)

    def publish_next() -> None:
        with in_order:
            with lock:
                if state["ended"] or state["next"] >= count:
                    return
                index = state["next"]
                state["next"] += 1
            try:
                future = publish(index)
            except Exception as e:
                future, error = None, e
        if future is None:
            end(error)
            return
        # Outside `in_order`: a future already settled runs `one_done` here and now.
        future.add_done_callback(one_done)

    def one_done(future: concurrent.futures.Future[None]) -> None:
        error = future.exception()
        if error is not None:
            end(error)
            return
        with lock:
            state["confirmed"] += 1
            last = state["confirmed"] == count
        if last:
            end(None)
        else:
            publish_next()

    if count == 0:
        end(None)
    for _ in range(min(max(1, window), count)):
        publish_next()
    return combined


def default_properties(**kwargs: Any) -> pika.BasicProperties:
    """Persistent message properties; every task and result is persistent."""
    return pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, **kwargs)


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "BrokerError",
    "BrokerLink",
    "BrokerRefused",
    "BrokerUnavailable",
    "Delivery",
    "LinkClosed",
    "MessageTooLarge",
    "QueueCounts",
    "Unroutable",
    "all_confirmed",
    "default_properties",
]
