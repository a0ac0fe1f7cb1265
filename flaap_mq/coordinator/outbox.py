"""One-way tasks held back to travel with the next message to their silo.

A TFF invocation sends a silo a chain of requests: CreateValue and CreateCall,
which `silo_executor` sends one-way, then the Compute it awaits. Each
persistent, confirmed message costs about 1.1 ms of wall time and 1.4 ms of
CPU between coordinator, broker and worker (docs/benchmarks.md, "What one
more message costs"). So a one-way task waits here, and goes to the broker
with the tasks sent after it, in one `TaskBatch` (protocol version 3): a
chain costs one message each way.

When held tasks go (`flush`), in the order they were sent:

* with the next awaited task to their silo, in one message (`ask`);
* `LINGER_S` after it was held, when sent from an event loop and no awaited
  task took it first. TFF yields to the loop between the requests of one
  chain (its ingestion gathers asyncio tasks), so "the end of this loop
  step" would send most chains in two messages; and nothing waits for a
  one-way task's confirm but the Compute that takes it along
  (`SiloValue.wait_sent`), so lingering costs nobody time;
* at once, when sent from a thread with no running loop (a value
  finalizer's Dispose on the garbage collector's thread), unless a running
  loop already has a linger pending for that silo: then it joins the held
  chain instead of sending it ahead of its Compute;
* before a task too large to batch, which then goes alone (sliced if
  need be), and whenever a batch would grow past `MAX_BATCH_TASKS` tasks or
  `max_bytes` of requests;
* all of them, on `close`.

Every task for a silo passes through here, and is handed to the link under
one lock in the order sent, so the worker sees a value's Create* task before
any task that names the value, batched or not. The garbage collector may run
a value finalizer, which sends a Dispose, while this very thread holds the
lock: such a task is only held (it goes with the next message, or after
the linger), never published in the middle of another publication, which
could put it ahead of the Create* task it disposes of.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from flaap_mq.broker import link as broker_link
from flaap_mq.coordinator import publish
from flaap_mq.protocol import batch

# How long a one-way task sent from an event loop may wait for an awaited task
# to its silo to take it along (module docstring). A chain's requests are
# made within about a millisecond of each other (docs/benchmarks.md), but on
# a loaded machine the loop's thread can wait its turn for longer: at 5 ms a
# chain was sometimes split in two messages under `make test`. Nothing waits
# for a held task but the awaited task that takes it along, so a longer
# linger costs nobody time.
LINGER_S = 0.05
# A request larger than this goes alone: batching saves a message's fixed
# cost, which a large request dwarfs.
BATCHED_REQUEST_BYTES = 64 * 1024

Held = tuple[publish.Outgoing, concurrent.futures.Future[None]]


class Outbox:
    """Holds one-way tasks per silo and publishes them, batched, in order."""

    def __init__(
        self,
        link: broker_link.BrokerLink,
        exchange: str,
        *,
        chunk_bytes: int,
    ) -> None:
        self._link = link
        self._exchange = exchange
        self._chunk_bytes = chunk_bytes
        # What one batch's requests may add up to: it must fit in one message.
        self.max_bytes = min(chunk_bytes, 4 * 1024 * 1024)
        self._held: dict[str, list[Held]] = {}
        # Per silo, the pending timed flush: (its loop, a token of its own).
        self._flush_asked: dict[str, tuple[asyncio.AbstractEventLoop, object]] = {}
        # Held while tasks are handed to the link, in order. Re-entrant, for a
        # finalizer's send inside `_publish` (module docstring), which
        # `_publishing` tells apart: it is only ever true for the lock's owner.
        self._lock = threading.RLock()
        self._publishing = False
        self.messages_published = 0

    def send(self, out: publish.Outgoing) -> concurrent.futures.Future[None]:
        """Publishes `out` now (awaited) or soon (one-way); the broker's confirm of it.

        An awaited task takes the silo's held tasks with it. A one-way task
        small enough is held (see the module docstring for when it goes);
        the future resolves with the confirm of the message it goes in.
        """
        silo_id = out.task.silo_id
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if self._publishing and not out.reply:
                # A finalizer's disposal, inside `_publish` on this thread.
                self._held.setdefault(silo_id, []).append((out, future))
                self._flush_soon(silo_id, now_if_no_loop=False)
                return future
            if out.size > BATCHED_REQUEST_BYTES:
                return self._publish(silo_id, alone=out)
            held = self._held.get(silo_id, [])
            if len(held) + 1 > batch.MAX_BATCH_TASKS or (
                sum(h.size for h, _ in held) + out.size > self.max_bytes
            ):
                self._publish(silo_id)  # what is held goes first, as one batch
            if out.reply:
                return self._publish(silo_id, last=out)
            self._held.setdefault(silo_id, []).append((out, future))
        self._flush_soon(silo_id)
        return future

    def flush(self, silo_id: str | None = None) -> None:
        """Publishes what is held for `silo_id` (every silo: None) now."""
        with self._lock:
            for silo in [silo_id] if silo_id is not None else list(self._held):
                self._publish(silo)

    def close(self) -> None:
        """Publishes everything held (the last disposals, say)."""
        self.flush()

    def _flush_soon(self, silo_id: str, *, now_if_no_loop: bool = True) -> None:
        """Has the silo's held tasks published `LINGER_S` from now, unless they go before."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread
            with self._lock:
                asked = self._flush_asked.get(silo_id)
                # A running loop's linger (or the chain's awaited task) sends
                # it with what is held; else nothing follows soon.
                if now_if_no_loop and not (asked is not None and asked[0].is_running()):
                    self.flush(silo_id)
            return
        with self._lock:
            # Once per held batch. A flush asked of a loop that has since
            # stopped would never come, so another loop asks again.
            asked = self._flush_asked.get(silo_id)
            if asked is not None and asked[0] is loop and not loop.is_closed():
                return
            token = (loop, object())
            self._flush_asked[silo_id] = token
        loop.call_later(LINGER_S, self._flush_if_still_asked, silo_id, token)

    def _flush_if_still_asked(self, silo_id: str, token: object) -> None:
        with self._lock:
            if self._flush_asked.get(silo_id) is token:
                self._publish(silo_id)

    def _publish(
        self,
        silo_id: str,
        *,
        last: publish.Outgoing | None = None,
        alone: publish.Outgoing | None = None,
    ) -> concurrent.futures.Future[None]:
        """Publishes the held tasks, with `last` as the batch's last; then `alone` by itself.

        Called with the lock held. Returns the confirm of what carries
        `last`, or `alone` (of the held tasks, without either; resolved if
        nothing was held).
        """
        self._publishing = True
        try:
            return self._publish_held(silo_id, last, alone)
        finally:
            self._publishing = False

    def _publish_held(
        self, silo_id: str, last: publish.Outgoing | None, alone: publish.Outgoing | None
    ) -> concurrent.futures.Future[None]:
        held = self._held.pop(silo_id, [])
        self._flush_asked.pop(silo_id, None)  # a flush asked for them has nothing to do
        together = [out for out, _ in held] + ([last] if last is not None else [])
        sent: concurrent.futures.Future[None] = concurrent.futures.Future()
        if not together:
            sent.set_result(None)
        elif len(together) == 1:
            sent = self._publish_alone(together[0])
        else:
            sent = publish.publish_batch(self._link, self._exchange, together)
            self.messages_published += 1
        if held:
            _settle_with(held, sent)
        if alone is not None:
            sent = self._publish_alone(alone)
        return sent

    def _publish_alone(self, out: publish.Outgoing) -> concurrent.futures.Future[None]:
        sent, messages = publish.publish_task(
            self._link, self._exchange, out, chunk_bytes=self._chunk_bytes
        )
        self.messages_published += messages
        return sent


def _settle_with(held: list[Held], confirmed: concurrent.futures.Future[None]) -> None:
    """Resolves each held task's future with the confirm of the message(s) it went in."""

    def settle(done: concurrent.futures.Future[None]) -> None:
        error = done.exception()
        for _, future in held:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    confirmed.add_done_callback(settle)
