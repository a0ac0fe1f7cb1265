"""Where the time goes on the data path (issue 13): both paths, per process, per step.

    .venv/bin/python -m bench.profile        # everything below, 7 samples each: about 3 min
    .venv/bin/python -m bench.profile --samples 9 --tiny-calls 40 --model-mib 64 \
        --message-repeats 40 --output /tmp/prof.json    # docs/benchmarks.md, "Profile ..."
    .venv/bin/python -m bench.profile --only tiny   # or: --only model, --only messages

Measured on both paths, one silo, interleaved sample by sample as in
`bench.run`:

(a) the tiny `federated_mean` of one float (`computations.tiny_fn`);
(b) a CLIENTS-placed float32 model through `federated_map` of an identity
    and back (`computations.clients_identity_fn`);
(c) on flaap-mq only: k one-way tasks before one awaited Compute, k = 0 to
    8. The slope is what one more message costs: what a batch envelope
    saves per request it folds in.

flaap-mq runs one real `flaap-mq worker` (started through this module, which
wraps the worker's steps with timers before it runs the worker's own
`main`); TFF's direct path is `bench.baseline`'s `RemoteExecutor` over gRPC
to a `worker_binary`.

Nothing in flaap_mq is changed: functions and methods are wrapped in place,
in this process and in the worker, each call recording its start and end
(one system-wide monotonic clock, so both processes' events share a time
line) and, for the steps that copy or hash, the bytes it touched. Per sample
the run also records each process's CPU seconds and peak resident memory
(`/proc/<pid>/status` VmHWM, reset before the sample through `clear_refs`;
the broker, which is shared and not ours, is polled instead).

It prints, per call and path: wall, CPU and peak RSS per process; a table
of steps per process (calls, ms, bytes); for (a) each invocation cut at the
broker crossings; and the time line of one median invocation. Spans nest
(an `ask` includes its wait for the reply). A wrapped call costs about
1.2 µs, outside the span it records: pika's receive path makes some 65,000
wrapped calls per 64 MiB round trip on the worker, about 80 ms of its CPU.

The topology (prefix `flaapprof-<random>`) is deleted afterwards, and the
worker and `worker_binary`s are stopped.

Why one module of some 900 lines: it is one measurement. The list of steps
it wraps names flaap-mq's functions where they are today, and the report
reads those same names; split apart, a rename in flaap_mq would have to be
followed in several places instead of one table. A step that no longer
exists stops the run (`inspect.getattr_static` raises, naming it): the
profile is never silently missing one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
WORKER_SHIM = "_worker"
DUMP_POLL_S = 0.05

# (name, start, end, bytes); appended from any thread (list.append is atomic).
Event = tuple[str, float, float, int]
EVENTS: list[Event] = []
_ACTIVE = threading.local()  # names of the sync spans open on this thread


def _size_of(size: Callable[..., int] | None, args: tuple, kwargs: dict) -> int:
    if size is None:
        return 0
    try:
        return int(size(*args, **kwargs))
    except Exception:
        return 0


def _wrap(fn: Callable, name: str, size: Callable[..., int] | None) -> Callable:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                EVENTS.append((name, start, time.perf_counter(), _size_of(size, args, kwargs)))

        return timed_async

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        active = _ACTIVE.__dict__.setdefault("names", set())
        if name in active:  # a recursive call (serialize_value): the outer span counts
            return fn(*args, **kwargs)
        nbytes = _size_of(size, args, kwargs)
        active.add(name)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((name, start, time.perf_counter(), nbytes))
            active.discard(name)

    return timed


def patch(target: str, name: str, size: Callable[..., int] | None = None) -> None:
    """Wraps `module:attr` or `module:Class.attr` with a timer recording `name`."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    raw = inspect.getattr_static(owner, attr)
    if isinstance(raw, staticmethod):
        setattr(owner, attr, staticmethod(_wrap(raw.__func__, name, size)))
    else:
        setattr(owner, attr, _wrap(getattr(owner, attr), name, size))


def _nbytes(buffer: Any) -> int:
    return memoryview(buffer).nbytes


