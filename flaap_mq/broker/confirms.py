"""Publisher confirms: which messages the broker has yet to take, and what became of each.

`BrokerLink` publishes with confirms on; this is its bookkeeping, kept apart
from pika so that it can be tested without a broker
(tests/unit/test_confirms.py). Everything here runs on the link's I/O thread,
except `trouble`, which any thread may call.

A message (`Outgoing`) is *queued* while no channel can take it, then
*tracked* under its channel's delivery tag once sent, until the broker:

* acks it: its future resolves, or fails with `Unroutable` when the broker
  returned it first (a mandatory message no queue took);
* nacks it: its future fails with `BrokerError` (a full queue, or one without
  its quorum);
* says nothing for `confirm_timeout` seconds *and* has confirmed nothing
  else for as long (`sweep`): its future fails, and `trouble` names its
  routing key until a later message to that key is acked, or a new channel
  opens.

A channel lost with messages unconfirmed sends them again, first, on the
next one (`requeue_unconfirmed`); a link that gives up fails them all
(`fail_all`). `add_settled_waiter` resolves a future once nothing is queued
or unconfirmed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pika.spec

from flaap_mq.broker.errors import BrokerError, MessageTooLarge, Unroutable
from flaap_mq.logs import get_logger

# A publish the broker has neither confirmed nor refused this long after it
# was sent fails (`ConfirmTracker.sweep`). A quorum queue whose leader is up
# but whose majority is down can commit nothing, and says nothing either: the
# publisher would wait forever. A healthy broker confirms within milliseconds;
# a 16 MiB slice within a second here.
DEFAULT_CONFIRM_TIMEOUT_S = 30.0
# Each message carries its own id in this header, so that a message the
# broker returns (basic.return carries no delivery tag) is matched to its
# publish.
PUBLISH_ID_HEADER = "x-flaap-publish-id"


@dataclasses.dataclass
class Outgoing:
    """One message to publish, with the future its publisher waits on."""

    exchange: str
    routing_key: str
    body: bytes
    properties: pika.spec.BasicProperties
    mandatory: bool
    future: concurrent.futures.Future[None]
    returned: str | None = None  # why the broker returned it, until its confirm
    sent_at: float = 0.0  # clock() of its last send, for `ConfirmTracker.sweep`

    @property
    def destination(self) -> str:
        return f"{self.exchange or 'amq.default'}/{self.routing_key}"


class ConfirmTracker:
    """The messages of one link not yet confirmed; see the module docstring."""

    def __init__(
        self,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT_S,
        *,
        log: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.confirm_timeout = confirm_timeout
        self._log = log if log is not None else get_logger("flaap_mq.broker")
        self._clock = clock
        self._queued: deque[Outgoing] = deque()  # waiting for a channel
        self._unconfirmed: dict[int, Outgoing] = {}  # delivery tag -> message
        self._next_tag = 1
        self._publish_ids = itertools.count(1)
        self._by_publish_id: dict[int, Outgoing] = {}
        # When the broker last confirmed anything on this channel (or the
        # channel opened): a backlog the broker works through is no outage.
        self._last_confirm_at = 0.0
        # Routing key -> why: set when a publish to it went unconfirmed past
        # `confirm_timeout` (`sweep`), cleared by the next ack of a message
        # to that key, and on a new channel.
        self._not_confirming: dict[str, str] = {}
        self._settled_waiters: list[concurrent.futures.Future[None]] = []

    # ------------------------------------------------------------ queued

    def queue(self, out: Outgoing) -> None:
        """Keeps `out` until a channel can take it (`next_queued`)."""
        self._queued.append(out)

    def next_queued(self) -> Outgoing | None:
        """The oldest queued message, taken from the queue; None when none is."""
        return self._queued.popleft() if self._queued else None

    # ------------------------------------------------------------ per channel

    def channel_opened(self) -> None:
        """A new channel: its delivery tags start at 1 and nothing on it is overdue yet."""
        self._last_confirm_at = self._clock()
        self._not_confirming.clear()
        self._next_tag = 1

    def track(self, out: Outgoing) -> int:
        """Records `out` as sent now; its delivery tag.

        Stamps its publish id on its headers: call before sending it.
        """
        publish_id = next(self._publish_ids)
        headers = dict(out.properties.headers or {})
        headers[PUBLISH_ID_HEADER] = publish_id
        out.properties.headers = headers
        tag = self._next_tag
        self._next_tag += 1
        self._unconfirmed[tag] = out
        self._by_publish_id[publish_id] = out
        out.sent_at = self._clock()
        return tag

    def untrack(self, tag: int) -> None:
        """Forgets the last message tracked, which never went out; its tag is reused.

        The broker will never confirm it, and a tag left taken would make
        every later confirm on the channel settle the wrong message.
        """
        out = self._unconfirmed.pop(tag)
        self._by_publish_id.pop(_publish_id(out), None)
        self._next_tag = tag

    @property
    def awaiting_confirm(self) -> bool:
        """True while a message sent on this channel awaits the broker's answer."""
        return bool(self._unconfirmed)

    # ------------------------------------------------------------ the broker's answers

    def returned(self, properties: pika.spec.BasicProperties, reason: str) -> None:
        """The broker returned a message (no queue took it); its confirm follows."""
        out = self._by_publish_id.get((properties.headers or {}).get(PUBLISH_ID_HEADER))
        if out is not None:
            out.returned = reason

    def confirmed(self, delivery_tag: int, *, multiple: bool, acked: bool) -> None:
        """The broker's ack (or nack, `acked=False`) of one tag, or of all up to it."""
        if multiple:
            tags = [t for t in self._unconfirmed if t <= delivery_tag]
        else:
            tags = [delivery_tag] if delivery_tag in self._unconfirmed else []
        self._last_confirm_at = self._clock()
        for tag in tags:
            out = self._unconfirmed.pop(tag)
            if acked:
                self._not_confirming.pop(out.routing_key, None)
            self._by_publish_id.pop(_publish_id(out), None)
            if out.future.done():
                continue
            if not acked:
                out.future.set_exception(
                    BrokerError(
                        f"broker refused (nack) a message for {out.destination}: the queue it "
                        "was routed to is full (its max-length-bytes policy rejects publishes; "
                        "retry once its consumer has caught up) or has no quorum (a majority of "
                        "the cluster's nodes is down; it takes messages again when enough are "
                        "back, see docs/deploy.md)"
                    )
                )
            elif out.returned is not None:
                out.future.set_exception(Unroutable(out.returned))
            else:
                out.future.set_result(None)
        self.wake_settled_waiters()

    def sweep(self) -> None:
        """Fails the messages the broker has left unconfirmed too long.

        A message fails once it has waited `confirm_timeout` s and the broker
        has confirmed nothing on this channel for as long: a broker working
        through a backlog (large slices, flow control) keeps confirming, one
        that cannot take messages (a quorum queue without its majority, a
        memory alarm) says nothing. The broker may still take such a message
        later; the caller has been told it failed, and its retry is a new
        task with a new id (a late copy runs until its own deadline and its
        reply is dropped). The link calls this every second while
        `awaiting_confirm`.
        """
        now = self._clock()
        overdue: list[Outgoing] = []
        if now - self._last_confirm_at > self.confirm_timeout:
            for tag, out in list(self._unconfirmed.items()):
                if now - out.sent_at > self.confirm_timeout:
                    del self._unconfirmed[tag]
                    self._by_publish_id.pop(_publish_id(out), None)
                    overdue.append(out)
        for out in overdue:
            # Before the futures fail: their callbacks may ask `trouble`.
            self._not_confirming[out.routing_key] = (
                f"the broker has confirmed nothing for {self.confirm_timeout:g} s, messages "
                f"to {out.destination} included: the queue cannot take them now (a quorum "
                "queue without a majority of its nodes up, or a broker in a memory or disk "
                "alarm)"
            )
        for out in overdue:
            if not out.future.done():
                out.future.set_exception(
                    BrokerError(
                        f"the broker has not confirmed a message for {out.destination} within "
                        f"{self.confirm_timeout:g} s: the queue it was routed to cannot take "
                        "it now; a quorum queue does not when a majority of the cluster's "
                        "nodes is down (it resumes when enough are back, see docs/deploy.md), "
                        "nor does a broker in a memory or disk alarm"
                    )
                )
        if overdue:
            self._log.warning(
                "publish_not_confirmed", messages=len(overdue), timeout_s=self.confirm_timeout
            )
            self.wake_settled_waiters()

    def trouble(self, routing_key: str | None = None) -> str | None:
        """Why messages to `routing_key` (any key when None) go unconfirmed; None if they do not.

        Safe from any thread: the attribute is read once.
        """
        stuck = dict(self._not_confirming)
        if routing_key is not None:
            return stuck.get(routing_key)
        return next(iter(stuck.values()), None)

    # ------------------------------------------------------------ a lost channel, a lost link

    def requeue_unconfirmed(self, max_message_bytes: int) -> None:
        """The channel is gone: its unconfirmed messages go out again first, in order.

        Those over `max_message_bytes` (a limit the broker just told, closing
        the channel) fail with `MessageTooLarge` instead: sending them again
        would only close the channel again.
        """
        pending = [self._unconfirmed[tag] for tag in sorted(self._unconfirmed)]
        self._unconfirmed.clear()
        self._by_publish_id.clear()
        for out in pending:
            out.returned = None
        for out in pending:
            if len(out.body) > max_message_bytes:
                out.future.set_exception(
                    MessageTooLarge(
                        f"message of {len(out.body)} bytes for {out.exchange or 'default'}/"
                        f"{out.routing_key} was refused by the broker: over its limit of "
                        f"{max_message_bytes} bytes (max_message_size)"
                    )
                )
        pending = [out for out in pending if len(out.body) <= max_message_bytes]
        self._queued.extendleft(reversed(pending))

    def fail_all(self, error: BaseException) -> None:
        """Fails every queued and unconfirmed message with `error`."""
        pending = list(self._queued) + list(self._unconfirmed.values())
        self._queued.clear()
        self._unconfirmed.clear()
        self._by_publish_id.clear()
        for out in pending:
            if not out.future.done():
                out.future.set_exception(error)
        self.wake_settled_waiters()

    # ------------------------------------------------------------ settled

    def add_settled_waiter(self, waiter: concurrent.futures.Future[None]) -> None:
        """Resolves `waiter` once nothing is queued or unconfirmed (at once if so now)."""
        self._settled_waiters.append(waiter)
        self.wake_settled_waiters()

    def wake_settled_waiters(self) -> None:
        """Resolves the settled waiters when nothing awaits a confirm."""
        if self._queued or self._unconfirmed or not self._settled_waiters:
            return
        waiters, self._settled_waiters = self._settled_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _publish_id(out: Outgoing) -> Any:
    return (out.properties.headers or {}).get(PUBLISH_ID_HEADER)


__all__ = ["DEFAULT_CONFIRM_TIMEOUT_S", "PUBLISH_ID_HEADER", "ConfirmTracker", "Outgoing"]
