"""`PrivateBrokerNode`: a private ``rabbitmq-server`` node on free ports, for tests and the demo.

Started from the OS package's scripts with its own data directory and
configuration, so it never touches the shared node; stopped, restarted or
clustered at will by the tests that need a broker to fail. The last choice of
`flaap_mq.local.broker.throwaway_broker`, and what runs on the project
machines, which have RabbitMQ installed but no Docker engine. The commands
it runs are bounded and leave nothing behind (`flaap_mq.local.processes`).

The node runs detached (`rabbitmq-server -detached`), so nothing ties it to
the process that started it: a test process killed, or an xdist worker that
crashed, left one running for hours. So each running node has a reaper
(`_REAPER`), a standard-library process that waits on a pipe from the
node's owner; when the pipe closes without the owner having stopped the node
(the owner died), it kills the node's processes and deletes its data.

One module of some 470 lines, for the node's whole life (data directory,
boot, readiness, stop, reaper): each step depends on the names, ports and
directory the others chose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import portpicker
import psutil

from flaap_mq.local.lifecycle import Lifecycle
from flaap_mq.local.processes import (
    clean_env,
    find_tool,
    output_of,
    processes_with_env,
    run_bounded,
    terminate,
)

logger = logging.getLogger(__name__)

RABBITMQ_USER = "rabbitmq"
_LOG_TAIL_LINES = 40
_PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


# Run as `python -I -S -c _REAPER NODE_NAME DATA_DIR`, its stdin a pipe from
# the node's owner, which closes it (or dies) when the node may go.
_REAPER = r"""
import os, shutil, signal, sys

node_name, data_dir = sys.argv[1], sys.argv[2]
sys.stdin.buffer.read()  # until the owner closes the pipe, or dies
needle = ("RABBITMQ_NODENAME=" + node_name).encode()
killed = 0
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    try:
        with open("/proc/" + entry + "/environ", "rb") as environ:
            if needle not in environ.read().split(b"\0"):
                continue
        os.kill(int(entry), signal.SIGKILL)
        killed += 1
    except OSError:
        pass
if killed:  # left running: its data too (a node its owner stopped keeps it)
    shutil.rmtree(data_dir, ignore_errors=True)
