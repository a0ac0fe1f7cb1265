"""The three measurements, each flaap-mq and TFF's direct path side by side.

Every sample pair is taken back to back, alternating which path goes first,
after warm-up invocations (compilation, executor creation) that are not
counted, so that both paths see the same machine load. Around every sample
the CPU seconds of each process group are recorded (`bench.cpu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_federated as tff

from bench import computations
from bench.baseline import DirectSilos
from bench.cpu import CpuMeter
from bench.mq import MqSilos
from bench.wire import WireCount

MQ = "flaap-mq"
DIRECT = "tff-direct"
MB = 1e6


@dataclasses.dataclass(frozen=True)
class Sample:
    seconds: float
    cpu: dict[str, float]


Run = Callable[[], Sample]


@dataclasses.dataclass(frozen=True)
class Paths:
    """Both paths' silos, and the meter of every process they run in."""

    mq: MqSilos
    direct: DirectSilos
    meter: CpuMeter

    @property
    def counts(self) -> dict[str, WireCount]:
        return {MQ: self.mq.count, DIRECT: self.direct.count}


@contextlib.contextmanager
def metered(meter: CpuMeter) -> Iterator[list[Sample]]:
    """Yields a list that receives one `Sample` for the `with` body."""
    out: list[Sample] = []
    cpu_before = meter.snapshot(own_last=True)
    start = time.perf_counter()
    yield out
    elapsed = time.perf_counter() - start
    out.append(Sample(elapsed, CpuMeter.delta(cpu_before, meter.snapshot(own_last=False))))


def timed_invocation(
    context: object,
    comp: tff.Computation,
    arg: object,
    check: Callable[[object], None],
    meter: CpuMeter,
) -> Run:
    """A run that invokes `comp(arg)` in `context` and checks the result."""

    def run() -> Sample:
        with tff.framework.get_context_stack().install(context), metered(meter) as sample:
            result = comp(arg)
        check(result)
        return sample[0]

    return run


def warm_up(runs: Mapping[str, Run], times: int) -> None:
    """Unrecorded runs: compilation, executor creation, first connections."""
    for _ in range(times):
        for run in runs.values():
            run()


def interleaved(runs: Mapping[str, Run], repeats: int) -> dict[str, list[Sample]]:
    """`repeats` samples of each run, back to back, alternating which goes first."""
    names = list(runs)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
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
            requests, bytes_out, bytes_in = (a - b for a, b in zip(now, before, strict=True))
            self.delta[name] = (requests, bytes_out, bytes_in)

    def per_call(self, name: str, calls: int) -> dict[str, float]:
        requests, bytes_out, bytes_in = self.delta[name]
        return {
            "requests": requests / calls,
            "bytes_out": bytes_out / calls,
            "bytes_in": bytes_in / calls,
        }


