"""The coordinator's names for values, mapped to the executor service's own refs.

In flaap-mq's protocol (version 2, `protos/flaap_mq/v1/task.proto`) the
coordinator names every value it creates: a CreateValue, CreateCall,
CreateStruct or CreateSelection task's `task_id` is the name of the value it
makes, and later requests refer to it by that name. The coordinator can then
send a whole chain (CreateValue -> CreateCall -> Compute) without waiting for
each link's answer: one broker round trip per TFF invocation instead of one
per executor request. The price is paid here, on the worker, which must

1. know whether a named value is coming. Every Create* task is *announced*
   on the I/O thread as it is delivered, in queue order. The coordinator
   publishes a value's Create* task before any task that names it, so a name
   that was never announced is one this process will never hold (it was made
   by an earlier worker process, or disposed): STATE_LOST, at once, not after
   a timeout;
2. wait for a value whose Create* task is still running. That task was
   delivered earlier, so it is ahead of the waiting task in the worker's
   first-in first-out thread pool and already has a thread: waiting for it
   cannot deadlock;
3. pass failures on: a task naming a value whose creation failed fails with
   that value's error, so the TFF error in a CreateCall reaches the
   coordinator with the Compute that needed it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterable

from flaap_mq.protocol import envelope


class ValueUnavailable(Exception):
    """A named value cannot be used; `failure` and `message` say why."""

    def __init__(self, value_id: str, failure: envelope.Failure, message: str) -> None:
        super().__init__(message)
        self.value_id = value_id
        self.failure = failure
        self.message = message


@dataclasses.dataclass(slots=True)
class _Entry:
    # Made or failed. One small record per live value: waiting goes through
    # the table's one condition, not an Event each (2 KB apiece).
    done: bool = False
    ref: str | None = None  # the executor service's ValueRef id, once made
    executor: str | None = None  # the executor service's ExecutorId it lives in
    failure: envelope.Failure | None = None
    message: str = ""


# Failed values are kept only to tell the tasks that name them why; the
# oldest are forgotten beyond this many (their names then read as unknown).
MAX_FAILED = 10_000


class ValueTable:
    """Value names -> executor service refs, for one worker incarnation."""

    def __init__(self, max_failed: int = MAX_FAILED) -> None:
        self._entries: dict[str, _Entry] = {}
        self._failed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._max_failed = max_failed
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # an entry became done

    def __len__(self) -> int:
        return len(self._entries)

    def announce(self, value_id: str) -> None:
        """A Create* task for `value_id` was delivered (call in delivery order)."""
        with self._lock:
            self._entries.setdefault(value_id, _Entry())

    def made(self, value_id: str, ref: str, executor: str) -> None:
        """The value exists in the executor service as `ref` of `executor`."""
        with self._lock:
            entry = self._entries.get(value_id)
            if entry is None or entry.done:
                return  # forgotten meanwhile (disposed, or the table was cleared)
            entry.ref, entry.executor, entry.done = ref, executor, True
            self._settled.notify_all()

    def fail(self, value_id: str, failure: envelope.Failure, message: str) -> None:
        """The value could not be made; tasks naming it fail with `message`.

        Does nothing to a value already made or failed: a failure reported
        later (say, for a duplicate delivery) must not take back a value
        that others may already have used.
        """
        with self._lock:
            entry = self._entries.get(value_id)
            if entry is None or entry.done:
                return
            entry.failure, entry.message, entry.done = failure, message, True
            self._settled.notify_all()
            self._failed[value_id] = None
            while len(self._failed) > self._max_failed:
                self._entries.pop(self._failed.popitem(last=False)[0], None)

    def refs(self, value_ids: Iterable[str], deadline: float | None) -> dict[str, str]:
        """The executor service's ref for each name, waiting for ones being made.

        `deadline` is a `time.monotonic()` time, or None to wait as long as
        the value takes. Raises `ValueUnavailable` for a name never
        announced, a value whose creation failed, or the deadline passing.
        """
        out: dict[str, str] = {}
        for value_id in value_ids:
            if value_id in out:
                continue
            with self._lock:
                entry = self._entries.get(value_id)
                if entry is None:
                    raise ValueUnavailable(
                        value_id,
                        envelope.Failure.STATE_LOST,
                        f"value {value_id} is not held by this worker process: it was made "
                        "by an earlier one, or already disposed",
                    )
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done = self._settled.wait_for(lambda e=entry: e.done, timeout)
            if not done:
                raise ValueUnavailable(
                    value_id,
                    envelope.Failure.DEADLINE_EXCEEDED,
                    f"value {value_id} was still being made when the deadline passed",
                )
            if entry.failure is not None:
                raise ValueUnavailable(value_id, entry.failure, entry.message)
            assert entry.ref is not None
            out[value_id] = entry.ref
        return out

    def take(self, value_ids: Iterable[str], deadline: float | None) -> list[str]:
        """Forgets the names and returns the refs of those that were made (Dispose).

        Waits for values still being made, so that disposing of a value
        cannot overtake its creation and leave it behind in the service.
        """
        refs = []
        for value_id in value_ids:
            with contextlib.suppress(ValueUnavailable):  # never made: nothing to dispose of
                refs.append(self.refs([value_id], deadline)[value_id])
            with self._lock:
                self._entries.pop(value_id, None)
                self._failed.pop(value_id, None)
        return refs

    def forget_executor(self, executor: str) -> None:
        """Forgets every value of `executor` (DisposeExecutor disposed of them)."""
        with self._lock:
            for value_id in [v for v, e in self._entries.items() if e.executor == executor]:
                del self._entries[value_id]

    def clear(self, failure: envelope.Failure, message: str) -> None:
        """Forgets every value; tasks still waiting for one fail with `message`."""
        with self._lock:
            entries, self._entries = self._entries, {}
            self._failed.clear()
            for entry in entries.values():
                if not entry.done:
                    entry.failure, entry.message, entry.done = failure, message, True
            self._settled.notify_all()
