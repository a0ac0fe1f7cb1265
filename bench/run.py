"""Benchmark flaap-mq against TFF's own remote path, side by side, in one run.

    .venv/bin/python -m bench.run            # full run (make bench), ~10-15 min
    .venv/bin/python -m bench.run --quick    # smoke run, 1 and 2 silos, no curves, < 3 min
    .venv/bin/python -m bench.run --silos 1,2,4,8

Rows (see docs/benchmarks.md):

1. round time over 1, 2, 4, 8 silos, one client per silo, each client
   waiting 1 s; goal: flaap-mq's 8-silo round within 1.5x its 1-silo round;
2. a tiny computation (median ms per invocation and per executor request);
   goal: within 1.5x TFF's direct gRPC path;
3. a 64 MiB model sent to a silo and back (MB/s); goal: at least 50% of
   TFF's direct path;
4. and 5. what the executor's sandbox costs (`bench.sandbox`): the tiny
   call and the 64 MiB model through TFF's own path to a sandboxed
   `worker_binary` and to one on the host's network; goals: at most 0.5 ms
   more, and 90% of the throughput;
6. a silo's worker SIGKILLed mid-round (`bench.dropout`, 2 silos,
   `min_silos=1`, `silo_grace` 3 s): seconds from the kill to the round
   completing without it; goal: within `silo_grace` + 3 s;
7. a silo worker's start (`bench.worker_start`): importing it, resident
   memory and seconds until it consumes (its executor started first), and
   what it does to each request; goals: under 100 MB and 3 s;
8. the curves of issue 13 (`bench.curves`, full run only: `--quick` skips
   them): throughput against model size, 1 MiB to 1 GiB through a broker
   with a 16 MiB message limit, with each process's peak RSS growth, and the
   tiny call's time against silo count, 1 to 16; printed and kept in the
   results, drawn by `python -m bench.curves`.

flaap-mq runs on real `flaap-mq worker` processes through the broker, under
a topology prefix of this run's own, deleted afterwards. TFF's direct path
is `RemoteExecutor` over `RemoteExecutorGrpcStub` to `worker_binary`s on
this machine (`bench.baseline`). Every process started here is stopped, and
the run checks that none is left.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import tensorflow_federated as tff

from bench import computations, cpu, curves, dropout, measure, report, sandbox, worker_start
from bench.baseline import DirectSilos
from bench.cpu import CpuMeter
from bench.mq import MqSilos
from flaap_mq import logs
from flaap_mq.broker.credentials import BROKER_URL_ENV, DEFAULT_BROKER_URL
from flaap_mq.broker.urls import redact_url
from flaap_mq.local.broker import throwaway_broker

BENCH_DIR = Path(__file__).resolve().parent
MODEL_ELEMENTS = 16 * 1024 * 1024  # float32: 64 MiB, under the broker's 128 MiB limit


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    silos: list[int]
    round_repeats: int
    tiny_calls: int
    tiny_warmup: int
    model_elements: int
    model_repeats: int
    large_model_elements: int  # 0: no 512 MB row (quick mode)
    dropout_repeats: int
    worker_start_repeats: int
    curves: bool  # row 8, bench.curves
    output: Path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run (< 3 min)")
    parser.add_argument("--silos", help="silo counts for row 1, e.g. 1,2,4,8")
    parser.add_argument(
        "--broker-url",
        default=os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL),
        help="broker to use; a throwaway one is started if none answers there",
    )
    parser.add_argument("--output", type=Path, help="results file (default bench/results.json)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    default_silos = "1,2" if args.quick else "1,2,4,8"
    silos = sorted({int(s) for s in (args.silos or default_silos).split(",") if s.strip()})
    if not silos or silos[0] < 1:
        raise SystemExit(f"--silos needs positive silo counts, got {args.silos!r}")
    name = "results-quick.json" if args.quick else "results.json"
    return Settings(
        mode="quick" if args.quick else "full",
        silos=silos,
        round_repeats=1 if args.quick else 3,
        tiny_calls=20 if args.quick else 50,
        tiny_warmup=3 if args.quick else 5,
        model_elements=MODEL_ELEMENTS,
        model_repeats=1 if args.quick else 5,
        # Over RabbitMQ's default 128 MiB message limit: travels in chunks.
        large_model_elements=0 if args.quick else 512 * 1024 * 1024 // 4,
        dropout_repeats=1 if args.quick else 2,
        worker_start_repeats=2 if args.quick else 5,
        curves=not args.quick,
        output=args.output or BENCH_DIR / name,
    )


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow_federated": tff.__version__,
    }


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every process started here is stopped."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def still_running(started: Sequence[psutil.Process]) -> list[str]:
    """Those of `started` still alive (zombies count as gone), described."""
    alive = []
    for process in started:
        # is_running() also compares the start time, so a reused pid is not ours.
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} ({' '.join(process.cmdline())[:120]})")
    return alive


@contextlib.contextmanager
def silos(
    broker_url: str, count: int, log_dir: Path, cleanup: dict[str, Any]
) -> Iterator[tuple[MqSilos, DirectSilos]]:
    """Both paths' silos; on exit, checks (into `cleanup`) that every process started is gone."""
    started: list[psutil.Process] = []
    try:
        with contextlib.ExitStack() as stack:
            direct = stack.enter_context(DirectSilos(count))
            started += [psutil.Process(pid) for pid in direct.pids]
            mq = stack.enter_context(MqSilos(broker_url, count, log_dir))
            started += [psutil.Process(pid) for pid in mq.worker_pids + mq.executor_pids]
            print(f"{count} flaap-mq workers (prefix {mq.prefix}) and {count} worker_binaries up")
            yield mq, direct
    finally:
        left = still_running(started)
        cleanup.update(processes_started=len(started), processes_left=left)
        if left:
            print(f"WARNING: processes started by the benchmark still run: {left}")
        else:
            print(f"all {len(started)} processes started by the benchmark stopped")


