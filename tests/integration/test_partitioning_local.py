"""`SiloSplittingContext` over three local TFF C++ runtimes (no broker).

Each silo is TFF's own async local C++ execution context, so these tests
check flaap-mq's argument splitting and result ordering end to end against
TFF's compiler and runtime, and pin TFF 0.87's two bugs that
`SiloSplittingContext` works around (docs/tff-partitioning-bug.md).

Every local C++ context runs a `worker_binary` subprocess that TFF starts on
first use and never stops at exit; the `runtimes` fixture gets its contexts
from `flaap_mq.testing.tff_local.local_cpp_contexts`, which stops them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler
from tensorflow_federated.python.core.impl.context_stack import context_base
from tensorflow_federated.python.core.impl.execution_contexts import (
    mergeable_comp_execution_context as tff_mergeable,
)

from flaap_mq.coordinator.partitioning import SiloSplittingContext
from flaap_mq.testing.tff_local import local_cpp_contexts
from tests.partitioning_computations import (
    CLIENT_READINGS,
    DATA,
    EXPECTED_COUNT,
    SERVER_FLOAT,
    SIX_CLIENTS,
    SIX_COUNTS,
    _count_at_clients,
    nested_readings_above,
    readings_above,
    readings_above_limit_first,
    weighted_clipped_mean,
)

NUM_SILOS = 3

# --------------------------------------------------------------------------
# Computations.


@tff.federated_computation(CLIENT_READINGS, SERVER_FLOAT)
def counts_and_total(readings, limit):
    counts = _count_at_clients(readings, limit)
    return counts, tff.federated_sum(counts)


# Ends in the CLIENTS value, so that TFF's own class splits it right and only
# its result ordering is tested.
@tff.federated_computation(SERVER_FLOAT, CLIENT_READINGS)
def counts_and_total_limit_first(limit, readings):
    counts = _count_at_clients(readings, limit)
    return counts, tff.federated_sum(counts)


# --------------------------------------------------------------------------
# Runtimes.


@dataclasses.dataclass
class Runtimes:
    silos: list[context_base.AsyncContext]  # one async local C++ context per silo
    reference: context_base.SyncContext | None  # one plain TFF runtime, no splitting

    def silo_splitting(self) -> SiloSplittingContext:
        return SiloSplittingContext(
            self.silos, compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form
        )

    def tff_context(self) -> tff_mergeable.MergeableCompExecutionContext:
        """TFF's own class over the same silos, for the tests pinning its bug."""
        return tff_mergeable.MergeableCompExecutionContext(
            self.silos, compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form
        )


class DelayedContext(context_base.AsyncContext):
    """An async context that starts every invocation `delay_s` late.

    Silos delayed by different amounts finish in a known order, whatever the
    scheduling of their (tiny) computations.
    """

    def __init__(self, context: context_base.AsyncContext, delay_s: float) -> None:
        self._context = context
        self._delay_s = delay_s

    async def invoke(self, comp, arg):
        await asyncio.sleep(self._delay_s)
        return await self._context.invoke(comp, arg)


def delayed(silos: list[context_base.AsyncContext], delays_s: list[float]):
    return [DelayedContext(silo, delay) for silo, delay in zip(silos, delays_s, strict=True)]


# Silo 0 finishes last, silo 2 first.
FIRST_SILO_LAST = [0.8, 0.4, 0.0]


@pytest.fixture(scope="module")
def runtimes() -> Iterator[Runtimes]:
    # `local_cpp_contexts` stops the `worker_binary` each context starts, which
    # TFF itself never does.
    with local_cpp_contexts(NUM_SILOS, with_sync=True) as (silos, reference):
        yield Runtimes(silos=silos, reference=reference)


def run_in(context, computation, *args):
    with tff.framework.get_context_stack().install(context):
        return computation(*args)


# --------------------------------------------------------------------------
# SiloSplittingContext gives the single-runtime answers.


def test_readings_above_counts_every_client_once(runtimes):
    assert run_in(runtimes.silo_splitting(), readings_above, DATA, 10.0) == EXPECTED_COUNT


def test_readings_above_with_server_parameter_first(runtimes):
    result = run_in(runtimes.silo_splitting(), readings_above_limit_first, 10.0, DATA)
    assert result == EXPECTED_COUNT


def test_weighted_mean_with_server_parameter_last_matches_single_runtime(runtimes):
    weights = [1.0, 2.0, 3.0]
    expected = run_in(runtimes.reference, weighted_clipped_mean, DATA, weights, 15.0)
    # Client means of readings clipped at 15: 4.5, 9.0, 11.0.
    assert expected == pytest.approx((1 * 4.5 + 2 * 9.0 + 3 * 11.0) / 6)
    result = run_in(runtimes.silo_splitting(), weighted_clipped_mean, DATA, weights, 15.0)
    assert result == pytest.approx(expected)