def patch_sha256() -> None:
    """hashlib.sha256(data): time and bytes of each digest made with data."""
    original = hashlib.sha256

    def sha256(data: Any = b"", **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(data, **kwargs)
        finally:
            if data:
                EVENTS.append(("hash: sha256", start, time.perf_counter(), _nbytes(data)))

    hashlib.sha256 = sha256  # type: ignore[assignment]


# Steps both sides of flaap-mq share: the AMQP link, pika, the envelope.
PIKA_IO = "pika.adapters.utils.io_services_utils:_AsyncTransportBase"
LINK_STEPS: list[tuple[str, str, Callable[..., int] | None]] = [
    (
        "pika.connection:Connection._on_data_available",
        "pika: frames in (bytes += per recv; copies counted)",
        lambda self, data: len(self._frame_buffer) + len(data),
    ),
    (
        "pika.connection:Connection._send_message",
        "pika: frames out (slice + marshal's two concatenations: 3 copies)",
        lambda self, channel, method, content: 3 * len(content[1]),
    ),
    (f"{PIKA_IO}._sigint_safe_recv", "pika: recv() calls", None),
    (f"{PIKA_IO}._sigint_safe_send", "pika: send() calls", lambda sock, data: len(data)),
    ("flaap_mq.broker.link:BrokerLink._send", "link: publish on I/O thread", None),
    ("flaap_mq.broker.link:BrokerLink._on_confirm", "link: confirm received", None),
    (
        "flaap_mq.protocol.collector:Collector._store",
        "io: slice written into its buffer + sha256 update (Collector._store)",
        lambda self, task_id, transfer, index, part: len(part),
    ),
    (
        "flaap_mq.protocol.collector:Parts.view",
        "io: whole payload checked, not copied (Parts.view)",
        None,
    ),
    (
        "flaap_mq.protocol.chunking:sha256_of",
        "hash: sha256 of a payload to send (sha256_of)",
        lambda payload: len(payload),
    ),
]

WORKER_STEPS: list[tuple[str, str, Callable[..., int] | None]] = [
    *LINK_STEPS,
    ("flaap_mq.worker.intake:Intake.on_delivery", "io: delivery handed off (on_delivery)", None),
    ("flaap_mq.protocol.envelope:read_task", "io: envelope read (read_task)", None),
    ("flaap_mq.protocol.batch:read_batch", "io: batch read (read_batch)", None),
    ("flaap_mq.worker.worker:SiloWorker._handle", "pool: task, end to end (_handle)", None),
    (
        "flaap_mq.worker.pipeline:read_request",
        "io: request read, not copied (read_request)",
        lambda task, spec, received: getattr(received, "total_size", None) or len(received),
    ),
    (
        "flaap_mq.worker.pipeline:with_service_refs",
        "pool: value names rewritten (waits for values being made)",
        None,
    ),
    ("flaap_mq.protocol.envelope:encode_result", "pool: result sliced (encode_result)", None),
    ("flaap_mq.worker.request:TaskRequest.settle", "pool: reply handed to link (settle)", None),
    ("flaap_mq.broker.link:BrokerLink._settle", "link: ack/reject", None),
]

_VS = "tensorflow_federated.python.core.impl.executors.value_serialization"
_STUB = "tensorflow_federated.python.core.impl.executors.remote_executor_grpc_stub"
_REMOTE = "tensorflow_federated.python.core.impl.executors.remote_executor"
STUB_METHODS = (
    "get_executor",
    "create_value",
    "create_call",
    "create_struct",
    "create_selection",
    "compute",
    "dispose",
    "dispose_executor",
)

COORDINATOR_STEPS: list[tuple[str, str, Callable[..., int] | None]] = [
    *LINK_STEPS,
    (f"{_VS}:serialize_value", "TFF: serialize_value", None),
    (f"{_VS}:deserialize_value", "TFF: deserialize_value", None),
    (
        "flaap_mq.coordinator.value_read:deserialize_compute_response",
        "value_read: answer read where it arrived (else TFF's)",
        None,
    ),
    (f"{_REMOTE}:RemoteExecutor.create_value", "RemoteExecutor.create_value", None),
    (f"{_REMOTE}:RemoteExecutor._compute", "RemoteExecutor._compute", None),
    *((f"{_STUB}:RemoteExecutorGrpcStub.{m}", f"gRPC: {m}", None) for m in STUB_METHODS),
    *(
        (f"flaap_mq.coordinator.executor_stub:ServiceStub.{m}", f"merge executor: {m}", None)
        for m in (*STUB_METHODS, "create_value_from_memory")
    ),
    (
        "flaap_mq.coordinator.local_merge:LocalMergeContext.invoke",
        "merge context: invoke (merge, or after_merge)",
        None,
    ),
    (
        "flaap_mq.coordinator.value_wire:serialize_value",
        "value_wire: serialize_value (large arrays from their memory, else TFF's)",
        None,
    ),
    ("flaap_mq.protocol.envelope:create_value_request", "envelope: create_value_request", None),
    ("flaap_mq.protocol.envelope:encode_task", "envelope: encode_task (slices)", None),
    ("flaap_mq.coordinator.publish:publish_task", "publish_task (caller thread)", None),
    ("flaap_mq.coordinator.publish:publish_batch", "publish_batch (caller thread)", None),
    ("flaap_mq.coordinator.replies:take", "io: reply taken (replies.take)", None),
    ("flaap_mq.coordinator.silo_watch:SiloWatch.await_reply", "ask: waiting for reply", None),
    ("flaap_mq.coordinator.task_client:TaskClient.ask", "ask: whole (TaskClient.ask)", None),
    ("flaap_mq.coordinator.task_client:TaskClient.send", "send: one-way (TaskClient.send)", None),
    (
        "flaap_mq.coordinator.silo_executor:SiloExecutor.create_value",
        "SiloExecutor.create_value",
        None,
    ),
    ("flaap_mq.coordinator.silo_executor:SiloExecutor._compute", "SiloExecutor.compute", None),
]


def install(steps: Sequence[tuple[str, str, Callable[..., int] | None]]) -> None:
    patch_sha256()
    for target, name, size in steps:
        patch(target, name, size)


def patch_executor_calls() -> None:
    """The worker's gRPC calls to its worker_binary, named by request kind."""
    from flaap_mq.executor.service import ExecutorService
    from flaap_mq.protocol import envelope

    original = ExecutorService.call

    def call(self: Any, kind: int, request: bytes, timeout_s: float | None = None) -> bytes:
        start = time.perf_counter()
        response = b""
        try:
            response = original(self, kind, request, timeout_s)
            return response
        finally:
            name = f"executor: {envelope.kind_name(kind)} (gRPC to worker_binary)"
            EVENTS.append((name, start, time.perf_counter(), len(request) + len(response)))

    ExecutorService.call = call  # type: ignore[method-assign]


# ------------------------------------------------------------------ the worker


def worker_shim(events_dir: Path, argv: list[str]) -> int:
    """Runs `flaap-mq worker` with its steps timed; dumps events when asked.

    `events_dir/dump` appearing asks for a dump into `events_dir/events.json`
    (written whole, then renamed); the file `dump` is removed to say done.
    """
    install(WORKER_STEPS)
    patch_executor_calls()
    from flaap_mq import cli

    def dumper() -> None:
        trigger = events_dir / "dump"
        while True:
            time.sleep(DUMP_POLL_S)
            if trigger.exists():
                tmp = events_dir / "events.tmp"
                tmp.write_text(json.dumps(list(EVENTS)))
                tmp.rename(events_dir / "events.json")
                trigger.unlink()

    threading.Thread(target=dumper, daemon=True, name="profile-dump").start()
    return cli.main(argv)


def worker_events(events_dir: Path, timeout_s: float = 30.0) -> list[Event]:
    trigger = events_dir / "dump"
    trigger.touch()
    deadline = time.monotonic() + timeout_s
    while trigger.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the profiled worker did not dump its events")
        time.sleep(0.02)
    return [tuple(e) for e in json.loads((events_dir / "events.json").read_text())]  # type: ignore[misc]


# ------------------------------------------------------------------ memory


def reset_peak(pid: int) -> bool:
    """Resets the process's VmHWM to its current RSS (Linux `clear_refs` 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RssPoller:
    """Polls the RSS of processes whose peak cannot be reset (the shared broker)."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.01) -> None:
        self._pids = pids
        self._interval_s = interval_s
        self.peak: dict[str, int] = {}
        self.start: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            for name, pid in self._pids.items():
                with contextlib.suppress(OSError, ValueError):
                    rss = status_kib(pid, "VmRSS")
                    self.peak[name] = max(self.peak.get(name, 0), rss)
            self._stop.wait(self._interval_s)

    def __enter__(self) -> RssPoller:
        for name, pid in self._pids.items():
            with contextlib.suppress(OSError, ValueError):
                self.start[name] = status_kib(pid, "VmRSS")
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


# ------------------------------------------------------------------ samples


def summarize(events: Sequence[Event], start: float, end: float) -> dict[str, list[float]]:
    """Per step, in [start, end]: [calls, seconds, bytes]."""
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for name, t0, t1, nbytes in events:
        if start <= t0 <= end:
            row = out[name]
            row[0] += 1
            row[1] += t1 - t0
            row[2] += nbytes
    return dict(out)


def run_samples(
    label: str,
    runs: dict[str, Callable[[], None]],
    samples: int,
    procs: dict[str, dict[str, int]],
    broker_pid: int | None,
    *,
    memory: bool,
) -> dict[str, list[dict[str, Any]]]:
    """`samples` interleaved samples of each run: wall, CPU and peak RSS per process."""
    import psutil

    out: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(samples):
        for name in names if i % 2 == 0 else reversed(names):
            pids = procs[name]
            ps = {p: psutil.Process(pid) for p, pid in pids.items()}
            if broker_pid:
                ps["broker"] = psutil.Process(broker_pid)
            base = {p: status_kib(pid, "VmRSS") for p, pid in pids.items()}
            resettable = {p: reset_peak(pid) for p, pid in pids.items()}
            poll_pids = {p: pid for p, pid in pids.items() if not resettable[p]}
            if broker_pid:
                poll_pids["broker"] = broker_pid
            cpu0 = {p: sum(proc.cpu_times()[:2]) for p, proc in ps.items()}
            poller = RssPoller(poll_pids) if memory else contextlib.nullcontext()
            with poller:
                start = time.perf_counter()
                runs[name]()
                end = time.perf_counter()
            cpu = {p: sum(proc.cpu_times()[:2]) - cpu0[p] for p, proc in ps.items()}
            rss: dict[str, dict[str, float]] = {}
            for p, pid in pids.items():
                if resettable[p]:
                    rss[p] = {"base_mb": base[p] / 1024, "peak_mb": status_kib(pid, "VmHWM") / 1024}
                elif memory:
                    rss[p] = {
                        "base_mb": poller.start.get(p, 0) / 1024,  # type: ignore[union-attr]
                        "peak_mb": poller.peak.get(p, 0) / 1024,  # type: ignore[union-attr]
                        "polled": True,
                    }
            if memory and broker_pid:
                rss["broker"] = {
                    "base_mb": poller.start.get("broker", 0) / 1024,  # type: ignore[union-attr]
                    "peak_mb": poller.peak.get("broker", 0) / 1024,  # type: ignore[union-attr]
                    "polled": True,
                }
            out[name].append({"start": start, "end": end, "cpu_s": cpu, "rss": rss})
            print(f"  {label} {name} sample {i + 1}: {1000 * (end - start):.1f} ms", flush=True)
    return out


def attach_steps(
    samples: list[dict[str, Any]], coordinator: Sequence[Event], worker: Sequence[Event]
) -> None:
    for s in samples:
        s["steps"] = {
            "coordinator": summarize(coordinator, s["start"], s["end"]),
            "worker": summarize(worker, s["start"], s["end"]),
        }


def med_min(values: Sequence[float]) -> tuple[float, float]:
    return statistics.median(values), min(values)


def step_table(samples: list[dict[str, Any]], process: str, per: int = 1) -> list[str]:
    """Lines `step | calls | ms median (min) | MB` for one process, per invocation."""
    names = sorted({n for s in samples for n in s["steps"][process]})
    lines = []
    for name in names:
        rows = [s["steps"][process].get(name, [0, 0.0, 0]) for s in samples]
        calls = statistics.median(r[0] for r in rows) / per
        ms_med, ms_min = med_min([1000 * r[1] / per for r in rows])
        mb = statistics.median(r[2] for r in rows) / per / 1e6
        lines.append(
            f"| {process} | {name} | {calls:g} | {ms_med:.2f} ({ms_min:.2f}) | "
            + (f"{mb:.1f}" if mb else "")
            + " |"
        )
    return lines


def wall_cpu_rss(samples: list[dict[str, Any]], per: int = 1) -> list[str]:
    wall_med, wall_min = med_min([1000 * (s["end"] - s["start"]) / per for s in samples])
    lines = [f"wall per invocation: median {wall_med:.2f} ms, min {wall_min:.2f} ms"]
    for p in samples[0]["cpu_s"]:
        c_med, c_min = med_min([1000 * s["cpu_s"][p] / per for s in samples])
        line = f"  {p}: CPU {c_med:.2f} ms (min {c_min:.2f})"
        if p in samples[0]["rss"]:
            peaks = [s["rss"][p]["peak_mb"] for s in samples]
            growth = [s["rss"][p]["peak_mb"] - s["rss"][p]["base_mb"] for s in samples]
            polled = " (polled)" if samples[0]["rss"][p].get("polled") else ""
            line += (
                f"; peak RSS {statistics.median(peaks):.0f} MB (max {max(peaks):.0f}), "
                f"growth over the sample's start {statistics.median(growth):.0f} MB{polled}"
            )
        lines.append(line)
    return lines


BURST_GAP_S = 0.02


def _first(events: Sequence[Event], name: str, after: float, before: float) -> Event | None:
    found = [e for e in events if e[0] == name and after <= e[1] <= before]
    return min(found, key=lambda e: e[1]) if found else None


def _busy(events: Sequence[Event], prefix: str, after: float, before: float) -> float:
    return sum(e[2] - e[1] for e in events if e[0].startswith(prefix) and after <= e[1] <= before)


def tiny_segments(coordinator: Sequence[Event], worker: Sequence[Event]) -> dict[str, list[float]]:
    """Each flaap-mq tiny invocation cut at the broker crossings (ms), see the docstring.

    coordinator before the broker: invocation start to the first task on the wire;
    broker (tasks): the coordinator's last send() to the worker's first recv();
    worker: first recv() to the reply's send(); broker (reply): to the reply taken;
    coordinator after the reply: reply taken to the invocation's end.
    """
    out: dict[str, list[float]] = defaultdict(list)
    invocations = sorted(e for e in coordinator if e[0] == "invocation")
    for _, t0, t1, _ in invocations:
        pub = _first(coordinator, "link: publish on I/O thread", t0, t1)
        recv = pub and _first(worker, "pika: recv() calls", pub[1], t1)
        if not pub or not recv:
            continue  # a path's other invocation (tff-direct), or not seen whole
        sends = [
            e for e in coordinator if e[0] == "pika: send() calls" and pub[1] <= e[1] <= recv[1]
        ]
        reply = _first(worker, "link: publish on I/O thread", recv[1], t1)
        taken = reply and _first(coordinator, "io: reply taken (replies.take)", reply[1], t1)
        if not sends or not taken:
            continue
        reply_sent = _first(worker, "pika: send() calls", reply[1], t1)
        sent = max(e[2] for e in sends)
        w_end = reply_sent[2] if reply_sent else reply[2]
        deliveries = [
            e
            for e in worker
            if e[0] == "io: delivery handed off (on_delivery)" and recv[1] <= e[1] <= w_end
        ]
        segments = {
            "coordinator before the broker": pub[1] - t0,
            "coordinator: tasks on the wire": sent - pub[1],
            "broker: tasks in, first out": recv[1] - sent,
            "worker: first recv to reply sent": w_end - recv[1],
            "  of which executor calls (busy)": _busy(worker, "executor:", recv[1], w_end),
            "  of which first to last delivery": (
                deliveries[-1][2] - deliveries[0][1] if deliveries else 0.0
            ),
            "broker: reply in, out + coordinator I/O": taken[1] - w_end,
            "coordinator after the reply": t1 - taken[1],
            "  of which the merge executor's calls (busy)": _busy(
                coordinator, "merge executor:", taken[1], t1
            ),
            "total": t1 - t0,
        }
        for name, seconds in segments.items():
            out[name].append(1000 * seconds)
    return dict(out)


def direct_segments(coordinator: Sequence[Event]) -> dict[str, list[float]]:
    """Each tff-direct tiny invocation: gRPC calls (busy), serialization, the rest (ms)."""
    out: dict[str, list[float]] = defaultdict(list)
    for _, t0, t1, _ in sorted(e for e in coordinator if e[0] == "invocation"):
        if _first(coordinator, "link: publish on I/O thread", t0, t1):
            continue  # a flaap-mq invocation
        grpc_s = _busy(coordinator, "gRPC:", t0, t1)
        calls = len([e for e in coordinator if e[0].startswith("gRPC:") and t0 <= e[1] <= t1])
        ser = _busy(coordinator, "TFF: ", t0, t1)
        for name, value in (
            ("gRPC calls (busy), transport + executor", 1000 * grpc_s),
            ("gRPC calls per invocation", calls),
            ("TFF serialize/deserialize_value", 1000 * ser),
            (
                "the rest: TFF's Python (contexts, compiler, RemoteExecutor)",
                1000 * (t1 - t0 - grpc_s - ser),
            ),
            ("total", 1000 * (t1 - t0)),
        ):
            out[name].append(value)
    return dict(out)


def timeline(
    coordinator: Sequence[Event], worker: Sequence[Event], start: float, end: float, min_ms: float
) -> list[str]:
    """Both processes' steps in [start, end] in time order, offsets from `start`.

    Each step's calls are merged into bursts (calls less than 20 ms apart):
    `offset ms, wall ms of the burst, busy ms inside it, calls, process, step`.
    Bursts shorter than `min_ms` are left out.
    """
    rows = []
    for process, events in (("coordinator", coordinator), ("worker", worker)):
        by_name: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            if start <= event[1] <= end:
                by_name[event[0]].append(event)
        for name, evs in by_name.items():
            evs.sort(key=lambda e: e[1])
            burst: list[Event] = []
            for event in [*evs, None]:
                if burst and (event is None or event[1] - max(e[2] for e in burst) > BURST_GAP_S):
                    b0, b1 = burst[0][1], max(e[2] for e in burst)
                    busy = sum(e[2] - e[1] for e in burst)
                    if 1000 * (b1 - b0) >= min_ms or 1000 * busy >= min_ms:
                        rows.append((b0, b1, busy, len(burst), process, name))
                    burst = []
                if event is not None:
                    burst.append(event)
    rows.sort()
    return [
        f"{1000 * (b0 - start):9.2f} {1000 * (b1 - b0):9.2f} {1000 * busy:9.2f} {n:6d}  "
        f"{process:11s} {name}"
        for b0, b1, busy, n, process, name in rows
    ]


# ------------------------------------------------------------------ per message


def extra_message_cost(
    executor: Any, procs: dict[str, int], broker_pid: int | None, ks: Sequence[int], repeats: int
) -> dict[str, Any]:
    """What one more pipelined one-way task adds to a call that waits for one reply.

    For each k: k one-way CreateValue tasks of one float, then an awaited
    Compute of the last value made (of a value made beforehand for k = 0).
    The ks are interleaved, `repeats` times; per k the median wall time and
    the mean CPU of each process per call. The slope over k is the cost of
    one more message on the critical path: what a batch envelope saves per
    request it folds in.
    """
    import asyncio

    import numpy as np
    import psutil
    import tensorflow_federated as tff

    ps = {name: psutil.Process(pid) for name, pid in procs.items()}
    if broker_pid:
        ps["broker"] = psutil.Process(broker_pid)
    type_spec = tff.TensorType(np.float32)
    wall: dict[int, list[float]] = {k: [] for k in ks}
    cpu: dict[int, dict[str, float]] = {k: defaultdict(float) for k in ks}

    async def measure() -> None:
        base = await executor.create_value(np.float32(1.0), type_spec)
        await base.compute()
        for i in range(repeats + 3):
            for k in ks if i % 2 == 0 else list(reversed(ks)):
                before = {n: sum(p.cpu_times()[:2]) for n, p in ps.items()}
                start = time.perf_counter()
                values = [await executor.create_value(np.float32(j), type_spec) for j in range(k)]
                result = await (values[-1] if values else base).compute()
                elapsed = time.perf_counter() - start
                assert float(result) == (k - 1 if k else 1.0), result
                if i < 3:
                    continue  # warm-up
                wall[k].append(elapsed)
                for n, p in ps.items():
                    cpu[k][n] += sum(p.cpu_times()[:2]) - before[n]

    window = time.perf_counter()
    asyncio.run(measure())
    window = (window, time.perf_counter())
    rows = {
        k: {
            "median_ms": 1000 * statistics.median(wall[k]),
            "min_ms": 1000 * min(wall[k]),
            "cpu_ms": {n: 1000 * c / repeats for n, c in cpu[k].items()},
        }
        for k in ks
    }
    return {"repeats": repeats, "by_k": rows, "slope": _slopes(rows), "window": window}


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def _slopes(rows: dict[int, dict[str, Any]]) -> dict[str, float]:
    ks = list(rows)
    out = {
        "median_ms": _slope(ks, [rows[k]["median_ms"] for k in ks]),
        "min_ms": _slope(ks, [rows[k]["min_ms"] for k in ks]),
    }
    for name in rows[ks[0]]["cpu_ms"]:
        out[f"cpu_ms {name}"] = _slope(ks, [rows[k]["cpu_ms"][name] for k in ks])
    return out


# ------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--samples", type=int, default=7, help="samples per path (model call)")
    parser.add_argument("--tiny-calls", type=int, default=40, help="tiny invocations per sample")
    parser.add_argument("--model-mib", type=int, default=64)
    parser.add_argument("--only", choices=["tiny", "model", "messages"])
    parser.add_argument(
        "--message-repeats", type=int, default=40, help="calls per k, extra-message measurement"
    )
    parser.add_argument("--broker-url", default=None)
    parser.add_argument("--output", type=Path, help="raw samples as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_SHIM]:
        return worker_shim(Path(argv[1]), argv[2:])
    args = parse_args(argv)
    install(COORDINATOR_STEPS)
    return profile(args)


def profile(args: argparse.Namespace) -> int:
    import numpy as np
    import tensorflow_federated as tff

    import flaap_mq
    from bench import computations, cpu
    from bench.baseline import DirectSilos
    from bench.measure import equals
    from bench.mq import TASK_TIMEOUT_S, WORKER_START_TIMEOUT_S
    from flaap_mq import logs
    from flaap_mq.broker.credentials import BROKER_URL_ENV, DEFAULT_BROKER_URL
    from flaap_mq.broker.declare import delete_topology
    from flaap_mq.local.workers import WorkerFleet, worker_binaries_of
    from flaap_mq.protocol import topology

    logs.configure("console", "warning")
    url = args.broker_url or os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL)
    events_dir = Path(tempfile.mkdtemp(prefix="flaap-profile-"))
    prefix = f"flaapprof-{os.urandom(4).hex()}"
    broker = cpu.broker_process(url)
    print(f"load average {os.getloadavg()}; events and logs in {events_dir}", flush=True)
    results: dict[str, Any] = {"load_average_before": os.getloadavg()}
    job_ids: list[str] = []
    fleet = WorkerFleet(
        url,
        ["s0"],
        prefix=prefix,
        log_dir=events_dir,
        start_timeout_s=WORKER_START_TIMEOUT_S,
        program=[sys.executable, "-m", "bench.profile", WORKER_SHIM, str(events_dir)],
    )
    try:
        with contextlib.ExitStack() as stack:
            direct = stack.enter_context(DirectSilos(1))
            stack.enter_context(fleet)
            worker = fleet.workers["s0"]
            mq = flaap_mq.create_execution_context(
                url,
                ["s0"],
                task_timeout=TASK_TIMEOUT_S,
                clients_per_silo=1,
                topology_prefix=prefix,
            )
            job_ids.append(mq.job_id)
            stack.callback(mq.close)
            direct_context = direct.context(1)
            # The coordinator's merge executor: our worker_binary that is not the direct path's.
            merge_exec = [
                p.pid for p in worker_binaries_of(os.getpid()) if p.pid not in direct.pids
            ]
            procs = {
                "flaap-mq": {
                    "coordinator": os.getpid(),
                    "worker": worker.pid,
                    "worker_binary (silo)": worker.executor_pids()[0],
                },
                "tff-direct": {"coordinator": os.getpid(), "worker_binary (silo)": direct.pids[0]},
            }
            if merge_exec:
                procs["flaap-mq"]["worker_binary (coordinator's merge)"] = merge_exec[0]
            results["procs"] = procs
            broker_pid = broker.pid if broker else None

            def invoker(context: object, comp: Any, arg: object, check: Callable) -> Callable:
                def run() -> None:
                    with tff.framework.get_context_stack().install(context):
                        start = time.perf_counter()
                        result = comp(arg)
                        EVENTS.append(("invocation", start, time.perf_counter(), 0))
                        check(result)

                return run

            if args.only in (None, "tiny"):
                tiny = {
                    name: invoker(ctx, computations.tiny_fn, [2.0], equals(2.0))
                    for name, ctx in (("flaap-mq", mq), ("tff-direct", direct_context))
                }
                for _ in range(5):  # warm-up: compilation, executors, first computation sent
                    for run in tiny.values():
                        run()

                def repeat(run: Callable[[], None]) -> Callable[[], None]:
                    def runs() -> None:
                        for _ in range(args.tiny_calls):
                            run()

                    return runs

                runs = {name: repeat(run) for name, run in tiny.items()}
                results["tiny"] = run_samples(
                    "tiny", runs, args.samples, procs, broker_pid, memory=False
                )
            if args.only in (None, "model"):
                model = np.random.default_rng(1).random(args.model_mib * MiB // 4, dtype=np.float32)
                comp = computations.clients_identity_fn(model.size)

                def model_check(result: Any) -> None:
                    if not np.array_equal(np.asarray(result[0]), model):
                        raise AssertionError("the model came back changed")

                model_runs = {
                    name: invoker(ctx, comp, [model], model_check)
                    for name, ctx in (("flaap-mq", mq), ("tff-direct", direct_context))
                }
                for run in model_runs.values():
                    run()
                results["model"] = run_samples(
                    "model", model_runs, args.samples, procs, broker_pid, memory=True
                )
            if args.only in (None, "messages"):
                from flaap_mq.coordinator.silo_executor import SiloExecutor

                print("  extra messages: k one-way tasks before one awaited", flush=True)
                executor = SiloExecutor(mq.client, "s0", {tff.CLIENTS: 1})
                try:
                    results["messages"] = extra_message_cost(
                        executor, procs["flaap-mq"], broker_pid, [0, 1, 2, 4, 8],
                        args.message_repeats,
                    )  # fmt: skip
                finally:
                    executor.close()
            coordinator_events = list(EVENTS)
            w_events = worker_events(events_dir)
    finally:
        delete_topology(url, topology.Names(prefix), silos=["s0"], jobs=job_ids)
    results["load_average_after"] = os.getloadavg()
    results["events"] = (coordinator_events, w_events)
    for call in ("tiny", "model"):
        for samples in results.get(call, {}).values():
            attach_steps(samples, coordinator_events, w_events)
    report(results, args)
    if args.output:
        results.pop("events")
        args.output.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nload average before {results['load_average_before']}")
    print(f"load average after {results['load_average_after']}")
    coordinator, worker = results["events"]
    if "messages" in results:
        m = results["messages"]
        print(
            f"\n## k one-way tasks, then one awaited Compute (flaap-mq, {m['repeats']} calls per k)"
        )
        names = list(next(iter(m["by_k"].values()))["cpu_ms"])
        print("| k | wall ms median (min) | " + " | ".join(f"CPU ms {n}" for n in names) + " |")
        print("|---|---|" + "---|" * len(names))
        for k, row in m["by_k"].items():
            cpus = " | ".join(f"{row['cpu_ms'][n]:.2f}" for n in names)
            print(f"| {k} | {row['median_ms']:.2f} ({row['min_ms']:.2f}) | {cpus} |")
        slope = " | ".join(f"{m['slope'][f'cpu_ms {n}']:.2f}" for n in names)
        print(
            f"| per extra task (slope) | {m['slope']['median_ms']:.2f} "
            f"({m['slope']['min_ms']:.2f}) | {slope} |"
        )
        start, end = m["window"]
        for name in (
            "executor: CreateValue (gRPC to worker_binary)",
            "executor: Compute (gRPC to worker_binary)",
        ):
            times = [1000 * (e[2] - e[1]) for e in worker if e[0] == name and start <= e[1] <= end]
            if times:
                print(f"  worker, {name}: median {statistics.median(times):.2f} ms of {len(times)}")
    if "tiny" in results:
        windows = [(x["start"], x["end"]) for xs in results["tiny"].values() for x in xs]
        first, last = min(w[0] for w in windows), max(w[1] for w in windows)
        timed = [e for e in coordinator if first <= e[1] <= last]
        for path, segments in (
            ("flaap-mq", tiny_segments(timed, worker)),
            ("tff-direct", direct_segments(timed)),
        ):
            n = len(segments.get("total", []))
            print(f"\n## tiny invocation on {path}, cut into segments ({n} invocations, ms)")
            print("| segment | median | min |")
            print("|---|---|---|")
            for name, values in segments.items():
                print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} |")
    for call, per in (("tiny", args.tiny_calls), ("model", 1)):
        if call not in results:
            continue
        for path, samples in results[call].items():
            median = sorted(samples, key=lambda s: s["end"] - s["start"])[len(samples) // 2]
            start, end = median["start"], median["end"]
            if call == "tiny":  # one invocation, in the middle of the median sample
                calls = [e for e in coordinator if e[0] == "invocation" and start <= e[1] <= end]
                _, start, end, _ = calls[len(calls) // 2]
            print(
                f"\n## one {call} invocation on {path}, time line ({1000 * (end - start):.1f} ms)"
            )
            print("   offset     wall     busy  calls  process     step")
            for line in timeline(coordinator, worker, start, end, 0.0 if call == "tiny" else 3.0):
                print(line)
        for path, samples in results[call].items():
            title = "tiny federated_mean" if call == "tiny" else f"{args.model_mib} MiB model"
            print(f"\n## {title}, {path}: {len(samples)} samples (per invocation)")
            for line in wall_cpu_rss(samples, per):
                print(line)
            print("| process | step | calls | ms median (min) | MB |")
            print("|---|---|---|---|---|")
            for process in ("coordinator", "worker"):
                for line in step_table(samples, process, per):
                    print(line)


if __name__ == "__main__":
    sys.exit(main())