def cpu_meter(broker_url: str, mq: MqSilos, direct: DirectSilos) -> CpuMeter:
    broker = cpu.broker_process(broker_url)
    return CpuMeter(
        {
            cpu.COORDINATOR: [psutil.Process()],
            cpu.BROKER: [broker] if broker else [],
            cpu.MQ_WORKERS: [psutil.Process(pid) for pid in mq.worker_pids],
            cpu.MQ_EXECUTORS: [psutil.Process(pid) for pid in mq.executor_pids],
            cpu.DIRECT_EXECUTORS: [psutil.Process(pid) for pid in direct.pids],
        }
    )


def run_rows(paths: measure.Paths, s: Settings) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    phases = [
        ("round", lambda: measure.measure_rounds(paths, s.silos, s.round_repeats)),
        ("tiny", lambda: measure.measure_tiny(paths, s.tiny_calls, s.tiny_warmup)),
        (
            "model",
            lambda: measure.measure_model_round_trip(paths, s.model_elements, s.model_repeats),
        ),
        (
            "model_in_tff",
            lambda: measure.measure_model_in_computation(paths, s.model_elements, s.model_repeats),
        ),
    ]
    phases.append(
        (
            "sandbox",
            lambda: sandbox.measure_sandbox_cost(
                s.tiny_calls, s.model_elements, s.model_repeats, s.tiny_warmup
            ),
        )
    )
    if s.large_model_elements:
        phases.append(
            (
                "model_512",
                lambda: measure.measure_model_round_trip(
                    paths, s.large_model_elements, repeats=1, warmup=0
                ),
            )
        )
    for name, phase in phases:
        start = time.monotonic()
        rows[name] = phase()
        print(f"  {name}: measured in {time.monotonic() - start:.0f} s", flush=True)
    return rows


def print_report(rows: dict[str, Any], s: Settings, verdicts: list[report.Verdict]) -> None:
    print()
    print(report.format_rounds(rows["round"], s.round_repeats))
    print(f"  {report.client_wait_check(rows['round'])}")
    print()
    print(report.format_tiny(rows["tiny"], s.tiny_calls))
    print()
    print(report.format_model(rows["model"], s.model_repeats))
    print()
    print(report.format_model(rows["model_in_tff"], s.model_repeats, in_computation=True))
    print()
    print(sandbox.format_sandbox_cost(rows["sandbox"]))
    print()
    if "model_512" in rows:
        print(report.format_model(rows["model_512"], 1))
        print()
    print(dropout.format_dropout(rows["dropout"]))
    print()
    print(worker_start.format_worker_start(rows["worker_start"]))
    print()
    if "curves" in rows:
        print(curves.format_curves(rows["curves"]))
        print()
    print(report.format_verdicts(verdicts))


def benchmark(s: Settings, broker_url: str) -> dict[str, Any]:
    started = time.monotonic()
    load_before = os.getloadavg()
    log_dir = Path(tempfile.mkdtemp(prefix="flaap-bench-logs-"))
    cleanup: dict[str, Any] = {}
    with throwaway_broker(broker_url) as (url, description):
        print(f"broker: {description}; worker logs: {log_dir}")
        with silos(url, max(s.silos), log_dir, cleanup) as (mq, direct):
            prefix = mq.prefix
            meter = cpu_meter(url, mq, direct)
            rows = run_rows(measure.Paths(mq, direct, meter), s)
        start = time.monotonic()
        # Its own two workers: one is killed.
        rows["dropout"] = dropout.measure_dropout(url, log_dir, s.dropout_repeats)
        print(f"  dropout: measured in {time.monotonic() - start:.0f} s", flush=True)
        start = time.monotonic()
        rows["worker_start"] = worker_start.measure_worker_start(
            url, log_dir, s.worker_start_repeats
        )
        print(f"  worker_start: measured in {time.monotonic() - start:.0f} s", flush=True)
        if s.curves:
            rows["curves"] = curves.measure_curves(url, log_dir)
            print(f"  curves: measured in {rows['curves']['duration_s']:.0f} s", flush=True)
    verdicts = [
        report.round_verdict(rows["round"]),
        report.tiny_verdict(rows["tiny"]),
        report.model_verdict(rows["model"]),
        *sandbox.sandbox_verdicts(rows["sandbox"]),
        dropout.dropout_verdict(rows["dropout"]),
        *(report.Verdict(*v) for v in worker_start.verdicts(rows["worker_start"]["start"])),
    ]
    print_report(rows, s, verdicts)
    return {
        "mode": s.mode,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "broker": redact_url(url),
        "topology_prefix": prefix,
        "worker_logs": str(log_dir),
        "cpu_groups": meter.group_names,
        "client_wait_s": computations.CLIENT_WAIT_S,
        "client_wait_check": report.client_wait_check(rows["round"]),
        "cleanup": cleanup,
        "settings": {k: v for k, v in dataclasses.asdict(s).items() if k != "output"},
        "rows": rows,
        "goals": [v.as_dict() for v in verdicts],
        "duration_s": round(time.monotonic() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    logs.configure("console", "warning")
    stop_on_sigterm()
    results = benchmark(s, args.broker_url)
    s.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {s.output} ({results['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
