"""Correct splitting of a computation's argument over silos.

Why this module exists
----------------------
flaap-mq runs one federated computation over several *silos*, each an
asynchronous TFF execution context, by way of TFF's
``MergeableCompExecutionContext``: the argument's ``tff.CLIENTS``-placed parts
are split into one slice per silo, every silo runs ``up_to_merge`` on its slice,
and the partial results are merged.

In TFF 0.87 that splitting is wrong.  ``_split_value_into_subrounds`` walks the
argument with ``_partition_value``, which threads its bookkeeping (clients
left, partitions left, index of the next client) through the walk by taking it
from the *last* element of every struct.  When that last element is not a
non-all-equal ``CLIENTS`` value (e.g. the common ``(clients_data,
server_param)`` signature), the bookkeeping never advances: every silo receives
the *first* slice of clients, and the remaining clients are never seen.  The
result is silently wrong (a count that should be 28 comes out as 18 over two
silos and 0 over three; see ``docs/tff-partitioning-bug.md``).

TFF 0.87 also loses the order of per-client *results*: its
``_invoke_after_merge_in_async_pool`` collects the silos' ``after_merge``
results in the order the silos finish, and ``_repackage_partitioned_values``
concatenates the ``CLIENTS``-placed ones in that order, so a per-client result
``[0, 9, 19]`` can come back as ``[19, 0, 9]`` (also in
``docs/tff-partitioning-bug.md``).

This module provides:

* :func:`split_over_silos`, a drop-in replacement for TFF's
  ``_split_value_into_subrounds`` with the same contract, that computes the
  client ranges once from the client count and applies the same range to every
  ``CLIENTS`` leaf, wherever it sits in the argument.
* :class:`PartitionedArgument`, a drop-in replacement for TFF's
  ``MergeableCompExecutionContextValue`` built on :func:`split_over_silos`.
* :func:`part_arguments`, each part wrapped so that a silo receives it once
  for both ``up_to_merge`` and ``after_merge`` (``flaap_mq.coordinator.sent_once``),
  where TFF sends it twice.
* :func:`_invoke_mergeable_comp_form_in_order`, TFF's
  ``_invoke_mergeable_comp_form`` with ``after_merge`` results kept in part
  (hence client) order.
* :func:`_invoke_merge_on_coordinator`, TFF's ``_invoke_merge_in_async_pool``
  with every ``merge`` run in a coordinator-local context (see
  ``flaap_mq.coordinator.local_merge``) instead of on a silo, so that no silo
  receives another silo's partial aggregate, and in part order, so that the
  same inputs give the same bits whichever silo finishes first.
* :func:`_whole`, what runs when there is a single part: the computation
  whole, on that part's silo, in one round trip (nothing to merge).
* :class:`SiloSplittingContext`, TFF's ``MergeableCompExecutionContext`` with
  only the argument splitting, the result ordering and (given a
  ``merge_context``) where ``merge`` runs replaced.

``tests/unit/test_partitioning.py`` contains a test that asserts TFF's bug is
still present, and ``tests/integration/test_partitioning_local.py`` tests
pinning both bugs; when they start failing, TFF has fixed the bugs and this
module may be retired in favour of TFF's own class.

Why one module of some 550 lines: it is one replacement of one TFF class and
its helpers, each mirroring TFF 0.87's code line for line except where
marked; kept together, it can be diffed against TFF's
`mergeable_comp_execution_context.py` on an upgrade, and retired whole.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from flaap_mq import tff_internals as tffi
from flaap_mq.coordinator import sent_once
from flaap_mq.tff_internals import (
    cardinalities_utils,
    computation_base,
    computation_types,
    context_base,
    mergeable_comp_execution_context,
    placements,
    py_typecheck,
    structure,
    type_analysis,
    type_conversions,
    typed_object,
)

__all__ = [
    "PartitionedArgument",
    "SiloSplittingContext",
    "part_arguments",
    "split_over_silos",
]


def _is_split_leaf(type_spec: computation_types.Type) -> bool:
    """Whether values of `type_spec` hold one member per client.

    Only these leaves are split between silos; an all-equal `CLIENTS` value is
    a single value that every client sees, so every silo needs all of it.
    """
    return (
        isinstance(type_spec, computation_types.FederatedType)
        and type_spec.placement is placements.CLIENTS
        and not type_spec.all_equal
    )


def _contains_split_leaf(type_spec: computation_types.Type) -> bool:
    # Only structs are descended into, exactly like TFF's `_partition_value`:
    # a function-typed argument is an opaque value, even if its signature
    # mentions CLIENTS.
    if isinstance(type_spec, computation_types.StructType):
        return any(
            _contains_split_leaf(element_type)
            for _, element_type in structure.iter_elements(type_spec)
        )
    return _is_split_leaf(type_spec)


def has_no_per_client_part(type_spec: computation_types.Type) -> bool:
    """Whether every federated value in `type_spec` is all-equal (none CLIENTS-placed).

    TFF's test for running `after_merge` once instead of once per part; also
    whether a silo's part may be dropped (`participation.droppable`).
    """

    def all_equal(t: computation_types.Type) -> bool:
        return not isinstance(t, computation_types.FederatedType) or t.all_equal

    return type_analysis.contains_only(type_spec, all_equal)


def _client_ranges(num_clients: int, num_silos: int) -> list[slice]:
    """Contiguous client ranges, one per used silo, sizes as even as possible.

    Computed once from the client count, never from the value being walked, so
    the ranges cannot depend on the order of the argument's elements (which is
    TFF's bug).  Earlier silos get the extra client, which is what TFF's
    repeated `ceil(remaining_clients / remaining_partitions)` yields too.  No
    silo gets an empty range: TFF's contexts reject empty CLIENTS values.
    """
    num_parts = min(num_silos, num_clients)
    base_size, num_larger = divmod(num_clients, num_parts)
    ranges = []
    start = 0
    for part in range(num_parts):
        end = start + base_size + (1 if part < num_larger else 0)
        ranges.append(slice(start, end))
        start = end
    return ranges


def _take_clients(
    value: object,
    type_spec: computation_types.Type,
    clients: slice,
    num_clients: int,
) -> object:
    """Returns `value` restricted to the clients in `clients`.

    Every non-all-equal CLIENTS leaf is sliced with the same `clients` range;
    anything else is passed through unchanged (the same object).
    """
    if not _contains_split_leaf(type_spec):
        # SERVER-placed, all-equal CLIENTS, unplaced values, and structs made only
        # of those, are needed whole by every silo.  Passing them through as they
        # are (rather than rebuilding them) keeps whatever Python representation
        # the caller used, which the silo context knows how to ingest.
        return value
    if isinstance(type_spec, computation_types.StructType):
        struct_value = structure.from_container(value)
        if len(struct_value) != len(type_spec):
            raise ValueError(
                f"Expected a value with {len(type_spec)} elements for type "
                f"{type_spec}, found {len(struct_value)} elements: {value!r}."
            )
        # Elements are matched by position, like TFF's `_partition_value` and
        # `cardinalities_utils.infer_cardinalities` (which established the client
        # count we split by) do.  Names come from the type, as in TFF.
        return structure.Struct(
            [
                (name, _take_clients(element, element_type, clients, num_clients))
                for (_, element), (name, element_type) in zip(
                    structure.iter_elements(struct_value),
                    structure.iter_elements(type_spec),
                    strict=True,  # lengths checked above
                )
            ]
        )
    # A non-all-equal CLIENTS leaf: `infer_cardinalities` accepted it, so it is
    # a list or tuple unless it is an already-embedded value carrying its own
    # cardinality, which cannot be sliced here.
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"Cannot split a value of Python type {type(value)} of type "
            f"{type_spec} over silos; expected a list or tuple with one member "
            "per client."
        )
    if len(value) != num_clients:
        # Cannot happen for values `infer_cardinalities` accepted; checked so that
        # a mismatch fails loudly instead of dropping or duplicating clients.
        raise ValueError(
            f"Expected {num_clients} clients in value of type {type_spec}, found {len(value)}."
        )
    return value[clients]


def split_over_silos(
    value: object,
    type_spec: computation_types.Type,
    num_silos: int,
) -> list[object]:
    """Splits `value`'s clients over up to `num_silos` silos.

    Same contract as TFF 0.87's `_split_value_into_subrounds` (in
    `mergeable_comp_execution_context`), without its bug (see the module
    docstring):

    * If `value` has no non-all-equal `tff.CLIENTS`-placed part, it is returned
      `num_silos` times: the computation may still do CLIENTS-placed work with a
      default cardinality, and every silo should run it.
    * If it has zero clients, `[value]` is returned: the computation runs once,
      over no clients.
    * Otherwise `min(num_silos, num_clients)` parts are returned.  Part `i`
      holds the contiguous range of clients `[start_i, end_i)`; ranges are as
      even as possible (earlier parts get the extra client), non-empty, and
      together cover every client exactly once, in order.  The same range is
      applied to every non-all-equal CLIENTS leaf at any nesting depth;
      SERVER-placed, all-equal CLIENTS and unplaced values are replicated
      unchanged.  Structs on the way to a CLIENTS leaf are rebuilt as
      `structure.Struct`s carrying the type's names, as TFF does.

    Args:
      value: The argument of a computation, in any form TFF's execution
        contexts accept (`structure.Struct`, list, tuple, dict, `OrderedDict`,
        attrs class, namedtuple, ...).
      type_spec: The TFF type of `value`.
      num_silos: The desired number of parts, at least 1.

    Returns:
      The list of per-silo arguments.

    Raises:
      TypeError: If `type_spec` is not a `tff.Type`, or a CLIENTS-placed value
        is not a list or tuple.
      ValueError: If `num_silos` is smaller than 1, or CLIENTS-placed values
        disagree on the number of clients.
    """
    if not isinstance(type_spec, computation_types.Type):
        raise TypeError(f"Expected `type_spec` to be a `tff.Type`, found {type(type_spec)}.")
    if num_silos < 1:
        raise ValueError(f"Expected at least one silo, found {num_silos}.")
    # Also validates that every CLIENTS leaf has the same number of clients, so
    # the single set of ranges below fits all of them.
    cardinalities = cardinalities_utils.infer_cardinalities(value, type_spec)
    num_clients = cardinalities.get(placements.CLIENTS)
    if num_clients is None:
        return [value for _ in range(num_silos)]
    if num_clients == 0:
        return [value]
    return [
        _take_clients(value, type_spec, clients, num_clients)
        for clients in _client_ranges(num_clients, num_silos)
    ]


class PartitionedArgument(typed_object.TypedObject):
    """An argument split over silos by `split_over_silos`.

    Drop-in replacement for TFF's `MergeableCompExecutionContextValue`, whose
    constructor splits with the buggy `_split_value_into_subrounds`.
    """

    def __init__(
        self,
        value: object,
        type_spec: computation_types.Type,
        num_silos: int,
    ):
        self._type_signature = type_spec
        self._parts = split_over_silos(value, type_spec, num_silos)

    @property
    def type_signature(self) -> computation_types.Type:
        return self._type_signature

    def value(self) -> list[object]:
        """Returns the per-silo arguments, one list element per part."""
        return self._parts


def part_arguments(
    arg: PartitionedArgument | None, num_contexts: int
) -> list[sent_once.SentOnce | None]:
    """What each part's `up_to_merge` and `after_merge` are given.

    Not in TFF: each part is a `SentOnce`, so that a silo receives its part
    once, not once for `up_to_merge` and again for `after_merge`. Without an
    argument, every context runs the computation once, over its default
    clients.
    """
    if arg is None:
        return [None] * num_contexts
    return sent_once.sent_once(arg.value(), arg.type_signature)


async def _invoke_after_merge_in_order(
    comp: mergeable_comp_execution_context.MergeableCompForm,
    merge_result: object,
    arg_list: Sequence[object],
    execution_contexts: Sequence[context_base.AsyncContext],
) -> list[object]:
    """Runs `after_merge` on every part; returns the results in part order.

    Replaces TFF 0.87's `_invoke_after_merge_in_async_pool`, which appends each
    part's result when its context *finishes*, so the CLIENTS-placed results
    that `_repackage_partitioned_values` then concatenates come back in the
    order the silos finished rather than in client order (the second TFF bug in
    docs/tff-partitioning-bug.md).  Here every task carries its part's index and
    the results are put back in index order.

    Scheduling is TFF's, by way of its `_run_in_async_context_pool`: part `i`
    starts on context `i`; when there are more parts than contexts, a context
    that finishes a part runs the next part not yet started.
    """

    async def run_part(index: int, part: object, context: context_base.AsyncContext):
        return index, await tffi.compute_after_merged(comp, part, merge_result, context)

    def task_fn(indexed_part: tuple[int, object], context: context_base.AsyncContext):
        index, part = indexed_part
        return asyncio.create_task(run_part(index, part, context))

    async def postprocessing(
        results: tuple[tuple[int, object], ...],
        indexed_result: tuple[int, object],
        context: context_base.AsyncContext,
    ) -> tuple[tuple[int, object], ...]:
        del context  # unused, as in TFF
        return (*results, indexed_result)

    indexed_results, _ = await tffi.run_in_async_context_pool(
        task_fn, list(enumerate(arg_list)), execution_contexts, (), postprocessing
    )
    indexed_results = sorted(indexed_results, key=lambda indexed: indexed[0])
    if [index for index, _ in indexed_results] != list(range(len(arg_list))):
        # Cannot happen: every part is run exactly once.  Checked so that a
        # change in TFF's pool fails loudly instead of dropping clients.
        raise AssertionError(
            f"after_merge ran parts {[index for index, _ in indexed_results]}, "
            f"expected each of 0..{len(arg_list) - 1} once."
        )
    return [result for _, result in indexed_results]


_NO_RESULT_YET = object()


async def _invoke_merge_on_coordinator(
    comp: mergeable_comp_execution_context.MergeableCompForm,
    arg_list: Sequence[object],
    execution_contexts: Sequence[context_base.AsyncContext],
    merge_context: context_base.AsyncContext,
) -> tuple[object, context_base.AsyncContext | None]:
    """Runs `up_to_merge` on the silos and every `merge` in `merge_context`.

    Replaces TFF 0.87's `_invoke_merge_in_async_pool`, which runs each `merge`
    on the silo context that has just finished, sending it another silo's
    partial aggregate.  `up_to_merge` is scheduled by TFF's
    `_run_in_async_context_pool` (part `i` on context `i`, extra parts on
    whichever context finishes first).  The partial results are merged in
    *part* order, `((p0 + p1) + p2) + ...`, whatever order the silos finish
    in: a part is merged as soon as every part before it has been, so merging
    still overlaps the slower silos.  Merging is order-insensitive by contract
    but floating-point sums are not associative, and merging in finishing
    order (as TFF does) gave runs on the same inputs results differing in
    their last bits (`make demo`'s FedAvg loss).  Returns the merged result
    and, as TFF does, the silo context that finished last (unused by the
    callers here: given a `merge_context`, an all-equal `after_merge` runs
    in it, not on a silo).
    """

    async def run_part(
        index: int, part: object, context: context_base.AsyncContext
    ) -> tuple[int, object]:
        return index, await tffi.invoke_up_to_merge_and_return_context(comp, part, context)

    def task_fn(
        indexed_part: tuple[int, object], context: context_base.AsyncContext
    ) -> asyncio.Task:
        index, part = indexed_part
        return asyncio.create_task(run_part(index, part, context))

    finished: dict[int, object] = {}  # partial results of parts not merged yet
    next_part = 0  # the next part to fold into the running merge

    async def postprocessing(
        result: object, indexed_partial: tuple[int, object], context: context_base.AsyncContext
    ) -> object:
        nonlocal next_part
        del context  # the silo that computed the partial result: it must not merge
        index, partial_result = indexed_partial
        finished[index] = partial_result
        while next_part in finished:
            partial_result = finished.pop(next_part)
            next_part += 1
            if result is _NO_RESULT_YET:
                result = partial_result
            else:
                result = await tffi.merge_results(comp, result, partial_result, merge_context)
        return result

    merged, last_context = await tffi.run_in_async_context_pool(
        task_fn, list(enumerate(arg_list)), execution_contexts, _NO_RESULT_YET, postprocessing
    )
    if finished or next_part != len(arg_list):
        # Cannot happen: every part is run exactly once.  Checked so that a
        # change in TFF's pool fails loudly instead of dropping a part.
        raise AssertionError(
            f"merged {next_part} of {len(arg_list)} parts; left unmerged: {sorted(finished)}"
        )
    return merged, last_context


_wholes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_wholes_lock = threading.Lock()


def _whole(comp: mergeable_comp_execution_context.MergeableCompForm) -> object:
    """`comp` as one computation: `after_merge(arg, up_to_merge(arg))`.

    What runs when an invocation has a single part (one silo, or one client):
    there is nothing to merge, so `up_to_merge` and `after_merge` run as one
    invocation on that part's silo, one broker round trip where the two
    steps took two (or one and 5 calls to the merge executor). The silo
    learns nothing it did not hold: with one part it already receives the
    whole argument, and the merged result is its own partial result, so
    what `after_merge` makes of them it could compute itself. TFF's remote
    runtime likewise runs a computation whole on its one worker.

    One per `comp` (TFF's compiler caches `comp`), so each silo context
    compiles it once.
    """
    with _wholes_lock:
        whole = _wholes.get(comp)
        if whole is None:
            whole = _wholes[comp] = _compose(comp)
        return whole


def _compose(comp: mergeable_comp_execution_context.MergeableCompForm) -> object:
    parameter = comp.up_to_merge.type_signature.parameter
    if parameter is None:
        return tffi.federated_computation(lambda: comp.after_merge(comp.up_to_merge()))
    # As `compute_after_merged`: with an argument, `after_merge` takes
    # `<original_arg, merge_result>`.
    return tffi.federated_computation(
        lambda arg: comp.after_merge(arg, comp.up_to_merge(arg)), parameter
    )


async def _invoke_mergeable_comp_form_in_order(
    comp: mergeable_comp_execution_context.MergeableCompForm,
    arg: PartitionedArgument | None,
    execution_contexts: Sequence[context_base.AsyncContext],
    merge_context: context_base.AsyncContext | None = None,
) -> object:
    """Invokes `comp` on `arg` over the silos; a single value, clients in order.

    Mirrors TFF 0.87's `_invoke_mergeable_comp_form` line for line, except that
    `after_merge` runs through `_invoke_after_merge_in_order` instead of TFF's
    `_invoke_after_merge_in_async_pool`.  TFF's version concatenates the
    CLIENTS-placed results of the parts in the order the silos *finish*, so a
    per-client result `[0, 9, 19]` could come back as `[19, 0, 9]`.  Without a
    `merge_context`, `merge` sees the partial results in finishing order, as in
    TFF; with one, in part order (`_invoke_merge_on_coordinator`).

    With a `merge_context`, every `merge` runs there (on the coordinator)
    instead of on a silo, by way of `_invoke_merge_on_coordinator`, and so does
    an `after_merge` whose result has no per-client part. A single part has
    nothing to merge: `comp` then runs whole on its silo (`_whole`).
    """
    # Not TFF's: each part is sent to a silo once (see `part_arguments`).
    arg_list = part_arguments(arg, len(execution_contexts))
    if len(arg_list) == 1:
        # Not TFF's either: one part has nothing to merge (see `_whole`).
        result = await execution_contexts[0].invoke(_whole(comp), arg_list[0])
        return tffi.repackage_partitioned_values(
            [result], result_type_spec=comp.after_merge.type_signature.result
        )

    if merge_context is None:
        merge_result, last_context = await tffi.invoke_merge_in_async_pool(
            comp, arg_list, execution_contexts
        )
    else:
        merge_result, last_context = await _invoke_merge_on_coordinator(
            comp, arg_list, execution_contexts, merge_context
        )

    if has_no_per_client_part(comp.after_merge.type_signature.result):
        # No per-client part in the result: every part's after_merge would give
        # the same value, so, as TFF does, it runs once, on the first part. TFF
        # runs it on the silo that finished last, which thereby sees the final
        # aggregate (the global mean, the new model); with a `merge_context`
        # it runs on the coordinator, which already holds every input it
        # needs, and the round saves a broker round trip.
        context = merge_context if merge_context is not None else last_context
        return await tffi.compute_after_merged(comp, arg_list[0], merge_result, context)

    # The one deliberate difference from TFF: results are kept in part order,
    # which `split_over_silos` makes client order.
    after_merge_results = await _invoke_after_merge_in_order(
        comp, merge_result, arg_list, execution_contexts
    )
    return tffi.repackage_partitioned_values(
        after_merge_results, result_type_spec=comp.after_merge.type_signature.result
    )


class SiloSplittingContext(mergeable_comp_execution_context.MergeableCompExecutionContext):
    """TFF's `MergeableCompExecutionContext`, splitting arguments correctly.

    `invoke` differs from TFF's by two fixes of TFF 0.87 bugs: it wraps the
    argument in `PartitionedArgument` instead of TFF's
    `MergeableCompExecutionContextValue`, and runs the computation with
    `_invoke_mergeable_comp_form_in_order`, which returns CLIENTS-placed
    results in client order, instead of TFF's `_invoke_mergeable_comp_form`.
    Beyond TFF, the constructor takes where `merge` runs (`merge_context`)
    and which silos an invocation needs (`participation`; with one, `invoke`
    hands the invocation to it, which keeps both fixes).
    Construction, compilation to `MergeableCompForm`, running `up_to_merge` /
    `after_merge` over the silos and repackaging results are TFF's helpers,
    and so is `merge` when no `merge_context` is given.  The number of parts
    is TFF's `num_subrounds` (by default the number of silo contexts; extra
    parts are run sequentially, as in TFF: a context that finishes a part
    runs the next one).

    Given a `merge_context` (an async TFF context the coordinator owns, see
    `flaap_mq.coordinator.local_merge`), every `merge` runs there, so no silo
    receives another silo's partial result; without one, `merge` runs on the
    silos, as in TFF.
    """

    def __init__(
        self,
        async_contexts: Sequence[context_base.AsyncContext],
        *args: Any,
        merge_context: context_base.AsyncContext | None = None,
        participation: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(async_contexts, *args, **kwargs)
        if merge_context is not None:
            py_typecheck.check_type(merge_context, context_base.AsyncContext)
        self._merge_context = merge_context
        # A `participation.ParticipationPolicy`: which silos an invocation
        # runs on and must hear from; None: every silo, as in TFF.
        self._participation = participation

    @property
    def merge_context(self) -> context_base.AsyncContext | None:
        """Where `merge` runs; `None`: on the silos, as in TFF."""
        return self._merge_context

    def invoke(
        self,
        comp: mergeable_comp_execution_context.MergeableCompForm | computation_base.Computation,
        arg: object | None = None,
    ) -> Any:
        # This body mirrors TFF 0.87's `MergeableCompExecutionContext.invoke`
        # line for line, except where marked, so behaviour stays TFF's.
        py_typecheck.check_type(
            comp,
            (mergeable_comp_execution_context.MergeableCompForm, computation_base.Computation),
        )

        if isinstance(comp, computation_base.Computation):
            if self._compiler_pipeline is None:
                raise ValueError(
                    "Without a compiler, mergeable comp execution context "
                    "can only invoke instances of MergeableCompForm. "
                    "Encountered a `tff.Computation`."
                )
            comp = self._compiler_pipeline.compile(comp)
            if not isinstance(comp, mergeable_comp_execution_context.MergeableCompForm):
                raise ValueError(
                    "Expected compilation in mergeable comp execution "
                    "context to produce an instance of MergeableCompForm; "
                    f"found instead {comp} of Python type {type(comp)}."
                )

        # Note: like TFF's, this `invoke` never applies `self._transform_args`
        # (only `transform_result` is used).  Kept as is so this method differs
        # from TFF's only where marked; the silo contexts apply their own
        # argument transformations anyway.
        if arg is not None:
            # Fix 1 of 2: split with
            # `split_over_silos` (via `PartitionedArgument`) rather than TFF's
            # `MergeableCompExecutionContextValue`, whose splitting sends the first
            # clients to every silo when the argument's last element is not
            # CLIENTS-placed.
            arg = PartitionedArgument(
                arg,
                comp.up_to_merge.type_signature.parameter,
                self._num_subrounds,
            )

        if self._participation is not None:
            # Silos that drop out (`flaap_mq.coordinator.participation`): it
            # runs `_invoke_mergeable_comp_form_in_order`, or the same steps
            # over the silos that answer.
            run = self._participation.invoke(
                comp, arg, self._async_execution_contexts, self._merge_context
            )
        else:
            # Fix 2 of 2 (the participation path above keeps it too): TFF's
            # `_invoke_mergeable_comp_form` returns CLIENTS-placed results in
            # the order the silos finish; this keeps them in client order.
            run = _invoke_mergeable_comp_form_in_order(
                comp, arg, self._async_execution_contexts, self._merge_context
            )
        result = type_conversions.type_to_py_container(
            self._async_runner.run_coro_and_return_result(run),
            comp.after_merge.type_signature.result,
        )

        if self._transform_result is not None:
            result = self._transform_result(result)
        return result
