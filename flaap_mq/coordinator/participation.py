"""Which silos take part in an invocation, and completing it over those that answer.

A silo is *lost* to an invocation when its queue has had no consumer for
`silo_grace` seconds (`TaskClient.lost_reason`; a standby worker taking over
keeps a consumer, so is no loss) or when it has not answered by the
invocation's deadline (`invocation_timeout`). With `min_silos` below the
number of silos, an invocation whose computation may do without a silo
(see `droppable`) runs on the silos online at its start (their queue has a
consumer) and completes over those that answer, as if the others held no
clients; with fewer than `min_silos` answering it fails with
`NotEnoughSilosError` naming who was lost and why. Otherwise every silo must
answer, and a lost one fails the invocation with `SiloLostError` as soon as
it is lost rather than at the task timeout.

The soundness rule (`droppable`): a silo's part may be dropped only if

* the result has no per-client part (no CLIENTS-placed value that is not
  all-equal): a per-client result without a silo's clients would be a
  shorter list whose positions no longer mean the clients the caller thinks;
* the argument has no per-client part: every client's data then lives on
  its silo (`silo_dataset`), so a lost silo's clients are simply absent, as
  if it held none. Values the caller passed for a silo's clients would be
  silently left out of the result instead.

Then the merged result is an aggregate over the answering silos' clients:
what TFF's runtime computes over exactly those clients. A computation that
breaks the rule still runs while every silo answers, and fails with a clear
error (naming the lost silo and the rule) instead of dropping one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from flaap_mq.coordinator import errors, partitioning
from flaap_mq.coordinator.task_client import TaskClient
from flaap_mq.logs import get_logger
from flaap_mq.tff_internals import (
    compute_after_merged,
    context_base,
    invoke_up_to_merge_and_return_context,
    merge_results,
    mergeable_comp_execution_context,
)

log = get_logger("flaap_mq.coordinator")

NO_CONSUMER_AT_START = "no-consumer"
# How long after the invocation's deadline silos still running are given up
# on, should a call not have ended itself at the deadline (it does).
_DEADLINE_SLACK_S = 10.0

MergeableCompForm = mergeable_comp_execution_context.MergeableCompForm


@dataclasses.dataclass(frozen=True)
class Participation:
    """Who took part in an invocation: the silos that answered, and those dropped (why)."""

    silos: tuple[str, ...]
    dropped: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def silos_field(self) -> str:
        """`a;b`: the silos that answered, in silo order."""
        return ";".join(self.silos)

    @property
    def dropped_field(self) -> str:
        """`c:no-consumer-60s;d:deadline-30s`: the silos dropped, and why."""
        return ";".join(f"{silo}:{reason}" for silo, reason in self.dropped.items())


def droppable(comp: MergeableCompForm) -> str | None:
    """None if a silo's part of `comp` may be dropped; else why not (the soundness rule)."""
    result = comp.after_merge.type_signature.result
    if not partitioning.has_no_per_client_part(result):
        return (
            f"its result ({result}) has a per-client (CLIENTS-placed) part, which would "
            "silently lose that silo's clients"
        )
    parameter = comp.up_to_merge.type_signature.parameter
    if parameter is not None and partitioning._contains_split_leaf(parameter):
        return (
            "its argument has a per-client (CLIENTS-placed) part: the values passed for "
            "that silo's clients would be silently left out (only computations over data "
            "the silos hold, e.g. flaap_mq.data.silo_dataset, can do without a silo)"
        )
    return None


def _describe(lost: Mapping[str, str]) -> str:
    return ", ".join(f"{silo!r} ({reason})" for silo, reason in lost.items())