def summary(samples: list[Sample]) -> dict[str, Any]:
    """Median, min and max seconds; mean CPU seconds per sample by process group."""
    seconds = [s.seconds for s in samples]
    groups = samples[0].cpu if samples else {}
    return {
        "median": statistics.median(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "samples": seconds,
        "cpu_s": {g: statistics.fmean(s.cpu[g] for s in samples) for g in groups},
    }


def side_by_side(
    paths: Paths,
    mq_context: object,
    direct_context: object,
    comp: tff.Computation,
    arg: object,
    check: Callable[[object], None],
    *,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """Per path: time summary plus requests and bytes per invocation."""
    runs = {
        MQ: timed_invocation(mq_context, comp, arg, check, paths.meter),
        DIRECT: timed_invocation(direct_context, comp, arg, check, paths.meter),
    }
    warm_up(runs, warmup)
    with Counted(paths.counts) as counted:
        samples = interleaved(runs, repeats)
    return {name: {**summary(samples[name]), **counted.per_call(name, repeats)} for name in runs}


# ------------------------------------------------------------------ row 1


def measure_round(paths: Paths, num_silos: int, repeats: int) -> dict:
    """Round time over `num_silos` silos, one client each, each client waiting 1 s."""
    with contextlib.closing(paths.mq.context(num_silos)) as mq_context:
        result = side_by_side(
            paths,
            mq_context,
            paths.direct.context(num_silos),
            computations.round_fn,
            [1.0] * num_silos,
            equals(float(num_silos)),
            repeats=repeats,
            warmup=1,
        )
    return {"silos": num_silos, **result}


def measure_rounds(paths: Paths, silo_counts: list[int], repeats: int) -> list[dict]:
    return [measure_round(paths, n, repeats) for n in silo_counts]


# ------------------------------------------------------------------ row 2


def measure_tiny(paths: Paths, calls: int, warmup: int) -> dict:
    """A one-float `federated_mean` on one silo, and one executor request alone."""
    with contextlib.closing(paths.mq.context(1)) as mq_context:
        result = side_by_side(
            paths,
            mq_context,
            paths.direct.context(1),
            computations.tiny_fn,
            [2.0],
            equals(2.0),
            repeats=calls,
            warmup=warmup,
        )
        single = measure_single_requests(paths, mq_context, calls * 4)
    for name, row in result.items():
        row["per_request_s"] = row["median"] / row["requests"]
        row["single_request"] = summary(single[name])
    return result


def measure_single_requests(paths: Paths, mq_context: Any, calls: int) -> dict[str, list[Sample]]:
    """Round trips of one float, through each path's executor (`value_round_trips`)."""
    value = np.float32(1.0)
    samples, _ = value_round_trips(paths, mq_context, value, calls, warmup=5)
    return samples


def value_round_trips(
    paths: Paths, mq_context: Any, value: np.ndarray | np.generic, calls: int, warmup: int
) -> tuple[dict[str, list[Sample]], Counted]:
    """`create_value(value)` then `compute()`, straight through each path's executor.

    A value sent to a silo and back: on flaap-mq a one-way CreateValue task
    and an awaited Compute; on TFF's direct path a CreateValue and a Compute
    gRPC call. Every result is checked; requests and bytes are counted.
    """
    executors = {MQ: paths.mq.executor(mq_context), DIRECT: paths.direct.executor(0)}
    type_spec = tff.TensorType(value.dtype, value.shape)
    try:
        return asyncio.run(_round_trips(paths, executors, value, type_spec, calls, warmup))
    finally:
        for executor in executors.values():
            executor.close()


async def _round_trips(
    paths: Paths,
    executors: Mapping[str, Any],
    value: np.ndarray | np.generic,
    type_spec: tff.TensorType,
    calls: int,
    warmup: int,
) -> tuple[dict[str, list[Sample]], Counted]:
    names = list(executors)

    async def round_trip(name: str) -> Sample:
        with metered(paths.meter) as sample:
            made = await executors[name].create_value(value, type_spec)
            back = await made.compute()
        if not np.array_equal(np.asarray(back), value):
            raise AssertionError(f"{name}: the value came back changed")
        return sample[0]  # `made` is disposed, batched, as in real use

    async def alternating(times: int) -> dict[str, list[Sample]]:
        """As `interleaved`: each path in turn, alternating which goes first."""
        samples: dict[str, list[Sample]] = {name: [] for name in names}
        for i in range(times):
            for name in names if i % 2 == 0 else reversed(names):
                samples[name].append(await round_trip(name))
        return samples

    await alternating(warmup)
    with Counted(paths.counts) as counted:
        samples = await alternating(calls)
    return samples, counted


# ------------------------------------------------------------------ row 3


def measure_model_round_trip(
    paths: Paths, num_elements: int, repeats: int, warmup: int = 1
) -> dict:
    """A float32 model of `num_elements` sent to one silo and back.

    Through each path's executor, as a CreateValue and a Compute: the value
    really travels both ways on both paths. (A TFF computation would not do:
    flaap-mq runs a SERVER-only computation's `after_merge` on the
    coordinator, so such a model would never come back from a silo.)
    """
    model = np.random.default_rng(0).random(num_elements, dtype=np.float32)
    with contextlib.closing(paths.mq.context(1)) as mq_context:
        samples, counted = value_round_trips(paths, mq_context, model, repeats, warmup)
    result = {
        name: {**summary(samples[name]), **counted.per_call(name, repeats)} for name in samples
    }
    for row in result.values():
        row["round_trip_mb_per_s"] = 2 * model.nbytes / MB / row["median"]
        row["wire_mb_per_s"] = (row["bytes_out"] + row["bytes_in"]) / MB / row["median"]
    return {"model_bytes": model.nbytes, **result}


def measure_model_in_computation(paths: Paths, num_elements: int, repeats: int) -> dict:
    """The same model through a TFF computation (`clients_identity_fn`), one client."""
    model = np.random.default_rng(1).random(num_elements, dtype=np.float32)

    def check(result: object) -> None:
        if not np.array_equal(np.asarray(result[0]), model):  # type: ignore[index]
            raise AssertionError("the model came back changed")

    with contextlib.closing(paths.mq.context(1)) as mq_context:
        result = side_by_side(
            paths,
            mq_context,
            paths.direct.context(1),
            computations.clients_identity_fn(num_elements),
            [model],
            check,
            repeats=repeats,
            warmup=1,
        )
    for row in result.values():
        row["round_trip_mb_per_s"] = 2 * model.nbytes / MB / row["median"]
        row["wire_mb_per_s"] = (row["bytes_out"] + row["bytes_in"]) / MB / row["median"]
    return {"model_bytes": model.nbytes, **result}
