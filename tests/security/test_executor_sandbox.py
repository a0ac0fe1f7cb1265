"""A silo opens no port, and a computation there reaches no secret and changes no data.

Real worker processes and the coordinator's real context: a probe from
outside tries every port the executors listen on, and computations sent the
ordinary way (through the broker, as any coordinator's) reach for the
broker password, the worker's credential files and the silo's data.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import flaap_mq
import flaap_mq.executor
from flaap_mq.coordinator.errors import SiloExecutionError
from flaap_mq.local.workers import SANDBOX_PROGRAM, WorkerFleet

SILO = "sealed"
CANARY = f"canary-{uuid.uuid4().hex}"  # a secret in the worker's environment
DATASET = "dataset.txt"
DATASET_TEXT = "the silo's own examples\n"


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _host_listeners(pids: set[int]) -> list[str]:
    """TCP listeners and bound UDP sockets of `pids` in this (the host's) network namespace."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid in pids and (
            conn.status == psutil.CONN_LISTEN or conn.type == socket.SOCK_DGRAM
        ):
            found.append(f"pid {conn.pid} {conn.laddr}")
    return found


def _ports_listening_inside(pid: int) -> set[int]:
    """TCP ports in LISTEN state in `pid`'s own network namespace (/proc/PID/net)."""
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _executors(pids: set[int]) -> list[psutil.Process]:
    return [psutil.Process(p) for p in pids if "worker_binary" in psutil.Process(p).name()]


@pytest.fixture(scope="module")
def silo(tmp_path_factory: pytest.TempPathFactory, broker_url: str) -> Iterator[dict]:
    """The silo's data directory, its URL file and systemd-style credentials directory."""
    root = tmp_path_factory.mktemp("silo")
    data_dir = root / "data"
    data_dir.mkdir()
    (data_dir / DATASET).write_text(DATASET_TEXT)
    url_file = root / "broker-url"
    url_file.write_text(broker_url + "\n")
    url_file.chmod(0o600)
    credentials = root / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "broker-url").write_text(f"amqp://silo:{CANARY}@broker/\n")
    yield {"data_dir": data_dir, "url_file": url_file, "credentials": credentials}


@pytest.fixture(scope="module")
def fleet(module_workers, silo: dict) -> WorkerFleet:
    return module_workers(
        [SILO],
        extra_args=[
            "--data-dir",
            str(silo["data_dir"]),
            "--broker-url-file",
            str(silo["url_file"]),
        ],
        env={"FLAAP_MQ_CANARY": CANARY, "CREDENTIALS_DIRECTORY": str(silo["credentials"])},
    )


@pytest.fixture(scope="module")
def context(fleet: WorkerFleet, broker_url: str) -> Iterator[flaap_mq.FederatedSilosContext]:
    with flaap_mq.create_execution_context(
        broker_url, [SILO], topology_prefix=fleet.prefix, task_timeout=120
    ) as ctx:
        yield ctx


def _on_silo(context: object, fn: tff.Computation) -> object:
    """Runs the no-argument TF computation `fn` on the silo's client; its result."""

    @tff.federated_computation
    def on_clients() -> object:
        return tff.federated_eval(fn, tff.CLIENTS)

    with tff.framework.get_context_stack().install(context):
        result = on_clients()
    return result[0] if isinstance(result, list) else result


def test_no_process_of_worker_or_coordinator_listens_on_the_host(fleet, context):
    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def total(values: object) -> object:
        return tff.federated_sum(values)

    with tff.framework.get_context_stack().install(context):
        assert total([np.float32(2.0)]) == pytest.approx(2.0)

    worker_tree = {p.pid for p in _tree(fleet.workers[SILO].pid)}
    coordinator_tree = {p.pid for p in _tree(os.getpid())}
    executors = _executors(worker_tree | coordinator_tree)
    assert len(executors) >= 2, "expected the silo's executor and the coordinator's merge executor"

    assert _host_listeners(worker_tree | coordinator_tree) == []

    # The executors do listen, inside their own network namespaces; from
    # here (the host, loopback included) every one of those ports is closed.
    probed = 0
    for executor in executors:
        ports = _ports_listening_inside(executor.pid)
        assert ports, f"executor {executor.pid} listens nowhere, even inside its namespace"
        for port in ports:
            others = [c for c in psutil.net_connections("inet") if c.laddr and c.laddr.port == port]
            if any(c.status == psutil.CONN_LISTEN for c in others):
                continue  # an unrelated program of this host holds the same number
            for host in ("127.0.0.1", "::1"):
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((host, port), timeout=5).close()
                probed += 1
    assert probed > 0, "every executor port was taken by another program: nothing was probed"


