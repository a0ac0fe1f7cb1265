"""Sends each computation to an executor once, not once per invocation.

TFF's execution context creates the computation it invokes as a new value in
the executor on every call (`create_value(comp)` in `_invoke`), so a training
loop ships the same TFF program to every silo every round: about 380 KB per
round for the digits model over three silos, and one more request on each
invocation's critical path (the executor service parses the program before
the call that uses it can start). A computation is immutable and an executor value is not
consumed by a call, so the value made the first time serves every later
invocation on the same executor.

Only `ConcreteComputation`s are cached, by identity: TFF's compiler pipeline
memoizes compiled computations, so a repeated invocation passes the very same
object, and holding it in the cache keeps its id from being reused. A cached
value is released when it leaves the (small, least-recently-used) cache or
with its executor.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

from flaap_mq.tff_internals import computation_impl, executor_value_base

DEFAULT_MAX_ENTRIES = 16

Value = executor_value_base.ExecutorValue


class ComputationCache:
    """Executor values of computations, for one executor."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._max_entries = max_entries
        self._entries: collections.OrderedDict[int, tuple[object, Value]] = (
            collections.OrderedDict()
        )
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def value_for(self, value: object, create: Callable[[], Awaitable[Value]]) -> Value:
        """The executor value of `value`: a cached one, or `create()`'s."""
        if not isinstance(value, computation_impl.ConcreteComputation):
            return await create()
        key = id(value)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is value:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        created = await create()
        self._entries[key] = (value, created)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return created

    def clear(self) -> None:
        self._entries.clear()
