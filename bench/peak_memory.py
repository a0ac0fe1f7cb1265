"""Peak memory of one large model there and back through `federated_map` (issue 13).

    .venv/bin/python -m bench.peak_memory mq 1024       # flaap-mq, 1 GiB model
    .venv/bin/python -m bench.peak_memory direct 1024   # TFF's direct gRPC path

One invocation of `computations.clients_identity_fn` (a CLIENTS-placed
float32 model mapped through an identity) after a small warm-up. flaap-mq
runs through a private broker node whose `max_message_size` is 16 MiB, with
one worker; both sides take transfers up to 4 GiB (the default
`max_transfer_bytes`, 1 GiB, is under a 1 GiB model's request). TFF's path
is `bench.baseline`'s.

Prints the wall time, and each process's peak RSS growth (VmHWM after
`/proc/<pid>/clear_refs`, minus the RSS before the call) in bytes and as a
multiple of the model, with the RSS sampled every 50 ms on the way
(`--timeline`). The `worker_binary`s are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_federated as tff

from bench.computations import clients_identity_fn
from bench.profile import reset_peak, status_kib

MiB = 1024 * 1024
BROKER_LIMIT = 16 * MiB
TRANSFER_LIMIT = 4 * 1024**3


def measure(
    context: contextlib.AbstractContextManager[Any],
    pids: Callable[[], dict[str, int]],
    mib: int,
    timeline: bool,
) -> dict[str, Any]:
    elements = mib * MiB // 4
    model = np.arange(elements, dtype=np.float32) % 1000
    with context as ctx, tff.framework.get_context_stack().install(ctx):
        clients_identity_fn(1024)([np.ones(1024, np.float32)])  # warm-up
        processes = {"coordinator": os.getpid(), **pids()}
        before = {}
        for name, pid in processes.items():
            reset_peak(pid)
            before[name] = status_kib(pid, "VmRSS") * 1024
        samples: list[tuple[float, dict[str, int]]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss = {n: status_kib(p, "VmRSS") * 1024 for n, p in processes.items()}
                samples.append((time.monotonic(), rss))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        started = time.monotonic()
        sampler.start()
        [result] = clients_identity_fn(elements)([model])
        wall = time.monotonic() - started
        done.set()
        sampler.join()
        peaks = {name: status_kib(pid, "VmHWM") * 1024 for name, pid in processes.items()}
    if not np.array_equal(result, model):
        raise AssertionError("the model came back changed")
    size = mib * MiB
    if timeline:
        for at, rss in samples[:: max(1, len(samples) // 40)]:
            row = {n: round((rss[n] - before[n]) / size, 2) for n in processes}
            print(f"  {at - started:6.1f} s: growth, x the model: {row}")
    return {
        "model_mib": mib,
        "wall_s": round(wall, 2),
        "peak_growth_bytes": {n: peaks[n] - before[n] for n in processes},
        "peak_growth_x_model": {n: round((peaks[n] - before[n]) / size, 2) for n in processes},
        "load_average": os.getloadavg(),
    }


def run_mq(mib: int, timeline: bool) -> dict[str, Any]:
    import flaap_mq
    from flaap_mq.local.private_node import PrivateBrokerNode
    from flaap_mq.local.workers import WorkerFleet
    from flaap_mq.protocol import collector

    limit = str(TRANSFER_LIMIT)
    with (
        PrivateBrokerNode(rabbitmq_conf=f"max_message_size = {BROKER_LIMIT}\n") as node,
        WorkerFleet(
            node.url,
            ["a"],
            prefix="peakmem",
            log_dir=Path(tempfile.mkdtemp(prefix="flaap-peakmem-")),
            extra_args=["--max-transfer-bytes", limit, "--max-pending-transfer-bytes", limit],
        ) as fleet,
    ):
        context = flaap_mq.create_execution_context(
            node.url,
            ["a"],
            topology_prefix="peakmem",
            task_timeout=1800,
            max_attempts=1,
            chunk_limits=collector.Limits(
                max_transfer_bytes=TRANSFER_LIMIT,
                max_pending_bytes=TRANSFER_LIMIT,
                max_slices=1 << 16,
            ),
        )
        return measure(context, lambda: {"worker": fleet.workers["a"].pid}, mib, timeline)


def run_direct(mib: int, timeline: bool) -> dict[str, Any]:
    from bench.baseline import DirectSilos

    with DirectSilos(1) as silos:
        return measure(contextlib.nullcontext(silos.context(1)), dict, mib, timeline)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peak_memory", description=__doc__)
    parser.add_argument("path", choices=["mq", "direct"])
    parser.add_argument("model_mib", type=int, nargs="?", default=1024)
    parser.add_argument("--timeline", action="store_true", help="print the sampled RSS")
    args = parser.parse_args(argv)
    run = run_mq if args.path == "mq" else run_direct
    print(json.dumps({"path": args.path, **run(args.model_mib, args.timeline)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