"""


class PrivateBrokerNode(Lifecycle):
    """A private ``rabbitmq-server`` node on free ports, with its own temporary data directory.

    Use as a context manager; leaving it always stops the node and deletes its directory::

        with PrivateBrokerNode() as node:
            connection = pika.BlockingConnection(pika.URLParameters(node.url))

    Must run as root (the Debian scripts then switch to the ``rabbitmq`` user) or as ``rabbitmq``.
    The node listens on 127.0.0.1 only; the built-in ``guest`` user may only log in from there.
    """

    def __init__(
        self,
        *,
        plugins: Sequence[str] = (),
        rabbitmq_conf: str | None = None,
        advanced_config: str | None = None,
        parent_dir: str | os.PathLike[str] = "/tmp",
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        bad = [p for p in plugins if not _PLUGIN_NAME.match(p)]
        if bad:
            raise ValueError(f"not plugin names: {bad}")
        self._plugins = tuple(plugins)
        self._rabbitmq_conf = rabbitmq_conf
        self._advanced_config = advanced_config
        self._parent_dir = Path(parent_dir)
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._node_name = f"flaap-{secrets.token_hex(4)}@localhost"
        # Picked once so that restart() comes back on the same ports.
        self._port = portpicker.pick_unused_port()
        self._dist_port = portpicker.pick_unused_port()
        self._data_dir: Path | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self.last_start_seconds: float | None = None
        self.last_stop_seconds: float | None = None

    # -- properties

    @property
    def node_name(self) -> str:
        return self._node_name

    @property
    def port(self) -> int:
        return self._port

    @property
    def dist_port(self) -> int:
        return self._dist_port

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@localhost:{self._port}/"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("node has no data directory yet; call start() first")
        return self._data_dir

    @property
    def log_file(self) -> Path:
        return self.data_dir / "log" / f"{self._node_name}.log"

    # -- lifecycle

    def start(self) -> None:
        """Boot the node and wait until it accepts work; on failure leave no node process."""
        if self.os_processes():
            raise RuntimeError(f"node {self._node_name} is already running")
        # A reaper left from before (the node was killed, not stopped) must go
        # now, while there is nothing to kill: it knows the node by its name.
        self._stop_reaper()
        began = time.monotonic()
        deadline = began + self._start_timeout
        self._prepare_data_dir()
        logger.info("starting private RabbitMQ node %s on port %d", self._node_name, self._port)
        try:
            try:
                self._launch(deadline)
                self._await_startup(deadline)
            except _DistributionPortTaken:
                # Free when picked, taken by another process before the VM
                # bound it (parallel test runs pick ports at once): another
                # port, once. Peers find a node's distribution port via epmd.
                self._kill_node_processes()
                taken, self._dist_port = self._dist_port, portpicker.pick_unused_port()
                logger.warning(
                    "node %s: distribution port %d was taken; starting again on %d",
                    self._node_name,
                    taken,
                    self._dist_port,
                )
                self._launch(deadline)
                self._await_startup(deadline)
        except BaseException:
            self._kill_node_processes()
            raise
        self._start_reaper()
        self.last_start_seconds = time.monotonic() - began
        logger.info("node %s up in %.1f s", self._node_name, self.last_start_seconds)

    def stop(self) -> None:
        """Stop the node gracefully if it is running, else kill its processes. Bounded."""
        try:
            self._stop()
        finally:
            self._stop_reaper()

    def _stop(self) -> None:
        if not self.os_processes():
            return
        began = time.monotonic()
        deadline = began + self._stop_timeout
        # SIGTERM stops a node as `rabbitmqctl stop` does (RabbitMQ's signal
        # handler calls init:stop()), without booting a VM for rabbitmqctl.
        stopping = False
        for process in self.os_processes():
            with contextlib.suppress(psutil.Error):
                if process.name() == "beam.smp":
                    process.send_signal(signal.SIGTERM)
                    stopping = True
        while stopping and self.os_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.os_processes():
            logger.warning("node %s did not stop; killing it", self._node_name)
            self._kill_node_processes()
        self.last_stop_seconds = time.monotonic() - began
        logger.info("node %s stopped in %.1f s", self._node_name, self.last_stop_seconds)

    def restart(self) -> None:
        """Stop and start again on the same data directory and ports."""
        self.stop()
        self.start()

    def join_cluster(self, other: PrivateBrokerNode) -> None:
        """Make this (running, empty) node a member of ``other``'s cluster.

        Private nodes can cluster with each other because they all run as the ``rabbitmq`` user
        and so share its Erlang cookie ($HOME/.erlang.cookie). Never join a node you did not
        start: leaving a cluster is not undone by deleting our data directory.
        """
        self.rabbitmqctl("stop_app", timeout=self._stop_timeout)
        try:
            self.rabbitmqctl("join_cluster", other.node_name, timeout=self._start_timeout)
        finally:
            self.rabbitmqctl("start_app", timeout=self._start_timeout)
        self.rabbitmqctl("await_startup", "--timeout", "60", timeout=self._start_timeout)

    def close(self) -> None:
        """Stop the node and delete its data directory."""
        try:
            self.stop()
        finally:
            if self._data_dir is not None:
                shutil.rmtree(self._data_dir, ignore_errors=True)
                self._data_dir = None

    # -- tools

    def rabbitmqctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``rabbitmqctl -n <node> *args`` and return its output; raise on failure."""
        result = self._ctl(args, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} exited {result.returncode}: {output_of(result)}"
            )
        return result.stdout

    def os_processes(self) -> list[psutil.Process]:
        """The node's live OS processes (beam.smp and its helpers).

        RabbitMQ 3.10 sets the node name from inside the VM, so it is not on beam.smp's command
        line; it is in the environment we start the node with, which every helper inherits.
        """
        return processes_with_env("RABBITMQ_NODENAME", self._node_name)

    # -- internals

    def _node_env(self) -> dict[str, str]:
        d = self.data_dir
        return {
            **clean_env(),
            "RABBITMQ_NODENAME": self._node_name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self._port),
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            # Always our own files: /etc/rabbitmq/rabbitmq.conf on the project machines pins a
            # listener to 127.0.0.1:5672, which the shared node holds, so a private node that
            # read it would die at boot with could_not_start_listener.
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
        }

    def _prepare_data_dir(self) -> None:
        if self._data_dir is not None:
            return  # a restart keeps the data
        _check_reachable_by_others(self._parent_dir)
        self._data_dir = Path(tempfile.mkdtemp(prefix="flaap-rabbit-", dir=self._parent_dir))
        d = self._data_dir
        (d / "enabled_plugins").write_text(f"[{','.join(self._plugins)}].\n")
        (d / "rabbitmq.conf").write_text(self._rabbitmq_conf or "")
        (d / "advanced.config").write_text(self._advanced_config or "[].\n")
        # The Debian scripts switch to the rabbitmq user, which must own everything here;
        # otherwise the node dies with failed_to_create_feature_flags_file_directory.
        if os.geteuid() == 0:
            _chown_tree(d, RABBITMQ_USER)

    def _launch(self, deadline: float) -> None:
        # Output to a file: a detached VM could otherwise hold our pipe open.
        out = self.data_dir / "rabbitmq-server.out"
        result = run_bounded(
            [find_tool("rabbitmq-server"), "-detached"],
            env=self._node_env(),
            timeout=max(1.0, deadline - time.monotonic()),
            output_file=out,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmq-server -detached exited {result.returncode}: "
                f"{out.read_text(errors='replace').strip()}"
            )

    def _await_startup(self, deadline: float) -> None:
        # Each rabbitmqctl call boots an Erlang VM (half a CPU-second), and
        # await_startup fails at once until the node has registered with epmd:
        # so ask epmd first, which costs nothing.
        short_name = self._node_name.split("@")[0]
        polls = 0
        while not _registered_with_epmd(short_name):
            if time.monotonic() > deadline:
                raise self._boot_error(f"not up after {self._start_timeout:.0f} s", "")
            polls += 1
            if polls % 10 == 0 and not self.os_processes():
                error = self._boot_error("the node exited while booting", "")
                if _port_state(self._dist_port) != _FREE:
                    raise _DistributionPortTaken(str(error))
                raise error
            time.sleep(0.1)
        last_output = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._boot_error(f"not up after {self._start_timeout:.0f} s", last_output)
            try:
                # await_startup fails at once while the node is not yet registered with epmd,
                # and blocks (up to --timeout) once it is; so retry it.
                result = self._ctl(
                    ["await_startup", "--timeout", str(max(1, int(remaining)))],
                    timeout=remaining,
                )
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0:
                return
            last_output = output_of(result)
            if not self.os_processes():
                raise self._boot_error("the node exited while booting", last_output)
            time.sleep(0.5)

    def _boot_error(self, what: str, ctl_output: str) -> RuntimeError:
        return RuntimeError(
            f"private RabbitMQ node {self._node_name} failed to start: {what}.\n"
            f"last rabbitmqctl await_startup output: {ctl_output or '(none)'}\n"
            f"{self._diagnostics()}"
        )

    def _diagnostics(self) -> str:
        """The tail of the node's log, plus the crash dump's one-line reason if there is one."""
        parts = []
        crash_dump = self.data_dir / "log" / "erl_crash.dump"
        with contextlib.suppress(OSError), crash_dump.open(errors="replace") as f:
            slogan = next((line for line in f if line.startswith("Slogan:")), None)
            if slogan:
                parts.append(f"erl_crash.dump {slogan.strip()}")
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
            parts.append(f"last lines of {self.log_file}:")
            parts.extend(lines[-_LOG_TAIL_LINES:])
        except OSError as exc:
            # A VM that dies before the node logs anything (seen once under
            # load, 2026-11-30) says why nowhere: say what may explain it.
            parts.append(f"no node log ({exc})")
            with contextlib.suppress(OSError):
                out = (self.data_dir / "rabbitmq-server.out").read_text(errors="replace")
                parts.append(f"rabbitmq-server -detached said: {out.strip() or '(nothing)'}")
            for what, port in (("AMQP", self._port), ("distribution", self._dist_port)):
                parts.append(f"{what} port {port}: {_port_state(port)}")
        return "\n".join(parts)

    def _ctl(self, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        # Not the node's env: that carries RABBITMQ_NODENAME, which os_processes() keys on.
        return run_bounded(
            [find_tool("rabbitmqctl"), "-n", self._node_name, *args],
            env=clean_env(),
            timeout=timeout,
        )

    def _start_reaper(self) -> None:
        """A process that kills the node if this one dies without stopping it (module docstring)."""
        self._reaper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _REAPER, self._node_name, str(self.data_dir)],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to the tests is the owner's to handle
        )

    def _stop_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is None:
            return
        reaper.stdin.close()  # the node is stopped: the reaper finds nothing to kill
        try:
            reaper.wait(10)
        except subprocess.TimeoutExpired:
            reaper.kill()
            reaper.wait()

    def _kill_node_processes(self) -> None:
        processes = self.os_processes()
        if processes:
            logger.warning(
                "killing node %s processes %s", self._node_name, [p.pid for p in processes]
            )
            terminate(processes)