def test_the_executor_reaches_no_secret(context, silo):
    @tff.tensorflow.computation
    def every_environment() -> tf.Tensor:
        files = tf.io.matching_files("/proc/[0-9]*/environ")
        contents = tf.map_fn(tf.io.read_file, files, fn_output_signature=tf.string)
        return tf.strings.reduce_join(contents, separator="\n--\n")

    @tff.tensorflow.computation
    def process_count() -> tf.Tensor:
        return tf.size(tf.io.matching_files("/proc/[0-9]*"))

    url_path = str(silo["url_file"])

    @tff.tensorflow.computation
    def url_file() -> tf.Tensor:
        return tf.io.read_file(url_path)

    credentials_glob = str(silo["credentials"]) + "/*"

    @tff.tensorflow.computation
    def credentials() -> tf.Tensor:
        return tf.size(tf.io.matching_files(credentials_glob))

    environments = _on_silo(context, every_environment)
    environments = environments.decode() if isinstance(environments, bytes) else str(environments)
    assert "PATH=" in environments, "the read of the environment itself failed"
    assert "FLAAP_MQ" not in environments
    assert CANARY not in environments
    # Only the executor itself is visible: not the worker, not the host's processes.
    assert _on_silo(context, process_count) == 1
    assert _on_silo(context, url_file) in (b"", "")
    assert _on_silo(context, credentials) == 0


def test_the_data_dir_is_read_only_to_computations(context, silo):
    data_dir = silo["data_dir"]

    @tff.tensorflow.computation
    def read_dataset() -> tf.Tensor:
        return tf.io.read_file(DATASET)  # relative: the executor works in the data dir

    assert _on_silo(context, read_dataset) in (DATASET_TEXT.encode(), DATASET_TEXT)

    for name in (DATASET, "planted.txt"):
        target = str(data_dir / name)

        @tff.tensorflow.computation
        def overwrite() -> tf.Tensor:
            written = tf.io.write_file(target, "written by a computation")  # noqa: B023
            with tf.control_dependencies([written]):  # or the graph prunes the write
                return tf.constant(1)

        with pytest.raises(SiloExecutionError, match=r"(?i)read-only file system"):
            _on_silo(context, overwrite)
    assert (data_dir / DATASET).read_text() == DATASET_TEXT
    assert not (data_dir / "planted.txt").exists()