def test_nested_struct_with_clients_in_the_middle_matches_single_runtime(runtimes):
    argument = {"limit": 10.0, "batch": {"readings": DATA, "tag": 7}, "factor": 2.0}
    expected = run_in(runtimes.reference, nested_readings_above, argument)
    assert expected == pytest.approx(2.0 * EXPECTED_COUNT)
    result = run_in(runtimes.silo_splitting(), nested_readings_above, argument)
    assert result == pytest.approx(expected)


def test_more_silos_than_clients(runtimes):
    two_clients = DATA[:2]  # 0 + 9 readings above 10
    assert run_in(runtimes.silo_splitting(), readings_above, two_clients, 10.0) == 9


def test_clients_placed_result_has_every_client_once_in_order(runtimes):
    counts, total = run_in(runtimes.silo_splitting(), counts_and_total, DATA, 10.0)
    assert total == EXPECTED_COUNT
    # TFF's `_invoke_after_merge_in_async_pool` would concatenate the silos'
    # CLIENTS-placed results in the order the silos finish (seen: [19, 9, 0],
    # [9, 0, 19]); SiloSplittingContext keeps them in client order.
    assert list(counts) == [0, 9, 19]


def test_clients_placed_result_in_client_order_when_first_silo_finishes_last(runtimes):
    context = SiloSplittingContext(
        delayed(runtimes.silos, FIRST_SILO_LAST),
        compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form,
    )
    counts, total = run_in(context, counts_and_total, DATA, 10.0)
    assert list(counts) == [0, 9, 19]
    assert total == EXPECTED_COUNT


def test_more_parts_than_silos_keeps_client_order(runtimes):
    # Four parts over two silos: part 0 runs on the slow silo, parts 1, 2 and
    # 3 one after the other on the fast one, so part 0 finishes last.
    context = SiloSplittingContext(
        delayed(runtimes.silos[:2], [0.8, 0.0]),
        compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form,
        num_subrounds=4,
    )
    expected = run_in(runtimes.reference, counts_and_total, SIX_CLIENTS, 10.0)
    assert list(expected[0]) == SIX_COUNTS
    counts, total = run_in(context, counts_and_total, SIX_CLIENTS, 10.0)
    assert list(counts) == SIX_COUNTS
    assert total == expected[1] == sum(SIX_COUNTS)


# --------------------------------------------------------------------------
# TFF 0.87's bugs, pinned.  Fail once TFF splits correctly, or keeps clients in
# order.


@pytest.mark.parametrize(
    ("num_silos", "measured_wrong_count"),
    [(2, 18), (3, 0)],
)
def test_tff_mergeable_context_bug_miscounts_when_argument_ends_in_server_value(
    runtimes, num_silos, measured_wrong_count
):
    """TFF's own MergeableCompExecutionContext sends the first client slice to
    every silo for a (CLIENTS, SERVER) argument: 18 over two silos, 0 over
    three, instead of 28.  If this fails, TFF may have fixed the bug (see
    docs/tff-partitioning-bug.md) and SiloSplittingContext may be retired."""
    context = tff_mergeable.MergeableCompExecutionContext(
        runtimes.silos[:num_silos],
        compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form,
    )  # TFF's class; `Runtimes.tff_context` uses all three silos
    result = run_in(context, readings_above, DATA, 10.0)
    assert result != EXPECTED_COUNT
    assert result == measured_wrong_count


def test_tff_mergeable_context_is_right_when_argument_ends_in_clients_value(runtimes):
    """The bug depends on the order of the parameters only."""
    assert run_in(runtimes.tff_context(), readings_above_limit_first, 10.0, DATA) == EXPECTED_COUNT


def test_tff_mergeable_context_bug_returns_clients_in_the_order_silos_finish(runtimes):
    """TFF's `_invoke_after_merge_in_async_pool` concatenates the per-client
    results in the order the silos finish: reversed here, as silo 2 finishes
    first and silo 0 last.  If this fails, TFF may have fixed the bug (see
    docs/tff-partitioning-bug.md)."""
    context = tff_mergeable.MergeableCompExecutionContext(
        delayed(runtimes.silos, FIRST_SILO_LAST),
        compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form,
    )
    counts, total = run_in(context, counts_and_total_limit_first, 10.0, DATA)
    assert total == EXPECTED_COUNT  # the splitting is right for this argument
    assert list(counts) == [19, 9, 0]
