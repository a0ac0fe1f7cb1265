"""Get a RabbitMQ broker for demos and tests, without touching anyone else's.

Three sources, tried in this order by :func:`throwaway_broker`:

1. A broker the caller already has (e.g. the shared node on 127.0.0.1:5672), if it answers.
2. A disposable container via testcontainers, where a Docker engine answers.
3. A private ``rabbitmq-server`` node from the OS package (:class:`PrivateBrokerNode`), on free
   ports with its own data directory. This is what runs on the project machines, which have
   RabbitMQ installed but no Docker engine. Tests that stop, restart or reconfigure a broker
   should always use a private node so the shared one stays untouched.

Broker URLs carry passwords; anything this module logs goes through :func:`redact_url`.
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
import stat
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pika
import pika.exceptions
import portpicker
import psutil

from flaap_mq.broker.urls import redact_url

logger = logging.getLogger(__name__)

RABBITMQ_USER = "rabbitmq"
DEFAULT_CONTAINER_IMAGE = "rabbitmq:3.10"  # same minor version as the OS package on our machines

# Every subprocess we start carries this variable with a fresh value, so that on a timeout we can
# find and kill everything it spawned. The Debian wrappers run the real tools through `su -c`,
# which puts them in a new session, out of reach of a process-group kill.
_RUN_MARKER = "FLAAP_MQ_RUN_ID"
_LOG_TAIL_LINES = 40
_PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def broker_answers(url: str, timeout: float = 2.0) -> bool:
    """True if an AMQP connection to ``url`` can be opened and closed within about ``timeout`` s."""
    try:
        params = pika.URLParameters(url)
    except ValueError:
        logger.debug("not an AMQP URL: %s", redact_url(url))
        return False
    # Override whatever the URL's query asks for: a probe must give up quickly.
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    params.blocked_connection_timeout = timeout
    params.connection_attempts = 1
    params.retry_delay = 0
    try:
        connection = pika.BlockingConnection(params)
        connection.close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        logger.debug("no broker answers at %s: %r", redact_url(url), exc)
        return False
    return True


# --------------------------------------------------------------------------- subprocess helpers


def _processes_with_env(name: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment has ``name=value`` (zombies have no environment)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(name) == value:
                found.append(proc)
    return found


def _terminate(processes: Sequence[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever outlives ``grace`` seconds; bounded overall."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in processes:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _, processes = psutil.wait_procs(processes, timeout=grace)
        if not processes:
            return
    logger.warning("processes survived SIGKILL: %s", [p.pid for p in processes])


def _run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    output_file: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a hard ``timeout``, killing everything it spawned if that expires.

    ``subprocess.run(timeout=...)`` only kills the direct child, which here is a shell wrapper;
    the Erlang VM it started through ``su`` would live on. With ``output_file`` the output goes
    to that file instead of a pipe, for commands that leave daemons behind holding their stdout.
    """
    run_id = uuid.uuid4().hex
    full_env = {**env, _RUN_MARKER: run_id}
    with contextlib.ExitStack() as stack:
        out: Any = subprocess.PIPE
        err: Any = subprocess.PIPE
        if output_file is not None:
            out, err = stack.enter_context(output_file.open("w")), subprocess.STDOUT
        proc = subprocess.Popen(
            list(cmd),
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _terminate(_processes_with_env(_RUN_MARKER, run_id), grace=2.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout or "", stderr or "")


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(s.strip() for s in (result.stdout, result.stderr) if s and s.strip())


def _find_tool(name: str) -> str:
    # /usr/sbin is often missing from a non-login PATH.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise RuntimeError(f"{name} not found; install the rabbitmq-server OS package")
    return path


def _clean_env() -> dict[str, str]:
    # A private node must not pick up another node's settings from the caller's environment.
    return {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}


# --------------------------------------------------------------------------- private node


class PrivateBrokerNode:
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
        began = time.monotonic()
        deadline = began + self._start_timeout
        self._prepare_data_dir()
        logger.info("starting private RabbitMQ node %s on port %d", self._node_name, self._port)
        try:
            self._launch(deadline)
            self._await_startup(deadline)
        except BaseException:
            self._kill_node_processes()
            raise
        self.last_start_seconds = time.monotonic() - began
        logger.info("node %s up in %.1f s", self._node_name, self.last_start_seconds)

    def stop(self) -> None:
        """Stop the node gracefully if it is running, else kill its processes. Bounded."""
        if not self.os_processes():
            return
        began = time.monotonic()
        deadline = began + self._stop_timeout
        try:
            result = self._ctl(["stop"], timeout=self._stop_timeout)
            stopping = result.returncode == 0
            if not stopping:
                logger.warning("rabbitmqctl stop failed: %s", _output(result))
        except subprocess.TimeoutExpired:
            stopping = False
            logger.warning("rabbitmqctl stop timed out for %s", self._node_name)
        # `rabbitmqctl stop` returns when the node agrees to halt, before the VM has exited.
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

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- tools

    def rabbitmqctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``rabbitmqctl -n <node> *args`` and return its output; raise on failure."""
        result = self._ctl(args, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} exited {result.returncode}: {_output(result)}"
            )
        return result.stdout

    def os_processes(self) -> list[psutil.Process]:
        """The node's live OS processes (beam.smp and its helpers).

        RabbitMQ 3.10 sets the node name from inside the VM, so it is not on beam.smp's command
        line; it is in the environment we start the node with, which every helper inherits.
        """
        return _processes_with_env("RABBITMQ_NODENAME", self._node_name)

    # -- internals

    def _node_env(self) -> dict[str, str]:
        d = self.data_dir
        return {
            **_clean_env(),
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
        result = _run(
            [_find_tool("rabbitmq-server"), "-detached"],
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
            last_output = _output(result)
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
            parts.append(f"no node log ({exc})")
        return "\n".join(parts)

    def _ctl(self, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        # Not the node's env: that carries RABBITMQ_NODENAME, which os_processes() keys on.
        return _run(
            [_find_tool("rabbitmqctl"), "-n", self._node_name, *args],
            env=_clean_env(),
            timeout=timeout,
        )

    def _kill_node_processes(self) -> None:
        processes = self.os_processes()
        if processes:
            logger.warning(
                "killing node %s processes %s", self._node_name, [p.pid for p in processes]
            )
            _terminate(processes)


def _chown_tree(root: Path, user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise RuntimeError(f"no {user!r} OS user; install the rabbitmq-server package") from None
    for path in [root, *root.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _check_reachable_by_others(directory: Path) -> None:
    # The node runs as the rabbitmq user, which must be able to walk down to its data directory.
    for path in [directory.resolve(), *directory.resolve().parents]:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            raise RuntimeError(
                f"{path} is not searchable by other users, so the rabbitmq user cannot reach a "
                f"data directory under {directory}; choose another parent_dir (e.g. /tmp)"
            )


# --------------------------------------------------------------------------- testcontainers


def docker_available(timeout: float = 1.0) -> bool:
    """True if a Docker engine answers a ping within about ``timeout`` seconds."""
    try:
        import docker  # optional: comes with testcontainers (dev extra)

        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:  # any failure at all means "no usable engine"
        logger.debug("no Docker engine: %r", exc)
        return False


class TestcontainersBroker:
    """A RabbitMQ container via testcontainers; needs a Docker engine (see docker_available)."""

    __test__ = False  # its name starts with "Test"; keep pytest from collecting it

    def __init__(self, image: str = DEFAULT_CONTAINER_IMAGE) -> None:
        self.image = image
        self._container: Any = None

    @property
    def url(self) -> str:
        c = self._container
        if c is None:
            raise RuntimeError("container not started")
        user, password, vhost = (
            urllib.parse.quote(v, safe="") for v in (c.username, c.password, c.vhost)
        )
        host, port = c.get_container_host_ip(), c.get_exposed_port(c.port)
        return f"amqp://{user}:{password}@{host}:{port}/{vhost}"

    def start(self) -> None:
        try:
            from testcontainers.community.rabbitmq import RabbitMqContainer
        except ImportError:  # testcontainers < 4.14 kept the module at the top level
            from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer(self.image)
        # Set before start(): if start() fails halfway, stop() still removes the container.
        self._container = container
        container.start()

    def stop(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            container.stop()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- the one entry point


@contextlib.contextmanager
def throwaway_broker(preferred_url: str | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(url, description)`` for a broker to use; stop whatever was started on exit.

    ``preferred_url`` is used as is if a broker answers there. Otherwise a testcontainers broker
    where Docker answers, else a private rabbitmq-server node. ``description`` says which, and
    never contains the password.
    """
    if preferred_url is not None and broker_answers(preferred_url):
        description = f"existing broker at {redact_url(preferred_url)}"
        logger.info("using %s", description)
        yield preferred_url, description
        return
    if preferred_url is not None:
        logger.info("no broker answers at %s; starting one", redact_url(preferred_url))
    with contextlib.ExitStack() as stack:
        url, description = _start_broker(stack)
        logger.info("using %s", description)
        yield url, description


def _start_broker(stack: contextlib.ExitStack) -> tuple[str, str]:
    if docker_available():
        try:
            container = stack.enter_context(TestcontainersBroker())
        except Exception as exc:  # e.g. image pull failed; a local node may still work
            logger.warning("testcontainers broker failed (%r); trying a private node", exc)
        else:
            url = container.url
            return url, f"testcontainers {container.image} broker at {redact_url(url)}"
    node = stack.enter_context(PrivateBrokerNode())
    return node.url, f"private rabbitmq-server node {node.node_name} at {redact_url(node.url)}"
