"""A silo worker's start: import time, resident memory, seconds until it consumes.

    .venv/bin/python -m bench.worker_start               # 5 starts, local broker
    .venv/bin/python -m bench.worker_start --repeats 10

The worker forwards bytes and reads only value names and executor ids, so it
never imports TensorFlow (`tests/integration/test_light_worker.py` checks
that). Measured here, as `make bench` does in its row 7:

* importing the worker (`flaap_mq.cli` then `flaap_mq.worker.worker`) in a
  fresh interpreter: seconds, and resident memory after;
* `flaap-mq worker` started as a command (`WorkerProcess`, as the tests and
  the demo start it): seconds from the start of the process until the
  broker counts it as its silo queue's consumer, its executor started
  first; and the worker process's resident memory then (its executor, a
  separate binary, apart);
* what the worker does to each request (no broker): the one copy and the
  executor-id scan of a 64 MiB CreateValue, and the value-name rewrite of a
  CreateCall.

Every process started here is stopped, and its topology deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from flaap_mq.broker.credentials import BROKER_URL_ENV, DEFAULT_BROKER_URL
from flaap_mq.broker.declare import delete_topology
from flaap_mq.local.broker import throwaway_broker
from flaap_mq.local.workers import WorkerProcess, queue_consumers, worker_binaries_of
from flaap_mq.protocol import envelope, topology
from flaap_mq.protocol.v1 import tff_executor_pb2
from flaap_mq.worker.pipeline import read_request, with_service_refs
from flaap_mq.worker.values import ValueTable

MB = 1024 * 1024
RSS_GOAL_MB = 100.0
CONSUMING_GOAL_S = 3.0
MODEL_BYTES = 64 * MB

_IMPORT = """
import json, sys, time
started = time.perf_counter()
import flaap_mq.cli
import flaap_mq.worker.worker
seconds = time.perf_counter() - started
rss_kb = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
heavy = sorted(m for m in ("tensorflow", "tensorflow_federated", "numpy") if m in sys.modules)
print(json.dumps({"seconds": seconds, "rss_mb": rss_kb / 1024, "loaded": heavy}))
"""


def measure_import(repeats: int = 3) -> dict[str, Any]:
    """Importing the worker in fresh interpreters: median seconds, resident MB after."""
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _IMPORT], check=True, capture_output=True, text=True
            ).stdout
        )
        for _ in range(repeats)
    ]
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "rss_mb": statistics.median(r["rss_mb"] for r in runs),
        "heavy_modules": runs[0]["loaded"],
        "samples": runs,
    }


def _one_start(broker_url: str, log_dir: Path) -> dict[str, Any]:
    prefix = f"flaapstart-{uuid.uuid4().hex[:8]}"
    names = topology.Names(prefix)
    started = time.monotonic()
    worker = WorkerProcess(
        broker_url, "s0", prefix=prefix, log_path=log_dir / f"worker-{prefix}.log"
    )
    try:
        while not queue_consumers(broker_url, names.silo_queue("s0")):
            if worker.process.poll() is not None:
                log = worker.log_text()[-3000:]
                raise RuntimeError(f"the worker exited while starting:\n{log}")
            if time.monotonic() - started > 120:
                raise TimeoutError("the worker did not consume within 120 s")
            time.sleep(0.02)
        consuming_s = time.monotonic() - started
        process = psutil.Process(worker.pid)
        rss_mb = process.memory_info().rss / MB
        executors = worker_binaries_of(worker.pid)
        executor_rss_mb = sum(p.memory_info().rss for p in executors) / MB
    finally:
        worker.stop()
        _delete_topology(broker_url, names)
    return {
        "consuming_s": consuming_s,
        "rss_mb": rss_mb,
        "executor_rss_mb": executor_rss_mb,
    }


def _delete_topology(broker_url: str, names: topology.Names) -> None:
    delete_topology(broker_url, names, silos=["s0"])


def measure_start(broker_url: str, log_dir: Path, repeats: int) -> dict[str, Any]:
    """`repeats` worker starts, one after the other: medians, and every sample."""
    samples = [_one_start(broker_url, log_dir) for _ in range(repeats)]
    return {
        "consuming_s": statistics.median(s["consuming_s"] for s in samples),
        "rss_mb": statistics.median(s["rss_mb"] for s in samples),
        "executor_rss_mb": statistics.median(s["executor_rss_mb"] for s in samples),
        "samples": samples,
    }


def _request(kind: int, request: bytes) -> tuple[Any, memoryview]:
    """A task carrying `request`, as the worker reads it from its message."""
    task = envelope.task_envelope(kind=kind, job_id="j", silo_id="s", task_id="t")
    return envelope.read_task(envelope.encode_task(task, request, len(request) + 1)[0])


def measure_requests(repeats: int = 5, calls: int = 20_000) -> dict[str, Any]:
    """What the worker does to each request before sending it on: medians, in ms.

    The request as the worker reads it from its message (a view of it): a
    64 MiB CreateValue is copied once and scanned for its executor id; a
    CreateCall's value names are replaced by the executor service's refs.
    """
    light = tff_executor_pb2
    executor = light.ExecutorId(id="clients=1/0")
    create_value = light.CreateValueRequest(executor=executor, value=b"\x01" * MODEL_BYTES)
    task, payload = _request(envelope.RequestKind.CREATE_VALUE, create_value.SerializeToString())
    spec = envelope.KINDS[task.kind]
    create_value_ms = [
        timeit.timeit(lambda: read_request(task, spec, payload), number=1) * 1000
        for _ in range(repeats)
    ]

    names = ["f" * 32, "a" * 32]
    values = ValueTable()
    for name in names:
        values.announce(name)
        values.made(name, "12345", executor.id)
    call = light.CreateCallRequest(
        executor=executor,
        function_ref=light.ValueRef(id=names[0]),
        argument_ref=light.ValueRef(id=names[1]),
    )
    call_task, call_payload = _request(envelope.RequestKind.CREATE_CALL, call.SerializeToString())
    call_spec = envelope.KINDS[call_task.kind]

    def rewrite() -> bytes | None:
        _, _, request = read_request(call_task, call_spec, call_payload)
        return with_service_refs(call_task.kind, request, values, None)

    rewrite_us = timeit.timeit(rewrite, number=calls) / calls * 1e6
    return {
        "create_value_bytes": MODEL_BYTES,
        "create_value_ms": statistics.median(create_value_ms),
        "create_call_rewrite_us": rewrite_us,
    }


def verdicts(start: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(row, measured, goal, met) of the worker's start."""
    return [
        (
            "7. worker resident memory, consuming",
            f"{start['rss_mb']:.0f} MB",
            f"< {RSS_GOAL_MB:.0f} MB",
            start["rss_mb"] < RSS_GOAL_MB,
        ),
        (
            "7. worker start to consuming (executor included)",
            f"{start['consuming_s']:.2f} s",
            f"< {CONSUMING_GOAL_S:.0f} s",
            start["consuming_s"] < CONSUMING_GOAL_S,
        ),
    ]


