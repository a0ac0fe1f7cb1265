"""Whether each silo has a worker: its queue's consumers, asked of the broker while calls wait.

A call waiting for a silo should not wait out its task timeout when nobody
will ever answer. So while calls wait, the silo's queue is asked (a passive
declare, one question per silo at a time, shared by all its calls) how many
consumers it has:

* a queue with no consumer is warned about once (`silo_has_no_worker`,
  naming the queue and the command that fixes it), until a consumer is seen
  again (`silo_worker_consuming`);
* a silo whose queue has had no consumer for `grace_s` (`silo_grace`) is
  *lost*: the calls waiting for it fail with `SiloLostError` (reason
  `no-consumer-<grace>s`) then, not at the task timeout. A standby worker
  taking over keeps a consumer on the queue and is no loss; a broker that is
  not taking messages (`BrokerLink.trouble`) is not the silo's fault;
* a call cut short by its invocation's deadline (`calls.invocation_deadline`)
  fails with `SiloLostError` (reason `deadline-<seconds>s`), also when the
  silo's DEADLINE_EXCEEDED answer beats this process's own timer; one that
  times out says whether the silo has a worker at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Sequence

import structlog.stdlib

from flaap_mq.broker import link as broker_link
from flaap_mq.coordinator import errors
from flaap_mq.coordinator.calls import Deadline, PendingCall, Reply
from flaap_mq.protocol import envelope, topology

# While a call waits, its silo's queue is asked for its consumers this often
# (at most; one question per silo, shared by all its calls): a silo whose
# worker is gone is reported within this many seconds, not at the timeout.
CONSUMER_CHECK_INTERVAL_S = 5.0
# How long a timed-out call waits for the broker to say whether anyone
# consumes its silo's queue, for its error message (only on that path).
_CONSUMER_CHECK_TIMEOUT_S = 2.0
# A silo whose queue has had no consumer this long is lost to the calls
# waiting for it (`SiloLostError`), unless told otherwise (`silo_grace_s`).
DEFAULT_SILO_GRACE_S = 60.0


@dataclasses.dataclass
class SiloState:
    """What this coordinator knows of whether a silo's queue has a consumer."""

    probe: concurrent.futures.Future[broker_link.QueueCounts] | None = None
    probed_at: float = float("-inf")  # time.monotonic() the last probe started
    consumers: int | None = None  # None: not known (yet)
    warned: bool = False  # `silo_has_no_worker` logged since a consumer was last seen
    # time.monotonic() of the first answer "no consumer" since one was last
    # seen (None: a consumer was seen in the last answer, or nothing is known).
    no_consumer_since: float | None = None

    def answered(self, consumers: int) -> tuple[bool, bool]:
        """Takes the broker's answer to the probe started at `probed_at`.

        Returns (warn, came_back): whether to say the silo has no worker (the
        first "none" since one was seen), or that one consumes again.
        """
        self.consumers = consumers
        if consumers > 0:
            self.no_consumer_since = None
        elif self.no_consumer_since is None:
            self.no_consumer_since = self.probed_at
        warn = consumers == 0 and not self.warned
        came_back = consumers > 0 and self.warned
        self.warned = consumers == 0
        return warn, came_back


