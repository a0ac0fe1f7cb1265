"""`SiloSplittingContext` over three local TFF C++ runtimes (no broker).

Each silo is TFF's own async local C++ execution context, so these tests
check flaap-mq's argument splitting end to end against TFF's compiler and
runtime, and pin TFF 0.87's splitting bug (docs/tff-partitioning-bug.md).

Every local C++ context runs a `worker_binary` subprocess that TFF starts on
first use and never stops at exit; the `runtimes` fixture stops the ones
these tests started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler
from tensorflow_federated.python.core.impl.context_stack import context_base
from tensorflow_federated.python.core.impl.execution_contexts import (
    mergeable_comp_execution_context as tff_mergeable,
)

from flaap_mq.coordinator.partitioning import SiloSplittingContext

NUM_SILOS = 3

# --------------------------------------------------------------------------
# Computations.

READINGS = tff.SequenceType(np.float32)
CLIENT_READINGS = tff.FederatedType(READINGS, tff.CLIENTS)
SERVER_FLOAT = tff.FederatedType(np.float32, tff.SERVER)

# Three clients; with limit 10.0 they have 0, 9 and 19 readings above it.
DATA = [[float(x) for x in range(n)] for n in (10, 20, 30)]
EXPECTED_COUNT = 28


@tff.tensorflow.computation(READINGS, np.float32)
def count_above(readings, limit):
    return readings.reduce(np.int32(0), lambda n, x: n + tf.cast(x > limit, tf.int32))


@tff.tensorflow.computation(READINGS, np.float32)
def clipped_mean(readings, limit):
    total, count = readings.reduce(
        (np.float32(0.0), np.float32(0.0)),
        lambda acc, x: (acc[0] + tf.minimum(x, limit), acc[1] + 1.0),
    )
    return total / count


@tff.tensorflow.computation(np.int32, np.float32)
def scale(count, factor):
    return tf.cast(count, tf.float32) * factor


def _count_at_clients(readings, limit):
    return tff.federated_map(
        count_above, tff.federated_zip([readings, tff.federated_broadcast(limit)])
    )


# The shape that triggers TFF's bug: the argument ends in a SERVER value.
@tff.federated_computation(CLIENT_READINGS, SERVER_FLOAT)
def readings_above(readings, limit):
    return tff.federated_sum(_count_at_clients(readings, limit))


# Same computation, parameters swapped: TFF's own splitting happens to be right
# for this one, because the argument ends in the CLIENTS value.
@tff.federated_computation(SERVER_FLOAT, CLIENT_READINGS)
def readings_above_limit_first(limit, readings):
    return tff.federated_sum(_count_at_clients(readings, limit))


@tff.federated_computation(
    CLIENT_READINGS, tff.FederatedType(np.float32, tff.CLIENTS), SERVER_FLOAT
)
def weighted_clipped_mean(readings, weights, limit):
    means = tff.federated_map(
        clipped_mean, tff.federated_zip([readings, tff.federated_broadcast(limit)])
    )
    return tff.federated_mean(means, weights)


NESTED_ARGUMENT = tff.StructType(
    [
        ("limit", SERVER_FLOAT),
        (
            "batch",
            tff.StructType(
                [
                    ("readings", CLIENT_READINGS),
                    ("tag", tff.FederatedType(np.int32, tff.SERVER)),
                ]
            ),
        ),
        ("factor", SERVER_FLOAT),
    ]
)


@tff.federated_computation(NESTED_ARGUMENT)
def nested_readings_above(arg):
    total = tff.federated_sum(_count_at_clients(arg.batch.readings, arg.limit))
    return tff.federated_map(scale, tff.federated_zip([total, arg.factor]))


@tff.federated_computation(CLIENT_READINGS, SERVER_FLOAT)
def counts_and_total(readings, limit):
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


def _worker_binaries() -> list[psutil.Process]:
    """`worker_binary` processes descending from this (pytest) process."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name() == "worker_binary" or any(
                "worker_binary" in part for part in process.cmdline()
            ):
                found.append(process)
        except psutil.ZombieProcess:
            # Dead but not reaped yet: its command line is gone, its name is not.
            if process.name() == "worker_binary":
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def _is_dead(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until_dead(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits for `processes` to exit *without reaping them*; returns the living."""
    deadline = time.monotonic() + timeout
    alive = [p for p in processes if not _is_dead(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not _is_dead(p)]
    return alive


def _stop_worker_binaries(started: list[psutil.Process], runtimes: Runtimes) -> None:
    # TFF only signals a worker from `ServiceManager.__del__`, i.e. when its
    # context is garbage-collected, which for live contexts happens at
    # interpreter shutdown, if at all, and then fails; the worker outlives us.
    # It sends SIGINT, and then waits: a worker_binary that inherited SIGINT
    # as ignored (e.g. started under a non-interactive shell's background
    # job) would never exit.  So: SIGTERM, then SIGKILL if need be.
    for process in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    for process in _wait_until_dead(started, timeout=30):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    assert not _wait_until_dead(started, timeout=10), "worker_binary survived SIGKILL"

    # The workers are dead but not reaped, so their pids cannot be reused yet.
    # Dropping the contexts now lets TFF's `ServiceManager.__del__` reap them
    # with its own `Popen.wait()`: its SIGINT to a zombie is harmless, whereas
    # after a reap by us it would raise ProcessLookupError (or hit a recycled
    # pid).  Whatever it did not reap (contexts still referenced) we reap here.
    runtimes.silos.clear()
    runtimes.reference = None
    gc.collect()
    psutil.wait_procs(started, timeout=10)


@pytest.fixture(scope="module")
def runtimes() -> Iterator[Runtimes]:
    # Workers already running belong to someone else (e.g. another module's
    # fixture); only the ones started while this module runs are stopped.
    already_running = {process.pid for process in _worker_binaries()}
    runtimes = Runtimes(
        silos=[
            tff.backends.native.create_async_local_cpp_execution_context() for _ in range(NUM_SILOS)
        ],
        reference=tff.backends.native.create_sync_local_cpp_execution_context(),
    )
    try:
        yield runtimes
    finally:
        started = [p for p in _worker_binaries() if p.pid not in already_running]
        _stop_worker_binaries(started, runtimes)
        left = [p.pid for p in _worker_binaries() if p.pid not in already_running]
        assert not left, f"worker_binary processes left running: {left}"


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


def test_clients_placed_result_has_every_client_once(runtimes):
    counts, total = run_in(runtimes.silo_splitting(), counts_and_total, DATA, 10.0)
    assert total == EXPECTED_COUNT
    # Sorted on purpose: TFF's `_invoke_after_merge_in_async_pool` concatenates
    # the silos' CLIENTS-placed results in the order the silos *finish*, not in
    # client order (seen: [19, 0, 9]).  That is TFF's repackaging, which
    # SiloSplittingContext keeps; it is not part of argument splitting.
    assert sorted(counts) == [0, 9, 19]


# --------------------------------------------------------------------------
# TFF 0.87's bug, pinned.  Fails once TFF splits correctly.


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