def format_worker_start(row: dict[str, Any]) -> str:
    imported, start, requests = row["import"], row["start"], row["requests"]
    heavy = ", ".join(imported["heavy_modules"]) or "none"
    return "\n".join(
        [
            "7. A silo worker's start (medians)",
            f"  import flaap_mq.worker.worker: {imported['seconds']:.2f} s, "
            f"{imported['rss_mb']:.0f} MB resident; TensorFlow/TFF/numpy loaded: {heavy}",
            f"  flaap-mq worker, start to consuming (executor included): "
            f"{start['consuming_s']:.2f} s over {len(start['samples'])} starts",
            f"  worker resident then: {start['rss_mb']:.0f} MB "
            f"(its executor, a separate binary: {start['executor_rss_mb']:.0f} MB)",
            f"  per request: {requests['create_value_bytes'] // MB} MiB CreateValue read "
            f"{requests['create_value_ms']:.1f} ms, CreateCall value names rewritten "
            f"{requests['create_call_rewrite_us']:.1f} us",
        ]
    )


def measure_worker_start(broker_url: str, log_dir: Path, repeats: int) -> dict[str, Any]:
    """Row 7 of `make bench`: import, start and per-request figures."""
    return {
        "import": measure_import(),
        "start": measure_start(broker_url, log_dir, repeats),
        "requests": measure_requests(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.worker_start", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=5, help="worker starts to measure")
    parser.add_argument(
        "--broker-url",
        default=os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL),
        help="broker to use; a throwaway one is started if none answers there",
    )
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="flaap-bench-start-"))
    with throwaway_broker(args.broker_url) as (url, description):
        print(f"broker: {description}; worker logs: {log_dir}", flush=True)
        row = measure_worker_start(url, log_dir, args.repeats)
    print(format_worker_start(row))
    for name, measured, goal, met in verdicts(row["start"]):
        print(f"  {name}: {measured} (goal {goal}: {'met' if met else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
