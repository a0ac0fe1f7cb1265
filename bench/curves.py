"""How the cost grows (issue 13): throughput against model size, time against silo count.

    .venv/bin/python -m bench.curves      # 1 MiB to 1 GiB, 1 to 16 silos: about 6 min
    .venv/bin/python -m bench.curves --sizes 1,4 --silos 1,2 --repeats 1   # smoke run

Two curves, each flaap-mq and TFF's direct path side by side (`bench.measure`:
interleaved samples after warm-ups, every result checked, CPU by process):

1. **Size curve**: a CLIENTS-placed float32 model of each size (MiB) through
   `computations.clients_identity_fn` on one silo and back
   (`measure.measure_model_in_computation`): seconds and MB/s of model moved
   there and back (2 x its bytes / s). It runs through a private broker node
   whose `max_message_size` is 16 MiB, as issue 13 asks, so every message
   above that must be chunked (flaap-mq slices at 8 MiB). Per sample the peak
   RSS growth of each process the call runs in: the coordinator (this
   process), the flaap-mq worker and its `worker_binary`, and the direct
   path's `worker_binary`. Each process's `VmHWM` is reset to its RSS just
   before the sample (`bench.profile.reset_peak`) and read just after it.
   The "1 GiB" point is 1 GiB less 4 KiB: its request must fit flaap-mq's
   default 1 GiB transfer limit (`collector.Limits.max_transfer_bytes`), with
   TFF's `Value` header, and `MqSilos` keeps the defaults.
   From `LARGE_MIB` up, one sample per path (after one warm-up each), on
   fresh silos: interleaved if the machine has `MEMORY_FACTOR` times the
   model available, else each path alone on silos of its own if it has
   `SOLO_MEMORY_FACTOR` times, else the size is skipped, and said so.
2. **Silo curve**: the tiny `federated_mean` (`computations.tiny_fn`) over N
   silos, one client (one float) each: median seconds per invocation, and
   executor requests per invocation, on the run's broker.

It prints both tables, writes the samples to `--output` (JSON) and draws
both curves, log-log, into `--plot` (PNG, default
`docs/img/benchmark-curves.png`). `make bench` (`bench.run`) runs this as its
last phase (the tables and samples, not the picture); `--quick` skips it.
Every process started is stopped and checked (`bench.run.silos`), and every
topology deleted (`MqSilos`); the private node is stopped and its directory
removed.

Why one module of some 570 lines: the two curves share their settings, the
memory guard, the table printing and the plot; apart, each would carry half
of every one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import computations, cpu, measure
from bench.cpu import CpuMeter
from bench.measure import DIRECT, MB, MQ
from bench.profile import reset_peak, status_kib
from flaap_mq.broker.credentials import BROKER_URL_ENV, DEFAULT_BROKER_URL
from flaap_mq.broker.urls import redact_url
from flaap_mq.local.private_node import PrivateBrokerNode
from flaap_mq.protocol.chunking import DEFAULT_CHUNK_BYTES
from flaap_mq.protocol.collector import Limits

MiB = 1024 * 1024
SIZES_MIB = [1, 4, 16, 64, 256, 512, 1024]
SILO_COUNTS = [1, 2, 4, 8, 16]
BROKER_LIMIT = 16 * MiB  # the size curve's broker: max_message_size, as issue 13 asks
LARGE_MIB = 256  # from this size: one sample per path
# Room for TFF's Value header in a request that must fit the transfer limit.
TRANSFER_HEADROOM = 4096
TINY_WARMUP = 3
# Memory both paths' processes may hold at once, as a multiple of the model:
# each process keeps most of what it took (TensorFlow's allocator), and the
# paths run interleaved. At 1 GiB on 2026-11-30: coordinator 8.2 GB, flaap-mq
# worker 2.3 GB and worker_binary 5.4 GB, direct worker_binary 4.5 GB, 20 GB
# at once (the run was killed by the OOM killer). A size that would leave the
# machine (shared with others) short is skipped, not run.
MEMORY_FACTOR = 24
# The same for one path alone. Alone at 1 GiB: direct grew by 11.4 GB (its
# coordinator 4.3, its worker_binary 7.1), flaap-mq by 10.2 GB.
SOLO_MEMORY_FACTOR = 16
DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "benchmark-curves.png"

COORDINATOR = "coordinator"
MQ_WORKER = "flaap-mq worker"
MQ_BINARY = "worker_binary (flaap-mq)"
DIRECT_BINARY = "worker_binary (direct)"
PATH_PROCESSES = {MQ: [COORDINATOR, MQ_WORKER, MQ_BINARY], DIRECT: [COORDINATOR, DIRECT_BINARY]}
PEAK = "peak RSS growth MB: "

Measured = Callable[[measure.Paths], Any]


class PeakMeter:
    """A `CpuMeter` whose snapshots also carry each process's peak RSS growth.

    `measure.metered` snapshots with `own_last=True` before a sample and
    `own_last=False` after it. Before, each process's `VmHWM` is reset to its
    RSS and that RSS is the value; after, the value is `VmHWM`: their delta,
    which `measure.summary` averages over the samples beside the CPU seconds,
    is the peak RSS growth during the sample, in MB.
    """

    def __init__(self, meter: CpuMeter, pids: Mapping[str, int]) -> None:
        self._meter = meter
        self._pids = dict(pids)
        self.resettable = {name: reset_peak(pid) for name, pid in self._pids.items()}

    @property
    def group_names(self) -> list[str]:
        return self._meter.group_names

    def snapshot(self, *, own_last: bool) -> dict[str, float]:
        # Outside the CPU readings' window: reset before it, read after it.
        if own_last:
            return {**self._memory(before=True), **self._meter.snapshot(own_last=True)}
        return {**self._meter.snapshot(own_last=False), **self._memory(before=False)}

    def _memory(self, *, before: bool) -> dict[str, float]:
        out = {}
        for name, pid in self._pids.items():
            if before:
                reset_peak(pid)
            kib = status_kib(pid, "VmRSS" if before else "VmHWM")
            out[PEAK + name] = kib * 1024 / MB
        return out


def model_elements(size_mib: int) -> int:
    """float32 elements of a `size_mib` model whose request fits flaap-mq's transfer limit."""
    most = Limits().max_transfer_bytes - TRANSFER_HEADROOM
    return min(size_mib * MiB, most) // 4