def _ends(process: psutil.Process, timeout_s: float) -> bool:
    """True once `process` has exited (a zombie its parent has not reaped yet counts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _sandbox_processes_of(pid: int) -> list[psutil.Process]:
    return [
        p
        for p in _tree(pid)[1:]
        if "worker_binary" in p.name() or any(SANDBOX_PROGRAM in part for part in p.cmdline()[:5])
    ]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_nothing_of_the_sandbox_outlives_its_worker(workers, how):
    fleet = workers(["short-lived"])
    worker = fleet.workers["short-lived"]
    sandbox = _sandbox_processes_of(worker.pid)
    names = sorted(p.name() for p in sandbox)
    assert len(sandbox) == 3, f"expected relay, keeper and worker_binary, found {names}"
    if how == "SIGKILL":
        worker.kill()
    else:
        assert worker.stop() == 0
    for process in sandbox:
        assert _ends(process, 10), f"{process.pid} ({process.name()}) outlived it"


def test_a_killed_relay_takes_its_executor_along_and_the_worker_starts_another(workers, broker_url):
    fleet = workers(["relay-loss"])
    worker = fleet.workers["relay-loss"]
    before = _sandbox_processes_of(worker.pid)
    relay = next(p for p in before if p.ppid() == worker.pid)
    relay.kill()
    for process in before:
        assert _ends(process, 10), f"{process.pid} ({process.name()}) outlived it"

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def total(values: object) -> object:
        return tff.federated_sum(values)

    with (
        flaap_mq.create_execution_context(
            broker_url, ["relay-loss"], topology_prefix=fleet.prefix, task_timeout=120
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        assert total([np.float32(3.0)]) == pytest.approx(3.0)
    after = _sandbox_processes_of(worker.pid)
    assert len(after) == 3 and not {p.pid for p in after} & {p.pid for p in before}
    assert "executor_service_restarted" in worker.log_text()


def _tool(name: str) -> str:
    path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.skip(f"{name} (util-linux) is not installed")
    return path


def test_without_user_namespaces_the_worker_refuses_and_says_how_to_fix_it(broker_url, prefix):
    """A kernel that refuses the namespaces: one line naming the fix; no insecure fallback."""
    unshare, setpriv = _tool("unshare"), _tool("setpriv")
    # In a user namespace of our own, user namespaces are then limited to 0
    # (the limit is per namespace: the host is untouched), and the worker
    # runs without capabilities, as an unprivileged user would.
    script = (
        "echo 0 > /proc/sys/user/max_user_namespaces && "
        f'exec {setpriv} --bounding-set=-all --inh-caps=-all "$@"'
    )
    command = [
        unshare, "--user", "--map-root-user", "sh", "-c", script, "sh",
        sys.executable, "-m", "flaap_mq.cli", "worker", "--silo-id", "no-userns",
        "--prefix", prefix,
    ]  # fmt: skip
    env = {**os.environ, "FLAAP_MQ_BROKER_URL": broker_url}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "user namespace" in output
    assert "max_user_namespaces" in output
    assert "--executor-network=host" in output
    assert "Traceback" not in output


def test_host_network_is_explicit_and_warned(workers):
    fleet = workers(["open"], extra_args=["--executor-network", "host"])
    worker = fleet.workers["open"]
    time.sleep(0.5)  # the warning is logged before the worker consumes; flushed by now
    assert "executor_network_host" in worker.log_text()
    pids = {p.pid for p in _tree(worker.pid)}
    assert _host_listeners(pids), "with --executor-network host the executor listens on the host"
    assert worker.stop() == 0


def test_what_runs_in_the_executors_place_can_change_nothing_and_reach_no_socket(tmp_path):
    """Code that escapes TensorFlow (native code) finds no way out either.

    The sandbox program (the same one ExecutorService starts) runs a probe in
    the executor's place. A read-only mount does not stop connect(2) to a
    socket: the seccomp filter does (TCP must still work: the executor
    listens on TCP). It has no capability, so it cannot unmount the masks or
    remount the file system; /proc is read-only, so even as the host's root
    (this suite runs as root) it cannot write host-wide settings in /proc/sys.
    """
    host_socket = tmp_path / "host-service.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(host_socket))
    listener.listen(1)
    probe = (
        "import socket\n"
        "try:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        f"    s.connect({str(host_socket)!r})\n"
        "    print('UNIX CONNECTED')\n"
        "except OSError as e:\n"
        "    print('unix refused:', e.errno)\n"
        "socket.socket(socket.AF_INET).close()\n"
        "print('inet ok')\n"
        "status = open('/proc/self/status').read()\n"
        "caps = [status.split(f'{k}:')[1].split()[0] for k in ('CapEff', 'CapBnd')]\n"
        "print('caps', *caps)\n"
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('umount', libc.umount2(b'/proc', 0), ctypes.get_errno())\n"
        "print('remount', libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())\n"
        "hostname = open('/proc/sys/kernel/hostname').read()\n"
        "try:\n"
        "    open('/proc/sys/kernel/hostname', 'w').write(hostname)  # the same value\n"
        "    print('PROC WRITTEN')\n"
        "except OSError as e:\n"
        "    print('proc refused:', e.errno)\n"
    )
    (tmp_path / "data").mkdir()
    status_read, status_write = os.pipe()
    config = {
        "mode": "sandbox",
        "parent_pid": os.getpid(),
        "binary": sys.executable,
        "args": ["-I", "-S", "-c", probe],
        "port": 18790,
        "socket": str(tmp_path / "executor.sock"),
        "handoff_socket": str(tmp_path / "connect.sock"),
        "data_dir": str(tmp_path / "data"),
        "hidden": [],
        "status_fd": status_write,
        "startup_timeout_s": 5,
    }
    sandbox = Path(flaap_mq.executor.__file__).with_name("inside")
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", str(sandbox), json.dumps(config)],
            pass_fds=(status_write,),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(status_write)
        os.close(status_read)
        listener.close()
    assert "unix refused: 1" in done.stdout, done.stdout + done.stderr  # EPERM
    assert "UNIX CONNECTED" not in done.stdout
    assert "inet ok" in done.stdout
    assert "caps 0000000000000000 0000000000000000" in done.stdout
    assert "umount -1 1" in done.stdout and "remount -1 1" in done.stdout  # EPERM
    assert "proc refused: 30" in done.stdout and "PROC WRITTEN" not in done.stdout  # EROFS