class SiloWatch:
    """The consumers of every silo's queue, as far as the broker's last answers tell."""

    def __init__(
        self,
        link: broker_link.BrokerLink,
        names: topology.Names,
        silo_ids: Sequence[str],
        grace_s: float,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.grace_s = grace_s  # positive (the `TaskClient` checks it first)
        self.consumer_check_interval_s = CONSUMER_CHECK_INTERVAL_S
        self._link = link
        self._names = names
        self._log = log
        self._lock = threading.Lock()
        self._silos = {s: SiloState() for s in silo_ids}

    @property
    def check_interval_s(self) -> float:
        """How often a waiting call's silo is asked for its consumers: at most
        `consumer_check_interval_s`, and often enough to tell a silo lost
        within about a quarter of `grace_s` after its grace."""
        return min(self.consumer_check_interval_s, max(0.25, self.grace_s / 4))

    def lost_reason(self, silo_id: str) -> str | None:
        """`no-consumer-<grace>s` if the silo's queue has had no consumer for
        `grace_s` (as far as the broker's last answer tells), else None."""
        with self._lock:
            since = self._silos[silo_id].no_consumer_since
        if since is None or time.monotonic() - since < self.grace_s:
            return None
        if self._link.trouble(silo_id) is not None:
            # The broker is not taking messages (e.g. its queues lost their
            # quorum): no worker can consume then, and the silo is not to
            # blame. The calls fail with the broker's own cause instead.
            return None
        return f"no-consumer-{self.grace_s:g}s"

    def consumers(self, silo_id: str) -> int | None:
        """The consumers of the silo's queue in the broker's last answer (None: unknown)."""
        with self._lock:
            return self._silos[silo_id].consumers

    async def refresh(self, silo_ids: Sequence[str]) -> None:
        """Brings what is known of the silos' consumers up to date (`consumers`, `lost_reason`).

        Asks the broker again about every silo not known to have a consumer
        (so one whose worker came back is seen), waiting at most 2 s for
        the answers; silos known to have one are refreshed in the background
        (at most every `check_interval_s`).
        """
        asked = []
        for silo_id in silo_ids:
            if self.consumers(silo_id):
                self.check(silo_id)
            else:
                asked.append(asyncio.wrap_future(self.check(silo_id, fresh=True)))
        if asked:
            # Shielded: the probes are shared; an unanswered one is judged by the last answer.
            await asyncio.wait(
                [asyncio.shield(a) for a in asked], timeout=_CONSUMER_CHECK_TIMEOUT_S
            )

    def check(
        self, silo_id: str, *, fresh: bool = False
    ) -> concurrent.futures.Future[broker_link.QueueCounts]:
        """Asks the broker (passive declare) how many consumers the silo's queue has.

        One question per silo at a time, at most one per `check_interval_s`
        unless `fresh`: the future of the question in flight or just answered
        is shared. When the answer is no consumer, logs `silo_has_no_worker`
        (a warning naming the queue and the command to run), once until a
        consumer is seen again.
        """
        now = time.monotonic()
        with self._lock:
            state = self._silos[silo_id]
            probe = state.probe
            if probe is not None and (
                not probe.done() or (not fresh and now - state.probed_at < self.check_interval_s)
            ):
                return probe
            probe = self._link.queue_counts(self._names.silo_queue(silo_id))
            state.probe, state.probed_at = probe, now
        probe.add_done_callback(lambda done: self._on_checked(silo_id, done))
        return probe

    def _on_checked(
        self, silo_id: str, done: concurrent.futures.Future[broker_link.QueueCounts]
    ) -> None:
        error = "cancelled" if done.cancelled() else done.exception()
        if error is not None:
            self._log.debug("silo_check_failed", silo=silo_id, error=str(error))
            return
        counts = done.result()
        with self._lock:
            warn, came_back = self._silos[silo_id].answered(counts.consumers)
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
        probe = self.check(silo_id, fresh=True)
        with contextlib.suppress(Exception):
            # Shielded: the probe is shared, and a cancelled one could not be answered.
            counts = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(probe)), _CONSUMER_CHECK_TIMEOUT_S
            )
            return counts.consumers == 0
        return self.consumers(silo_id) == 0

    def _no_worker_hint(self, silo_id: str) -> str:
        """What a silo without a worker means, and the commands that fix and check it."""
        prefix = "" if self._names.prefix == "flaap" else f" --prefix {self._names.prefix}"
        return (
            f"no worker is consuming {self._names.silo_queue(silo_id)}: start one on that "
            f"silo (flaap-mq worker --silo-id {silo_id}{prefix}) and check with "
            f"`flaap-mq status --silo {silo_id}{prefix}`"
        )

    async def await_reply(
        self, call: PendingCall, timeout_s: float, by: Deadline | None = None
    ) -> Reply:
        """The call's reply, or `SiloTimeoutError` after `timeout_s`.

        While it waits, the silo's queue is checked for a consumer every
        `check_interval_s` (`check`, which warns), without delaying the
        reply or moving the deadline. Once the queue has had no consumer for
        `grace_s`, the call fails with `SiloLostError`; if `by` (the
        invocation's deadline) ends the wait, likewise.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self.lost_reason(call.silo_id) is not None:
            # Known lost: ask again before saying so (its worker may be back).
            await self._has_no_consumer(call.silo_id)
        while True:
            self._raise_if_lost(call)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            done, _ = await asyncio.wait(
                {call.future}, timeout=min(remaining, self.check_interval_s)
            )
            if done:
                reply = call.future.result()
                result = reply[0]
                if (
                    by is not None
                    and result.WhichOneof("outcome") == "error"
                    and result.error.code == envelope.ErrorCode.DEADLINE_EXCEEDED
                ):
                    # The silo saw the invocation's deadline pass a moment before
                    # this process did: the same loss, whichever clock won.
                    raise self._deadline_lost(call, by, f"; the silo says: {result.error.message}")
                return reply
            if loop.time() < deadline:
                self.check(call.silo_id)
        if not call.future.done():
            call.future.cancel()
        if by is not None:
            raise self._deadline_lost(call, by)
        message = f"no answer within the task timeout of {timeout_s:g} s"
        trouble = self._link.trouble(call.silo_id)
        if trouble is not None:
            message += f"; the broker is not taking this coordinator's tasks: {trouble}"
        elif await self._has_no_consumer(call.silo_id):
            message += "; " + self._no_worker_hint(call.silo_id)
        raise errors.SiloTimeoutError(call.silo_id, call.request, message)

    def _deadline_lost(
        self, call: PendingCall, by: Deadline, detail: str = ""
    ) -> errors.SiloLostError:
        return self._lost(
            call,
            f"deadline-{by.seconds:g}s",
            f"no answer by the invocation's deadline ({by.seconds:g} s): lost to this "
            f"invocation; its tasks expire with that deadline{detail}",
        )

    def _raise_if_lost(self, call: PendingCall) -> None:
        reason = self.lost_reason(call.silo_id)
        if reason is None:
            return
        raise self._lost(
            call,
            reason,
            f"lost ({reason}): no worker has consumed "
            f"{self._names.silo_queue(call.silo_id)} for {self.grace_s:g} s "
            "(silo_grace); its tasks expire by their deadline. "
            + self._no_worker_hint(call.silo_id),
        )

    def _lost(self, call: PendingCall, reason: str, message: str) -> errors.SiloLostError:
        """The call's silo is lost to it: stops waiting, logs `silo_lost`; the error to raise."""
        if not call.future.done():
            call.future.cancel()
        self._log.warning("silo_lost", silo=call.silo_id, reason=reason, request=call.request)
        return errors.SiloLostError(call.silo_id, call.request, reason, message)
