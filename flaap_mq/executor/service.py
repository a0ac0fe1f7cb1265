"""TFF's executor service as a child process that nothing but its owner can reach.

TFF 0.87 executes everything in its C++ executor service, the `worker_binary`
shipped in the wheel. That binary listens on `[::]:PORT` with no credentials
and has no option to bind elsewhere, so started as TFF starts it, anyone who
can reach the host can run TensorFlow graphs there. `ExecutorService` starts
it in a sandbox instead (`flaap_mq/executor/inside`): its own network
namespace with only a loopback, a read-only view of the file system, its own
PID namespace, and a minimal environment. The owner reaches it through Unix
sockets in a private directory (0700, sockets 0600): `call` on a TCP
connection the sandbox hands it over one of them (made inside, so the
executor's port stays in the sandbox's namespace, and no byte is relayed),
and `open_channel` (grpcio, which can only dial a path) through a relay.

Both flaap-mq processes that run TFF computations use it: the silo worker,
and the coordinator for `merge`. `ExecutorNetwork.HOST` starts the binary
the old way, listening on every interface of the host (its owner dials it
on loopback); it exists for hosts that forbid the namespaces, only behind
an explicit flag, with a warning.

The service owns the process tree outright, as TFF's own launcher does not
(it leaks the binary and stops it with a SIGINT the binary ignores): every
process in it dies with its parent (`PR_SET_PDEATHSIG`), whatever kills the
owner; `close()` ends it with SIGTERM, then SIGKILL, and reaps it. The
sandbox runs in its own session, so a terminal's Ctrl-C reaches the owner
only, which decides when the executor stops.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc
import portpicker

from flaap_mq.executor.client import ExecutorCallError, ExecutorClient
from flaap_mq.executor.environment import minimal_environment
from flaap_mq.logs import get_logger
from flaap_mq.protocol.chunking import Buffer

log = get_logger("flaap_mq.executor")

_SERVICE = "/tensorflow_federated.v0.ExecutorGroup/"
_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000  # as TFF's own launcher
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
]
_INSIDE = Path(__file__).with_name("inside")
_SOCKET_DIR_PREFIX = "flaap-executor-"
_SOCKET_NAME = "executor.sock"  # bytes relayed (grpcio's channels)
_HANDOFF_SOCKET_NAME = "connect.sock"  # a connected socket handed over (our client)
# The port the executor listens on inside its own network namespace, where
# nothing else listens: any port will do.
SANDBOX_PORT = 8000


class ExecutorNetwork(enum.Enum):
    """Where the executor's port is."""

    SANDBOX = "sandbox"  # its own network namespace; reached by a Unix socket
    HOST = "host"  # the host's network, every interface (TFF's behaviour)