def _registered_with_epmd(short_name: str) -> bool:
    """Whether the local epmd lists an Erlang node named `short_name` (NAMES_REQ)."""
    port = int(os.environ.get("ERL_EPMD_PORT", "4369"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.sendall(b"\x00\x01n")
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
    except OSError:
        return False  # no epmd yet: the node starts it
    # After epmd's own port (4 bytes): one "name N at port P" line per node.
    return f"name {short_name} at port ".encode() in answer[4:]


def _chown_tree(root: Path, user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise RuntimeError(f"no {user!r} OS user; install the rabbitmq-server package") from None
    for path in [root, *root.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


_FREE = "free now"


class _DistributionPortTaken(RuntimeError):
    """The VM died while booting, and its distribution port is another process's."""


def _port_state(port: int) -> str:
    """Whether a process (another node, another test) holds `port` on 127.0.0.1 now."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            return f"taken by another process now ({e.strerror or e})"
    return _FREE


def _check_reachable_by_others(directory: Path) -> None:
    # The node runs as the rabbitmq user, which must be able to walk down to its data directory.
    for path in [directory.resolve(), *directory.resolve().parents]:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            raise RuntimeError(
                f"{path} is not searchable by other users, so the rabbitmq user cannot reach a "
                f"data directory under {directory}; choose another parent_dir (e.g. /tmp)"
            )
