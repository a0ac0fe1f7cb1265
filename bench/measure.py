"""The three measurements, each flaap-mq and TFF's direct path side by side.

Every sample pair is taken back to back, alternating which path goes first,
after warm-up invocations (compilation, executor creation) that are not
counted, so that both paths see the same machine load.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow_federated as tff

from bench import computations
from bench.baseline import DirectSilos
from bench.mq import MqSilos
from bench.wire import WireCount

MQ = "flaap-mq"
DIRECT = "tff-direct"
MB = 1e6

Run = Callable[[], float]


def timed_invocation(
    context: object, comp: tff.Computation, arg: object, check: Callable[[object], None]
) -> Run:
    """A run that invokes `comp(arg)` in `context`, checks the result, returns seconds."""

    def run() -> float:
        with tff.framework.get_context_stack().install(context):
            start = time.perf_counter()
            result = comp(arg)
            elapsed = time.perf_counter() - start
        check(result)
        return elapsed

    return run


def warm_up(runs: Mapping[str, Run], times: int) -> None:
    """Unrecorded runs: compilation, executor creation, first connections."""
    for _ in range(times):
        for run in runs.values():
            run()


def interleaved(runs: Mapping[str, Run], repeats: int) -> dict[str, list[float]]:
    """`repeats` samples of each run, back to back, alternating which goes first."""
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            samples[name].append(runs[name]())
    return samples


def equals(expected: float) -> Callable[[object], None]:
    def check(result: object) -> None:
        if not np.isclose(float(result), expected):  # type: ignore[arg-type]
            raise AssertionError(f"wrong result: {result!r}, expected {expected}")

    return check


class Counted:
    """Requests and bytes each path sent between `__enter__` and `__exit__`."""

    def __init__(self, counts: Mapping[str, WireCount]) -> None:
        self._counts = counts
        self._before: dict[str, tuple[int, int, int]] = {}
        self.delta: dict[str, tuple[int, int, int]] = {}

    def __enter__(self) -> Counted:
        self._before = {name: c.snapshot() for name, c in self._counts.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for name, count in self._counts.items():
            now, before = count.snapshot(), self._before[name]
            self.delta[name] = tuple(a - b for a, b in zip(now, before, strict=True))  # type: ignore[assignment]

    def per_call(self, name: str, calls: int) -> dict[str, float]:
        requests, bytes_out, bytes_in = self.delta[name]
        return {
            "requests": requests / calls,
            "bytes_out": bytes_out / calls,
            "bytes_in": bytes_in / calls,
        }


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


# ------------------------------------------------------------------ row 1


def measure_round(mq: MqSilos, direct: DirectSilos, num_silos: int, repeats: int) -> dict:
    """Round time over `num_silos` silos, one client each, each client waiting 1 s."""
    arg = [1.0] * num_silos
    check = equals(float(num_silos))
    counts = {MQ: mq.count, DIRECT: direct.count}
    with contextlib.closing(mq.context(num_silos)) as mq_context:
        runs = {
            MQ: timed_invocation(mq_context, computations.round_fn, arg, check),
            DIRECT: timed_invocation(direct.context(num_silos), computations.round_fn, arg, check),
        }
        warm_up(runs, 1)
        with Counted(counts) as counted:
            samples = interleaved(runs, repeats)
    return {
        "silos": num_silos,
        **{name: {**summary(samples[name]), **counted.per_call(name, repeats)} for name in runs},
    }


def measure_rounds(
    mq: MqSilos, direct: DirectSilos, silo_counts: list[int], repeats: int
) -> list[dict]:
    return [measure_round(mq, direct, n, repeats) for n in silo_counts]


# ------------------------------------------------------------------ row 2


def measure_tiny(mq: MqSilos, direct: DirectSilos, calls: int, warmup: int) -> dict:
    """Median time of a one-float `federated_mean` on one silo, and requests per call."""
    arg, check = [2.0], equals(2.0)
    counts = {MQ: mq.count, DIRECT: direct.count}
    with contextlib.closing(mq.context(1)) as mq_context:
        runs = {
            MQ: timed_invocation(mq_context, computations.tiny_fn, arg, check),
            DIRECT: timed_invocation(direct.context(1), computations.tiny_fn, arg, check),
        }
        warm_up(runs, warmup)
        with Counted(counts) as counted:
            samples = interleaved(runs, calls)
        single = measure_single_requests(mq, mq_context, direct, calls * 4)
    result: dict[str, Any] = {}
    for name in runs:
        per_call = counted.per_call(name, calls)
        invocation = summary(samples[name])
        result[name] = {
            "invocation_s": invocation,
            **per_call,
            "per_request_s": invocation["median"] / per_call["requests"],
            "single_request_s": summary(single[name]),
        }
    return result


def measure_single_requests(
    mq: MqSilos, mq_context: object, direct: DirectSilos, calls: int
) -> dict[str, list[float]]:
    """Round-trip time of one `CreateValue` of a float, through each path's executor."""
    executors = {MQ: mq.executor(mq_context), DIRECT: direct.executor(0)}
    try:
        return asyncio.run(_create_value_latencies(executors, calls, warmup=5))
    finally:
        for executor in executors.values():
            executor.close()


async def _create_value_latencies(
    executors: Mapping[str, Any], calls: int, warmup: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in executors}
    names = list(executors)
    for i in range(warmup + calls):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            value = await executors[name].create_value(np.float32(1.0), tff.TensorType(np.float32))
            elapsed = time.perf_counter() - start
            del value  # disposed, batched, as in real use
            if i >= warmup:
                samples[name].append(elapsed)
    return samples


# ------------------------------------------------------------------ row 3


def measure_model_round_trip(
    mq: MqSilos, direct: DirectSilos, num_elements: int, repeats: int
) -> dict:
    """A float32 model of `num_elements` sent to one silo and back (server-side identity)."""
    comp = computations.model_fn(num_elements)
    model = np.random.default_rng(0).random(num_elements, dtype=np.float32)

    def check(result: object) -> None:
        if not np.array_equal(np.asarray(result), model):
            raise AssertionError("the model came back changed")

    counts = {MQ: mq.count, DIRECT: direct.count}
    with contextlib.closing(mq.context(1)) as mq_context:
        runs = {
            MQ: timed_invocation(mq_context, comp, model, check),
            DIRECT: timed_invocation(direct.context(1), comp, model, check),
        }
        warm_up(runs, 1)
        with Counted(counts) as counted:
            samples = interleaved(runs, repeats)
    result: dict[str, Any] = {"model_bytes": model.nbytes}
    for name in runs:
        per_call = counted.per_call(name, repeats)
        seconds = summary(samples[name])
        median = seconds["median"]
        result[name] = {
            "invocation_s": seconds,
            **per_call,
            "round_trip_mb_per_s": 2 * model.nbytes / MB / median,
            "wire_mb_per_s": (per_call["bytes_out"] + per_call["bytes_in"]) / MB / median,
        }
    return result
