"""The calls a coordinator awaits: one entry per task id, each with its deadline.

A call (`TaskClient.ask`) is awaited on the event loop that made it and
settled from whichever thread knows its outcome first: the I/O thread (its
reply, a failed publish, the broker gone) or that loop itself (its timeout).
`CallTable` is what those threads share, under one lock.

A call's transfer in progress (the slices of its large result, collected in
the table's `transfers`, one `collector.Collector` for all silos) is keyed by
its task id and lives exactly as long as its entry: `forget` drops both under
the lock a slice is stored under (`replies.take`), so no slice can start a
transfer for a call already over. A silo can thus make the coordinator hold
no more than `Limits.max_transfer_bytes` per call it was asked to answer,
and all silos together no more than `Limits.max_pending_bytes`.

Deadlines: a call waits at most its timeout. Within `invocation_deadline`
(a context variable, so the asyncio tasks started in it inherit it) every
task's timeout is cut to what is left of the invocation's (`timeout_now`), so
that its tasks also expire in the broker by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import threading
import time
from collections.abc import Iterator

from flaap_mq.coordinator import errors
from flaap_mq.protocol import collector
from flaap_mq.protocol.v1 import task_pb2

# What a reply settles a call with: the result, and its response payload
# (a view of the message, or the slices of a chunked one, checked by the caller).
Reply = tuple[task_pb2.TaskResult, memoryview | collector.Parts]


@dataclasses.dataclass(frozen=True)
class Deadline:
    """An invocation's deadline (`invocation_deadline`)."""

    at: float  # time.monotonic()
    seconds: float  # as given, for the reason (`deadline-30s`)


# The deadline of the invocation the current task belongs to; asyncio tasks inherit it.
_INVOCATION_DEADLINE: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "flaap_mq_invocation_deadline", default=None
)


@contextlib.contextmanager
def invocation_deadline(seconds: float | None) -> Iterator[None]:
    """Every task's timeout, in this context (and the asyncio tasks it starts),
    ends `seconds` from now at the latest (`timeout_now`). None: no deadline
    but each task's own timeout."""
    if seconds is None:
        yield
        return
    token = _INVOCATION_DEADLINE.set(Deadline(time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _INVOCATION_DEADLINE.reset(token)


def timeout_now(timeout_s: float) -> tuple[float, Deadline | None]:
    """A task's timeout: `timeout_s`, cut to the invocation's deadline if that
    comes first (then also that deadline, which the call is lost to)."""
    deadline = _INVOCATION_DEADLINE.get()
    if deadline is not None:
        remaining = deadline.at - time.monotonic()
        if remaining < timeout_s:
            return max(0.001, remaining), deadline
    return timeout_s, None


def _set_outcome(
    future: asyncio.Future[Reply],
    result: Reply | None,
    error: BaseException | None,
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclasses.dataclass
class PendingCall:
    """One awaited request: where its outcome goes, and whom it was asked of."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Reply]
    silo_id: str
    request: str  # the request's kind, e.g. "Compute"
    started: float  # time.monotonic()
    expires_at: float  # time.monotonic() at the call's deadline
    # A reply (or chunk error) has settled the call: later slices are dropped.
    answered: bool = False

    def settle(self, result: Reply | None, error: BaseException | None) -> None:
        """Resolves the call with `result` or `error`, from any thread; the first outcome wins."""
        # RuntimeError: the caller's event loop is closed; nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_set_outcome, self.future, result, error)


class CallTable:
    """The calls awaiting a reply, by task id, and their transfers in progress."""

    def __init__(self, chunk_limits: collector.Limits | None = None) -> None:
        # Held while a call is looked up for a reply and its slice stored
        # (`replies.take`), and while a call ends (`forget`).
        self.lock = threading.Lock()
        # What silos' chunked results may make this process hold (`chunking`).
        self.transfers = collector.Collector(chunk_limits)
        self._calls: dict[str, PendingCall] = {}

    def add(self, task_id: str, call: PendingCall) -> None:
        with self.lock:
            self._calls[task_id] = call

    def get(self, task_id: str) -> PendingCall | None:
        with self.lock:
            return self._calls.get(task_id)

    def get_held(self, task_id: str) -> PendingCall | None:
        """As `get`, for a caller that holds `lock`."""
        return self._calls.get(task_id)

    def waiting(self) -> list[PendingCall]:
        """The calls waiting now (for tests and diagnostics)."""
        with self.lock:
            return list(self._calls.values())

    def forget(self, task_id: str) -> None:
        """Ends a call: its entry goes, and with it any partial transfer for it.

        Called however the call ends (answered, failed, timed out, cancelled,
        not even sent).
        """
        with self.lock:
            self._calls.pop(task_id, None)
            self.transfers.discard(task_id)

    def fail_all(self, error: BaseException) -> None:
        """Fails every waiting call as retryable: the broker link is gone (`error`)."""
        for call in self.waiting():
            call.settle(
                None, errors.SiloRetryableError(call.silo_id, call.request, f"broker: {error}")
            )