# How a worker whose executor listens on the host's network names its broker
# connection, so that `flaap-mq status` and the management UI show it.
HOST_NETWORK_MARK = "executor-network=host"


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be made here; the message says why and what to do."""


def worker_binary_path() -> Path:
    """TFF's executor binary, found without importing TFF (and TensorFlow with it)."""
    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("TensorFlow Federated is not installed: run `make install`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "worker_binary"
    if not path.is_file():
        raise RuntimeError(f"TFF's executor service binary is missing: expected {path}")
    return path


class ExecutorService:
    """Starts, calls and stops one `worker_binary`; see the module docstring.

    Args:
      network: `SANDBOX` (default) or, knowingly, `HOST`.
      data_dir: the executor's working directory (a silo's datasets),
        read-only to it in the sandbox.
      hidden_paths: files or directories the executor must not read (the
        owner's credentials); they read as empty in the sandbox.
    """

    def __init__(
        self,
        *,
        network: ExecutorNetwork = ExecutorNetwork.SANDBOX,
        data_dir: str | os.PathLike[str] | None = None,
        hidden_paths: Iterable[str | os.PathLike[str]] = (),
        max_concurrent_computation_calls: int = -1,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.network = ExecutorNetwork(network)
        self._data_dir = str(Path(data_dir).resolve()) if data_dir is not None else None
        self._hidden = sorted({str(Path(p).resolve()) for p in hidden_paths})
        self._max_concurrent = max_concurrent_computation_calls
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None
        self._client: ExecutorClient | None = None
        self._methods: dict[int, str] = {}
        self.target: str | None = None  # grpcio's target, once started
        # `ExecutorClient`'s: in the sandbox, `handoff:PATH` (`http2.Connection`).
        self.client_target: str | None = None

    @property
    def pid(self) -> int | None:
        """The process this service started (the sandbox's relay, or the binary)."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Starts the executor and waits until it answers; raises if it cannot."""
        if self.network is ExecutorNetwork.SANDBOX:
            self._start_sandboxed()
        else:
            self._start_on_host()
        self._client = ExecutorClient(self.client_target, max_message_bytes=_MAX_MESSAGE_BYTES)
        try:
            self._client.wait_ready(self._startup_timeout_s)
        except ExecutorCallError:
            exit_code = self._process.poll() if self._process else None
            self.close()
            raise RuntimeError(
                f"TFF's executor service did not answer at {self.target} within "
                f"{self._startup_timeout_s:.0f} s (exit code {exit_code})"
            ) from None
        from flaap_mq.protocol import envelope  # the kinds of request it serves

        self._methods = {kind: _SERVICE + spec.name for kind, spec in envelope.KINDS.items()}
        log.info(
            "executor_service_started",
            pid=self.pid,
            network=self.network.value,
            target=self.target,
        )

    def _command(self, config: dict) -> list[str]:
        # -I -S: standard library only, nothing from the environment or site-packages.
        return [sys.executable, "-I", "-S", str(_INSIDE), json.dumps(config)]

    def _start_sandboxed(self) -> None:
        base = _socket_base()
        remove_stale_socket_dirs(base)
        self._socket_dir = tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX, dir=base)  # mode 0700
        socket_path = os.path.join(self._socket_dir, _SOCKET_NAME)
        status_read, status_write = os.pipe()
        config = {
            "mode": "sandbox",
            "parent_pid": os.getpid(),
            "binary": str(worker_binary_path()),
            "args": self._binary_args(SANDBOX_PORT),
            "port": SANDBOX_PORT,
            "socket": socket_path,
            "handoff_socket": os.path.join(self._socket_dir, _HANDOFF_SOCKET_NAME),
            "data_dir": self._data_dir,
            "hidden": self._hidden,
            "status_fd": status_write,
            "startup_timeout_s": self._startup_timeout_s,
        }
        try:
            self._process = self._popen(config, pass_fds=(status_write,))
        finally:
            os.close(status_write)
        try:
            answer = self._read_status(status_read)
        finally:
            os.close(status_read)
        if answer != "ready":
            self.close()
            reason = answer.removeprefix("error: ") or "it exited without saying why"
            raise SandboxUnavailable(f"cannot start TFF's executor in its sandbox: {reason}")
        self.target = f"unix:{socket_path}"
        self.client_target = f"handoff:{config['handoff_socket']}"

    def _start_on_host(self) -> None:
        port = portpicker.pick_unused_port()
        config = {
            "mode": "host",
            "parent_pid": os.getpid(),
            "binary": str(worker_binary_path()),
            "args": self._binary_args(port),
            "data_dir": self._data_dir,
        }
        self._process = self._popen(config)
        self.target = self.client_target = f"127.0.0.1:{port}"
        log.warning(
            "executor_network_host",
            port=port,
            detail="TFF's executor listens on this port of every interface of this host, "
            "without credentials (--executor-network=host): anyone who can reach the host "
            "can run TensorFlow graphs in it. Firewall the port, or use the default sandbox.",
        )

    def _binary_args(self, port: int) -> list[str]:
        return [f"--port={port}", f"--max_concurrent_computation_calls={self._max_concurrent}"]

    def _popen(self, config: dict, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._command(config),
            stdin=subprocess.DEVNULL,
            env=minimal_environment(),
            pass_fds=pass_fds,
            # Its own session: a terminal's Ctrl-C goes to the owner, not here.
            start_new_session=True,
        )

    def _read_status(self, fd: int) -> str:
        """The sandbox's first status line, or a timeout/exit description."""
        deadline = time.monotonic() + self._startup_timeout_s
        received = b""
        while b"\n" not in received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"error: no word from it within {self._startup_timeout_s:.0f} s"
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self._process.wait(5) if self._process else None
                    return f"error: it exited (code {code}) before it was ready"
                received += chunk
        return received.split(b"\n", 1)[0].decode(errors="replace")

    def open_channel(self) -> grpc.Channel:
        """A new gRPC channel to the executor (the caller closes it).

        For TFF's own grpcio stub, which only the tests' reference runtime
        uses (`flaap_mq/testing/tff_local.py`); `call`, and the coordinator's
        merge executor, go through `ExecutorClient`, which receives an answer
        into one buffer where grpcio holds it three times.
        """
        if self.target is None:
            raise RuntimeError("the executor service is not started")
        return grpc.insecure_channel(self.target, CHANNEL_OPTIONS)

    def call(
        self, kind: int, request: Buffer | Sequence[Buffer], timeout_s: float | None = None
    ) -> memoryview:
        """Sends one serialized request (in one or more buffers); returns the serialized response.

        Raises `ExecutorCallError`.
        """
        if self._client is None or self._process is None or self._process.poll() is not None:
            raise ExecutorCallError(grpc.StatusCode.UNAVAILABLE, "executor service is not running")
        return self._client.call(self._methods[kind], request, timeout_s)

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def close(self, grace_s: float = 5.0) -> None:
        """Stops the executor (SIGTERM, then SIGKILL) and reaps it; idempotent."""
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                # Asked to stop: its -15 (SIGTERM) is the normal end, not logged
                # as an exit code, which would read like a crash.
                process.send_signal(signal.SIGTERM)  # worker_binary ignores SIGINT
                try:
                    process.wait(grace_s)
                    log.info("executor_service_stopped", pid=process.pid)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(grace_s)
                    log.warning("executor_service_killed", pid=process.pid, grace_s=grace_s)
            else:
                log.info(
                    "executor_service_stopped",
                    pid=process.pid,
                    ended_before_asked=_describe_exit(process.returncode),
                )
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        self.target = self.client_target = None

    def __enter__(self) -> ExecutorService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe_exit(returncode: int) -> str:
    """`exit status N`, or `signal SIGNAME` for Popen's negative return codes."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


def _socket_base() -> str:
    return os.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir()  # systemd's, or /tmp


def remove_stale_socket_dirs(base: str | None = None, *, min_age_s: float = 60.0) -> None:
    """Removes socket directories that owners killed with SIGKILL could not remove.

    Only this user's, only where nothing listens on the socket (a connection
    is refused, or there is no socket), and only `min_age_s` after the last
    change (a sandbox starts in milliseconds), so that a sandbox another
    process is starting is never touched. A start does this for the
    directories its predecessors left; the test run, at its end, for its own.
    """
    for directory in Path(base or _socket_base()).glob(f"{_SOCKET_DIR_PREFIX}*"):
        try:
            info = directory.stat()
            if info.st_uid != os.getuid() or time.time() - info.st_mtime < min_age_s:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)  # a full backlog would block: then it is alive
                probe.connect(str(directory / _SOCKET_NAME))
        except (ConnectionRefusedError, FileNotFoundError):
            shutil.rmtree(directory, ignore_errors=True)
        except OSError:
            continue  # listening, or not ours to judge


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