def split_peaks(row: dict[str, Any]) -> None:
    """Moves each path's peak RSS growth out of its CPU groups, keeping its own processes."""
    for path, processes in PATH_PROCESSES.items():
        groups = row[path]["cpu_s"]
        peaks = {k[len(PEAK) :]: groups.pop(k) for k in list(groups) if k.startswith(PEAK)}
        row[path]["peak_rss_growth_mb"] = {p: peaks[p] for p in processes if p in peaks}


@contextlib.contextmanager
def size_broker(fallback_url: str, cleanup: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """A private node with a 16 MiB message limit; the run's broker if none can start.

    On exit, checks (into `cleanup`) that the node's broker process is gone.
    """
    from bench import run

    node_processes: list[psutil.Process] = []
    try:
        with contextlib.ExitStack() as stack:
            conf = f"max_message_size = {BROKER_LIMIT}\n"
            try:
                node = stack.enter_context(PrivateBrokerNode(rabbitmq_conf=conf))
            except (RuntimeError, OSError) as error:
                note = f"{redact_url(fallback_url)}, its own limit (no private node: {error})"
                print(f"WARNING: size curve on {note}", flush=True)
                yield fallback_url, note
                return
            node_processes += filter(None, [cpu.broker_process(node.url)])
            yield node.url, f"private node, max_message_size = {BROKER_LIMIT}"
    finally:
        cleanup["broker_left"] = run.still_running(node_processes)


def short_of_memory(size_mib: int, factor: int) -> dict[str, Any] | None:
    """Why `size_mib` would not fit (`factor` times the model) in the memory available now."""
    wanted = factor * 4 * model_elements(size_mib)
    available = psutil.virtual_memory().available
    if available >= wanted:
        return None
    return {
        "size_mib": size_mib,
        "available_mb": available / MB,
        "wanted_mb": wanted / MB,
        "factor": factor,
    }


def model_point(paths: measure.Paths, size_mib: int, repeats: int) -> dict[str, Any]:
    """Both paths, interleaved (`measure.measure_model_in_computation`)."""
    row = measure.measure_model_in_computation(paths, model_elements(size_mib), repeats)
    return {**row, "interleaved": True}


def alone(paths: measure.Paths, path: str, model: Any) -> dict[str, Any]:
    """The same call on one path, one warm-up and one sample, as `measure.side_by_side`."""

    def check(result: object) -> None:
        if not np.array_equal(np.asarray(result[0]), model):  # type: ignore[index]
            raise AssertionError("the model came back changed")

    comp = computations.clients_identity_fn(model.size)
    with contextlib.ExitStack() as stack:
        if path == MQ:
            context: object = stack.enter_context(contextlib.closing(paths.mq.context(1)))
        else:
            context = paths.direct.context(1)
        runs = {path: measure.timed_invocation(context, comp, [model], check, paths.meter)}
        measure.warm_up(runs, 1)
        with measure.Counted({path: paths.counts[path]}) as counted:
            samples = measure.interleaved(runs, 1)
    return {**measure.summary(samples[path]), **counted.per_call(path, 1)}


def each_alone(on_fresh_silos: Callable[[Measured], Any], size_mib: int) -> dict[str, Any]:
    """Each path alone on silos of its own: both at once would not fit in memory."""
    model = np.random.default_rng(1).random(model_elements(size_mib), dtype=np.float32)
    row: dict[str, Any] = {"model_bytes": model.nbytes, "interleaved": False}
    for path in (MQ, DIRECT):
        row[path] = on_fresh_silos(lambda paths, path=path: alone(paths, path, model))
        result = row[path]
        result["round_trip_mb_per_s"] = 2 * model.nbytes / MB / result["median"]
        result["wire_mb_per_s"] = (result["bytes_out"] + result["bytes_in"]) / MB / result["median"]
    return row


def size_curve(
    broker_url: str, log_dir: Path, sizes: Sequence[int], repeats: int, cleanup: dict[str, Any]
) -> dict[str, Any]:
    """The model through `clients_identity_fn` at each size, one silo, on a 16 MiB broker.

    Sizes under `LARGE_MIB` share one set of silos; each larger size runs on
    fresh silos, so that what a process kept from a smaller model is given
    back first. Both paths run interleaved if `MEMORY_FACTOR` times the
    model is available; else each alone on fresh silos (`SOLO_MEMORY_FACTOR`);
    else the size is skipped.
    """
    from bench import run

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    resettable: dict[str, bool] = {}
    cleanup.update(processes_started=0, processes_left=[])
    with size_broker(broker_url, cleanup) as (url, description):
        print(f"size curve: broker {description}", flush=True)

        def on_fresh_silos(measured: Measured) -> Any:
            part: dict[str, Any] = {}
            with run.silos(url, 1, log_dir, part) as (mq, direct):
                pids = {
                    COORDINATOR: os.getpid(),
                    MQ_WORKER: mq.worker_pids[0],
                    MQ_BINARY: mq.executor_pids[0],
                    DIRECT_BINARY: direct.pids[0],
                }
                meter = PeakMeter(run.cpu_meter(url, mq, direct), pids)
                resettable.update(meter.resettable)
                result = measured(measure.Paths(mq, direct, meter))  # type: ignore[arg-type]
            cleanup["processes_started"] += part["processes_started"]
            cleanup["processes_left"] += part["processes_left"]
            return result

        def point(size: int, measured: Callable[[], dict[str, Any]]) -> None:
            load, start = os.getloadavg(), time.monotonic()
            row = measured()
            split_peaks(row)
            row.update(
                size_mib=size,
                repeats=repeats if size < LARGE_MIB else 1,
                load_average={"before": load, "after": os.getloadavg()},
                measured_in_s=round(time.monotonic() - start, 1),
            )
            rows.append(row)
            print(format_size_row(row), flush=True)

        def small_points(paths: measure.Paths) -> None:
            for size in small:
                point(size, lambda size=size: model_point(paths, size, repeats))

        small = [s for s in sorted(sizes) if s < LARGE_MIB]
        if small:
            on_fresh_silos(small_points)
        for size in [s for s in sorted(sizes) if s >= LARGE_MIB]:
            if not short_of_memory(size, MEMORY_FACTOR):
                point(size, lambda size=size: on_fresh_silos(lambda p: model_point(p, size, 1)))
            elif not (short := short_of_memory(size, SOLO_MEMORY_FACTOR)):
                point(size, lambda size=size: each_alone(on_fresh_silos, size))
            else:
                skipped.append(short)
                print(f"  {size} MiB: SKIPPED, {format_skipped(short)}", flush=True)
    return {"broker": description, "peak_reset": resettable, "rows": rows, "skipped": skipped}


def tiny_over_silos(paths: measure.Paths, num_silos: int, calls: int) -> dict[str, Any]:
    """`tiny_fn` over `num_silos` silos, one client (one float) each."""
    with contextlib.closing(paths.mq.context(num_silos)) as mq_context:
        result = measure.side_by_side(
            paths,
            mq_context,
            paths.direct.context(num_silos),
            computations.tiny_fn,
            [2.0] * num_silos,
            measure.equals(2.0),
            repeats=calls,
            warmup=TINY_WARMUP,
        )
    return {"silos": num_silos, **result}


def silo_curve(
    broker_url: str, log_dir: Path, counts: Sequence[int], calls: int, cleanup: dict[str, Any]
) -> dict[str, Any]:
    from bench import run

    rows = []
    with run.silos(broker_url, max(counts), log_dir, cleanup) as (mq, direct):
        paths = measure.Paths(mq, direct, run.cpu_meter(broker_url, mq, direct))
        for count in sorted(counts):
            load = os.getloadavg()
            row = tiny_over_silos(paths, count, calls)
            row["load_average"] = {"before": load, "after": os.getloadavg()}
            rows.append(row)
            print(format_silo_row(row), flush=True)
    return {"broker": redact_url(broker_url), "calls": calls, "rows": rows}


def measure_curves(
    broker_url: str,
    log_dir: Path,
    sizes: Sequence[int] = SIZES_MIB,
    silo_counts: Sequence[int] = SILO_COUNTS,
    repeats: int = 3,
    calls: int = 20,
) -> dict[str, Any]:
    """Both curves; per curve, `cleanup` counts the processes started and names any left."""
    started = time.monotonic()
    load = os.getloadavg()
    cleanup: dict[str, dict[str, Any]] = {"size": {}, "silos": {}}
    out: dict[str, Any] = {}
    if sizes:
        out["size"] = size_curve(broker_url, log_dir, sizes, repeats, cleanup["size"])
    if silo_counts:
        out["silos"] = silo_curve(broker_url, log_dir, silo_counts, calls, cleanup["silos"])
    out.update(
        load_average={"before": load, "after": os.getloadavg()},
        cleanup=cleanup,
        duration_s=round(time.monotonic() - started, 1),
    )
    return out


# ------------------------------------------------------------------ report


def cpu_total(path_row: dict[str, Any]) -> float:
    """CPU seconds per invocation of every process measured (both paths' groups)."""
    return sum(path_row["cpu_s"].values())


def format_size_row(row: dict[str, Any]) -> str:
    model_mb = row["model_bytes"] / MB
    parts = []
    for path in (MQ, DIRECT):
        r = row[path]
        growth = ", ".join(
            f"{p} +{mb:.0f} MB ({mb / model_mb:.1f}x)" for p, mb in r["peak_rss_growth_mb"].items()
        )
        parts.append(
            f"{path} {r['median']:.3f} s (min {r['min']:.3f}), "
            f"{r['round_trip_mb_per_s']:.1f} MB/s; {growth}"
        )
    ratio = row[MQ]["round_trip_mb_per_s"] / row[DIRECT]["round_trip_mb_per_s"]
    return f"  {row['size_mib']} MiB: " + " | ".join(parts) + f" | flaap-mq at {ratio:.0%}"


def format_skipped(skip: dict[str, Any]) -> str:
    return (
        f"{skip['available_mb']:.0f} MB of memory available, "
        f"{skip['wanted_mb']:.0f} MB wanted ({skip['factor']}x the model)"
    )


def format_silo_row(row: dict[str, Any]) -> str:
    mq, direct = row[MQ], row[DIRECT]
    return (
        f"  {row['silos']} silos: flaap-mq {1000 * mq['median']:.1f} ms "
        f"({mq['requests']:.1f} requests), direct {1000 * direct['median']:.1f} ms "
        f"({direct['requests']:.1f} requests): {mq['median'] / direct['median']:.2f}x"
    )


def format_curves(curves: dict[str, Any]) -> str:
    lines = []
    if "size" in curves:
        lines += [
            f"Size curve: clients_identity_fn, 1 silo, broker {curves['size']['broker']}",
            "| MiB | flaap-mq s | direct s | flaap-mq MB/s | direct MB/s | ratio | MB sent: "
            "flaap-mq / direct | CPU s: flaap-mq / direct | peak RSS growth MB, flaap-mq: "
            "coordinator / worker / worker_binary | direct: coordinator / worker_binary |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in curves["size"]["rows"]:
            mq, direct = row[MQ], row[DIRECT]
            growth = {
                path: " / ".join(f"{mb:.0f}" for mb in row[path]["peak_rss_growth_mb"].values())
                for path in (MQ, DIRECT)
            }
            alone = "" if row["interleaved"] else " (each path alone)"
            lines.append(
                f"| {row['size_mib']}{alone} | {mq['median']:.3f} | {direct['median']:.3f} | "
                f"{mq['round_trip_mb_per_s']:.1f} | {direct['round_trip_mb_per_s']:.1f} | "
                f"{mq['round_trip_mb_per_s'] / direct['round_trip_mb_per_s']:.0%} | "
                f"{mq['bytes_out'] / MB:.0f} / {direct['bytes_out'] / MB:.0f} | "
                f"{cpu_total(mq):.2f} / {cpu_total(direct):.2f} | "
                f"{growth[MQ]} | {growth[DIRECT]} |"
            )
        for skip in curves["size"]["skipped"]:
            lines.append(f"| {skip['size_mib']} | skipped: {format_skipped(skip)} |")
    if "silos" in curves:
        lines += [
            "",
            f"Silo curve: tiny_fn, one client per silo, {curves['silos']['calls']} calls a point",
            "| silos | flaap-mq ms (min) | direct ms (min) | ratio | CPU ms: flaap-mq / direct "
            "| requests: flaap-mq / direct |",
            "|---|---|---|---|---|---|",
        ]
        for row in curves["silos"]["rows"]:
            mq, direct = row[MQ], row[DIRECT]
            lines.append(
                f"| {row['silos']} | {1000 * mq['median']:.1f} ({1000 * mq['min']:.1f}) | "
                f"{1000 * direct['median']:.1f} ({1000 * direct['min']:.1f}) | "
                f"{mq['median'] / direct['median']:.2f}x | "
                f"{1000 * cpu_total(mq):.1f} / {1000 * cpu_total(direct):.1f} | "
                f"{mq['requests']:.1f} / {direct['requests']:.1f} |"
            )
    return "\n".join(lines)


def plot_curves(curves: dict[str, Any], path: Path) -> Path:
    """Two panels, log-log: MB/s against model size, ms against silo count; both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
    try:
        if "size" in curves:
            rows = curves["size"]["rows"]
            _panel(
                left,
                [r["size_mib"] for r in rows],
                {p: [r[p]["round_trip_mb_per_s"] for r in rows] for p in (MQ, DIRECT)},
                ("model size, MiB (CLIENTS-placed, one silo)", "MB/s of model, there and back"),
                f"Throughput against model size (broker limit {BROKER_LIMIT // MiB} MiB)",
            )
            left.axvline(DEFAULT_CHUNK_BYTES / MiB, color="grey", linestyle=":", linewidth=1)
            left.annotate(
                "flaap-mq chunks above 8 MiB",
                (DEFAULT_CHUNK_BYTES / MiB, 0.02),
                xycoords=("data", "axes fraction"),
                xytext=(4, 0),
                textcoords="offset points",
                fontsize=8,
                color="grey",
            )
        if "silos" in curves:
            rows = curves["silos"]["rows"]
            _panel(
                right,
                [r["silos"] for r in rows],
                {p: [1000 * r[p]["median"] for r in rows] for p in (MQ, DIRECT)},
                ("silos (one client each)", "ms per invocation (median)"),
                "Tiny federated_mean against silo count",
            )
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path


def _panel(
    axis: Any, xs: list[int], ys: dict[str, list[float]], labels: tuple[str, str], title: str
) -> None:
    """Both paths against `xs`, log 2 on x (a tick per point), log 10 on y (1-2-5 ticks)."""
    from matplotlib import ticker

    styles = {MQ: ("o-", "flaap-mq"), DIRECT: ("s--", "TFF direct (gRPC)")}
    for name, (style, label) in styles.items():
        axis.plot(xs, ys[name], style, label=label)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.xaxis.set_major_locator(ticker.FixedLocator(xs))
    axis.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.xaxis.set_minor_locator(ticker.NullLocator())
    axis.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.yaxis.set_minor_formatter(ticker.NullFormatter())
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both")
    axis.legend()


# ------------------------------------------------------------------ main


def counts_of(text: str, flag: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if values and values[0] < 1:
        raise SystemExit(f"{flag} needs positive numbers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.curves", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES_MIB)), help="model sizes in MiB ('' for none)"
    )
    parser.add_argument(
        "--silos", default=",".join(map(str, SILO_COUNTS)), help="silo counts ('' for none)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help=f"samples per path per size under {LARGE_MIB} MiB"
    )
    parser.add_argument("--calls", type=int, default=20, help="tiny invocations per silo count")
    parser.add_argument(
        "--broker-url",
        default=os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL),
        help="broker for the silo curve (and the size curve if no private node starts)",
    )
    parser.add_argument("--output", type=Path, help="samples as JSON")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG to draw")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from bench import run
    from flaap_mq import logs

    args = parse_args(argv)
    logs.configure("console", "warning")
    run.stop_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="flaap-curves-logs-"))
    print(f"load average {os.getloadavg()}; worker logs in {log_dir}", flush=True)
    curves = measure_curves(
        args.broker_url,
        log_dir,
        counts_of(args.sizes, "--sizes"),
        counts_of(args.silos, "--silos"),
        args.repeats,
        args.calls,
    )
    curves.update(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=run.machine(),
    )
    print()
    print(format_curves(curves))
    print(f"\nload average {curves['load_average']}; curves measured in {curves['duration_s']} s")
    if args.output:
        args.output.write_text(json.dumps(curves, indent=2) + "\n")
        print(f"samples written to {args.output}")
    if args.plot:
        print(f"curves drawn in {plot_curves(curves, args.plot)}")
    left = [c.get(k) for c in curves["cleanup"].values() for k in ("processes_left", "broker_left")]
    return 1 if any(left) else 0


if __name__ == "__main__":
    sys.exit(main())
