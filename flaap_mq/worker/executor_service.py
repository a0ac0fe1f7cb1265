"""The silo's TFF executor: a `worker_binary` child process the worker owns.

TFF 0.87 executes everything in its C++ executor service, the `worker_binary`
shipped in the wheel. TFF's own launcher leaks it (it only kills it from a
`__del__`, with a SIGINT the binary ignores), so this module owns the
process outright:

* the child gets `PR_SET_PDEATHSIG(SIGKILL)`, so the kernel kills it when the
  worker dies, however the worker dies (SIGKILL included);
* `close()` sends SIGTERM, which the binary does honour, then SIGKILL after a
  grace period, and always reaps it.

Requests are forwarded as raw bytes over a loopback gRPC channel to TFF's
`ExecutorGroup` service: the worker never re-encodes a TFF payload it does
not need to look into.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import portpicker
import structlog

from flaap_mq.protocol import envelope

log = structlog.get_logger("flaap_mq.worker")

_SERVICE = "/tensorflow_federated.v0.ExecutorGroup/"
_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000  # as TFF's own launcher
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
]
_PR_SET_PDEATHSIG = 1


class ExecutorCallError(Exception):
    """The executor service answered a request with an error."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{code.name if code else 'UNKNOWN'}: {details}")
        self.code = code
        self.details = details

    @property
    def unavailable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def worker_binary_path() -> Path:
    import tensorflow_federated

    path = Path(tensorflow_federated.__file__).parent / "data" / "worker_binary"
    if not path.is_file():
        raise RuntimeError(f"TFF's executor service binary is missing: expected {path}")
    return path


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ExecutorService:
    """Starts, calls and stops one `worker_binary` on a loopback port."""

    def __init__(
        self,
        *,
        max_concurrent_computation_calls: int = -1,
        working_dir: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self._max_concurrent = max_concurrent_computation_calls
        self._working_dir = working_dir
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self._methods: dict[int, grpc.UnaryUnaryMultiCallable] = {}
        self.port: int | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self.port = portpicker.pick_unused_port()
        args = [
            str(worker_binary_path()),
            f"--port={self.port}",
            f"--max_concurrent_computation_calls={self._max_concurrent}",
        ]
        # PDEATHSIG fires when the *thread* that forked exits; start() is
        # called from the worker's main thread, which lives as long as it.
        self._process = subprocess.Popen(
            args,
            cwd=self._working_dir,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", _CHANNEL_OPTIONS)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self._startup_timeout_s)
        except grpc.FutureTimeoutError:
            exit_code = self._process.poll()
            self.close()
            raise RuntimeError(
                f"TFF executor service did not start on port {self.port} within "
                f"{self._startup_timeout_s:.0f} s (exit code {exit_code})"
            ) from None
        self._methods = {
            kind: self._channel.unary_unary(_SERVICE + spec.name)
            for kind, spec in envelope.KINDS.items()
        }
        # worker_binary has no flag to bind loopback only; we connect on
        # 127.0.0.1, and the port must be firewalled (docs/deploy.md).
        log.info(
            "executor_service_started",
            pid=self._process.pid,
            port=self.port,
            listens_on="all interfaces (TFF's worker_binary); firewall this port",
        )

    def call(self, kind: int, request: bytes, timeout_s: float | None = None) -> bytes:
        """Sends one serialized request; returns the serialized response."""
        if self._process is None or self._process.poll() is not None:
            raise ExecutorCallError(grpc.StatusCode.UNAVAILABLE, "executor service is not running")
        try:
            return self._methods[kind](request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise ExecutorCallError(e.code(), e.details() or str(e)) from None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def close(self, grace_s: float = 5.0) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # worker_binary ignores SIGINT
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(grace_s)
        log.info("executor_service_stopped", pid=process.pid, exit_code=process.returncode)

    def __enter__(self) -> ExecutorService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until_gone(pid: int, timeout_s: float) -> bool:
    """True once no process `pid` exists (tests and the CLI use it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
