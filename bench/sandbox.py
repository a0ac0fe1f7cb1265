"""What the executor's sandbox costs: TFF's own path with and without it.

The same TFF computations run through TFF's `RemoteExecutor` on two
`worker_binary`s started side by side: one in flaap-mq's sandbox (its own
network namespace, reached through a Unix socket and the relay), one on a
TCP port of the host's loopback (`--executor-network=host`, TFF's way).
Nothing else differs, so the difference is the relay's hop and the Unix
socket. Samples alternate between the two, after unrecorded warm-up calls.

Goals (issue: a silo opens no port): the tiny call costs at most 0.5 ms more
sandboxed, and a 64 MiB model moves at 90% or more of the host path's rate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow_federated as tff

from bench import computations
from bench.baseline import DirectSilos
from bench.report import Verdict
from flaap_mq.executor import ExecutorNetwork

SANDBOX = ExecutorNetwork.SANDBOX.value
HOST = ExecutorNetwork.HOST.value
TINY_OVERHEAD_GOAL_MS = 0.5
THROUGHPUT_GOAL = 0.90


def _timed(context: object, comp: tff.Computation, arg: object, check: Callable) -> float:
    with tff.framework.get_context_stack().install(context):
        start = time.perf_counter()
        result = comp(arg)
        elapsed = time.perf_counter() - start
    check(result)
    return elapsed


def _alternating(
    contexts: dict[str, object], comp: tff.Computation, arg: object, check: Callable, repeats: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in contexts}
    names = list(contexts)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            samples[name].append(_timed(contexts[name], comp, arg, check))
    return samples


def _tiny_check(result: object) -> None:
    if not np.isclose(float(result), 1.0):  # type: ignore[arg-type]
        raise AssertionError(f"tiny call: wrong result {result!r}, expected 1.0")


def _model_check(expected: np.ndarray) -> Callable[[object], None]:
    def check(result: object) -> None:
        values = result if isinstance(result, list) else [result]
        if len(values) != 1 or not np.array_equal(np.asarray(values[0]), expected):
            raise AssertionError("model round trip: the model came back changed")

    return check


def measure_sandbox_cost(
    tiny_calls: int, model_elements: int, model_repeats: int, warmup: int = 3
) -> dict[str, Any]:
    """Tiny-call latency and model throughput, sandboxed and on the host, one run."""
    with DirectSilos(1, ExecutorNetwork.SANDBOX) as sandboxed, DirectSilos(1) as host:
        contexts = {SANDBOX: sandboxed.context(1), HOST: host.context(1)}
        tiny_arg = [np.float32(1.0)]
        _alternating(contexts, computations.tiny_fn, tiny_arg, _tiny_check, warmup)
        tiny = _alternating(contexts, computations.tiny_fn, tiny_arg, _tiny_check, tiny_calls)

        model = np.arange(model_elements, dtype=np.float32)
        round_trip = computations.clients_identity_fn(model_elements)
        _alternating(contexts, round_trip, [model], _model_check(model), 1)
        moved = _alternating(contexts, round_trip, [model], _model_check(model), model_repeats)

    tiny_ms = {name: statistics.median(s) * 1000 for name, s in tiny.items()}
    # The model goes to the executor and comes back: twice its size moved.
    rates = {name: 2 * model.nbytes / statistics.median(s) / 1e6 for name, s in moved.items()}
    overhead_ms = tiny_ms[SANDBOX] - tiny_ms[HOST]
    ratio = rates[SANDBOX] / rates[HOST]
    return {
        "tiny_calls": tiny_calls,
        "tiny_median_ms": tiny_ms,
        "tiny_overhead_ms": overhead_ms,
        "model_bytes": model.nbytes,
        "model_repeats": model_repeats,
        "model_mb_per_s": rates,
        "model_ratio": ratio,
        "goals_met": {
            "tiny_overhead": overhead_ms <= TINY_OVERHEAD_GOAL_MS,
            "model_throughput": ratio >= THROUGHPUT_GOAL,
        },
    }


def sandbox_verdicts(row: dict[str, Any]) -> list[Verdict]:
    tiny, rates = row["tiny_median_ms"], row["model_mb_per_s"]
    return [
        Verdict(
            row="4. tiny invocation, sandboxed executor vs host network",
            measured=f"{row['tiny_overhead_ms']:+.2f} ms ({tiny[SANDBOX]:.2f} vs {tiny[HOST]:.2f})",
            goal=f"<= +{TINY_OVERHEAD_GOAL_MS} ms",
            met=row["goals_met"]["tiny_overhead"],
        ),
        Verdict(
            row=f"5. {row['model_bytes'] / 2**20:.0f} MiB model, sandboxed vs host network",
            measured=f"{row['model_ratio']:.0%} ({rates[SANDBOX]:.0f} vs {rates[HOST]:.0f} MB/s)",
            goal=f">= {THROUGHPUT_GOAL:.0%}",
            met=row["goals_met"]["model_throughput"],
        ),
    ]


def format_sandbox_cost(row: dict[str, Any]) -> str:
    tiny, rates, goals = row["tiny_median_ms"], row["model_mb_per_s"], row["goals_met"]
    mib = row["model_bytes"] / 2**20

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    return "\n".join(
        [
            "Executor sandbox cost (TFF's RemoteExecutor, sandboxed vs host network, one run):",
            f"  tiny federated_mean, median of {row['tiny_calls']}: sandbox {tiny[SANDBOX]:.2f} ms,"
            f" host {tiny[HOST]:.2f} ms, overhead {row['tiny_overhead_ms']:+.2f} ms "
            f"(goal <= {TINY_OVERHEAD_GOAL_MS} ms: {verdict(goals['tiny_overhead'])})",
            f"  {mib:.0f} MiB model there and back, median of {row['model_repeats']}: sandbox "
            f"{rates[SANDBOX]:.0f} MB/s, host {rates[HOST]:.0f} MB/s, "
            f"{row['model_ratio']:.0%} (goal >= {THROUGHPUT_GOAL:.0%}: "
            f"{verdict(goals['model_throughput'])})",
        ]
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(format_sandbox_cost(measure_sandbox_cost(args.calls, 16 * 1024 * 1024, args.repeats)))