class ParticipationPolicy:
    """How an invocation treats silos that drop out (see the module docstring)."""

    def __init__(
        self,
        client: TaskClient,
        *,
        min_silos: int | None = None,
        invocation_timeout: float | None = None,
    ) -> None:
        self.client = client
        self.silo_ids = list(client.silo_ids)
        n = len(self.silo_ids)
        self.min_silos = n if min_silos is None else min_silos
        if not 1 <= self.min_silos <= n:
            raise ValueError(f"min_silos must be between 1 and {n} (the silos), got {min_silos}")
        if invocation_timeout is not None and invocation_timeout <= 0:
            raise ValueError(f"invocation_timeout must be positive, got {invocation_timeout}")
        self.invocation_timeout = invocation_timeout
        self.last: Participation | None = None

    @property
    def all_must_answer(self) -> bool:
        return self.min_silos >= len(self.silo_ids)

    async def invoke(
        self,
        comp: MergeableCompForm,
        arg: partitioning.PartitionedArgument | None,
        contexts: Sequence[context_base.AsyncContext],
        merge_context: context_base.AsyncContext | None,
    ) -> Any:
        if len(contexts) != len(self.silo_ids):
            raise ValueError(f"{len(contexts)} contexts for {len(self.silo_ids)} silos")
        self.last = None
        with self.client.invocation_deadline(self.invocation_timeout):
            await self.client.refresh_silos(self.silo_ids)
            why_not = None if self.all_must_answer else droppable(comp)
            if self.all_must_answer or why_not is not None:
                return await self._every_silo(comp, arg, contexts, merge_context, why_not)
            return await self._answering_silos(comp, arg, contexts, merge_context)

    def _lost_now(self) -> dict[str, str]:
        lost = {}
        for silo in self.silo_ids:
            reason = self.client.lost_reason(silo)
            if reason is not None:
                lost[silo] = reason
        return lost

    def _cannot_drop(self, lost: Mapping[str, str], why_not: str | None) -> errors.SiloLostError:
        answered = [s for s in self.silo_ids if s not in lost]
        if why_not is None:
            rule = f"every silo must answer (min_silos={self.min_silos} of {len(self.silo_ids)})"
        else:
            rule = f"this computation cannot do without a silo: {why_not}"
        return errors.NotEnoughSilosError(
            dict(lost),
            answered,
            f"lost silos {_describe(lost)}; {rule}. Start the lost silos' workers "
            "(`flaap-mq status` shows which queues have none)"
            + (
                ", or give min_silos below the number of silos to complete over those that answer"
                if self.all_must_answer and len(self.silo_ids) > 1
                else ""
            ),
        )

    async def _every_silo(
        self,
        comp: MergeableCompForm,
        arg: partitioning.PartitionedArgument | None,
        contexts: Sequence[context_base.AsyncContext],
        merge_context: context_base.AsyncContext | None,
        why_not: str | None,
    ) -> Any:
        """Every silo must answer: a lost one fails the invocation, naming it."""
        lost = self._lost_now()
        if lost:
            raise self._cannot_drop(lost, why_not)
        try:
            result = await partitioning._invoke_mergeable_comp_form_in_order(
                comp, arg, contexts, merge_context
            )
        except errors.SiloLostError as e:
            if self.all_must_answer or isinstance(e, errors.NotEnoughSilosError):
                raise  # it names the silo, why it is lost and what to run
            raise self._cannot_drop({e.silo_id: e.reason}, why_not) from e
        self.last = Participation(tuple(self.silo_ids))
        return result

    async def _answering_silos(
        self,
        comp: MergeableCompForm,
        arg: partitioning.PartitionedArgument | None,
        contexts: Sequence[context_base.AsyncContext],
        merge_context: context_base.AsyncContext | None,
    ) -> Any:
        """Runs on the silos online now; merges, in silo order, those that answer."""
        # The argument has no per-client part (`droppable`): every part is the
        # whole argument, and each silo runs over its own clients.
        arg_list = partitioning.part_arguments(arg, len(contexts))
        lost: dict[str, str] = {}
        for silo in self.silo_ids:
            # Without a worker now: left out at once (nothing is sent to it).
            # The reason says so, however long it has been without one.
            if self.client.consumers(silo) == 0:
                lost[silo] = NO_CONSUMER_AT_START
        indices = [i for i, silo in enumerate(self.silo_ids) if silo not in lost]
        if len(indices) < self.min_silos:
            raise self._too_few(lost)
        tasks = {
            asyncio.create_task(
                invoke_up_to_merge_and_return_context(comp, arg_list[i], contexts[i])
            ): i
            for i in indices
        }
        pending = set(tasks)
        finished: dict[int, Any] = {}
        settled: set[int] = set()
        merged: Any = _NOTHING
        folded = 0  # indices[:folded] are merged (or dropped)
        last_context = None
        loop = asyncio.get_running_loop()
        give_up_at = (
            None
            if self.invocation_timeout is None
            else loop.time() + self.invocation_timeout + _DEADLINE_SLACK_S
        )
        try:
            while pending:
                timeout = None if give_up_at is None else max(0.0, give_up_at - loop.time())
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # the deadline's slack is over: give up on the rest
                    for task in pending:
                        lost[self.silo_ids[tasks[task]]] = f"deadline-{self.invocation_timeout:g}s"
                        settled.add(tasks[task])
                    break
                for task in done:
                    i = tasks[task]
                    error = task.exception()
                    if error is None:
                        finished[i] = task.result()
                        last_context = contexts[i]
                    elif isinstance(error, errors.SiloLostError):
                        lost[self.silo_ids[i]] = error.reason
                        log.warning(
                            "silo_dropped",
                            silo=self.silo_ids[i],
                            reason=error.reason,
                            answered_so_far=len(finished),
                        )
                    else:
                        raise error
                    settled.add(i)
                # Merged in silo order whatever order they finish in (as
                # `_invoke_merge_on_coordinator`), overlapping slower silos.
                while folded < len(indices) and indices[folded] in settled:
                    i = indices[folded]
                    folded += 1
                    if i not in finished:
                        continue
                    partial = finished.pop(i)
                    merged = (
                        partial
                        if merged is _NOTHING
                        else await merge_results(
                            comp, merged, partial, merge_context or contexts[i]
                        )
                    )
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        # Silos given up on after the slack have not been folded in yet.
        for i in indices[folded:]:
            if i in finished:
                partial = finished.pop(i)
                merged = (
                    partial
                    if merged is _NOTHING
                    else await merge_results(comp, merged, partial, merge_context or contexts[i])
                )
        answered = tuple(s for i, s in enumerate(self.silo_ids) if i in indices and s not in lost)
        if len(answered) < self.min_silos or merged is _NOTHING:
            raise self._too_few(lost)
        dropped = {s: lost[s] for s in self.silo_ids if s in lost}
        self.last = Participation(answered, dropped)
        if dropped:
            log.warning("invocation_completed_without", silos=list(answered), dropped=dropped)
        return await compute_after_merged(comp, arg_list[0], merged, merge_context or last_context)

    def _too_few(self, lost: Mapping[str, str]) -> errors.NotEnoughSilosError:
        answered = [s for s in self.silo_ids if s not in lost]
        return errors.NotEnoughSilosError(
            dict(lost),
            answered,
            f"only {len(answered)} of {len(self.silo_ids)} silos can answer "
            f"({answered or 'none'}), fewer than min_silos={self.min_silos}; lost: "
            f"{_describe(lost)}. Start the lost silos' workers (`flaap-mq status` shows "
            "which queues have none), or lower min_silos",
        )


_NOTHING = object()
