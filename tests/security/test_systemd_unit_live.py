"""The shipped unit started by a real systemd: worker, sandbox and TensorFlow run; hardening holds.

Opt-in (FLAAP_MQ_TEST_LIVE_SYSTEMD=1): it boots a private systemd as PID 1
of its own namespaces (tests/security/private_systemd.py), so it needs root
with CAP_SYS_ADMIN, a writable cgroup2 hierarchy and a host whose PID 1 is
not systemd; otherwise it is skipped and says why. Under that manager the
unit starts as shipped (deploy/systemd/flaap-mq-worker@.service with
broker.conf): same dynamic user, credentials, namespaces, seccomp filter and
cgroup IP filter as on a silo host. A drop-in changes only what this machine
needs: `--prefix` for the test's topology, no CA for a plain amqp:// test
broker, and, where the venv's Python or the repository live under /root or
/home, `ProtectHome=tmpfs` with those paths bound back read-only.

Then computations sent through the broker, as any coordinator's, show the
executor's sandbox working under the unit, and probes check what the unit
itself promises: no listener on the host, the IP filter, one user per silo,
and `systemd-analyze security` of the running unit at 2.0 or lower.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.coordinator.errors import SiloExecutionError
from tests.conftest import delete_topology
from tests.security import private_systemd

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "flaap-mq-worker@.service"
DROP_IN = UNIT.parent / f"{UNIT.name}.d" / "broker.conf"
SILO_A = f"live-a-{uuid.uuid4().hex[:6]}"  # at most 22 characters: User=flaap-mq-%i
SILO_B = f"live-b-{uuid.uuid4().hex[:6]}"
DATASET = "dataset.txt"
OPT_IN = "FLAAP_MQ_TEST_LIVE_SYSTEMD"


def _unit(silo: str) -> str:
    return f"flaap-mq-worker@{silo}.service"


def _test_drop_in(broker_url: str, prefix: str) -> str:
    exec_start = next(
        line.partition("=")[2]
        for line in UNIT.read_text().splitlines()
        if line.startswith("ExecStart=")
    )
    lines = ["[Service]", "ExecStart=", f"ExecStart={exec_start} --prefix {prefix}"]
    parts = urllib.parse.urlsplit(broker_url.split(",")[0])
    if parts.scheme == "amqp":
        lines.append("Environment=FLAAP_MQ_CA_FILE=")  # broker.conf's CA is for amqps://
    address = ipaddress.ip_address(socket.gethostbyname(parts.hostname or "localhost"))
    if not address.is_loopback:
        lines.append(f"IPAddressAllow={address}")
    hidden = [Path(os.path.realpath(sys.executable)).parents[1], REPO]
    under_home = [p for p in hidden if p.parts[1:2] in (("root",), ("home",))]
    if under_home:
        lines.append("ProtectHome=tmpfs")
        lines += [f"BindReadOnlyPaths={p}" for p in under_home]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def manager(tmp_path_factory, request) -> Iterator[private_systemd.PrivateSystemd]:
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"set {OPT_IN}=1 to boot a private systemd and start the unit in it")
    reason = private_systemd.unavailable_reason()
    if reason:
        pytest.skip(f"cannot boot a private systemd here: {reason}")
    broker_url: str = request.getfixturevalue("broker_url")  # only once it will be used
    prefix = f"t{uuid.uuid4().hex[:10]}"
    units = {
        UNIT.name: UNIT.read_text(),
        f"{UNIT.name}.d/{DROP_IN.name}": DROP_IN.read_text(),
        f"{UNIT.name}.d/zz-test.conf": _test_drop_in(broker_url, prefix),
    }
    systemd = private_systemd.PrivateSystemd(tmp_path_factory.mktemp("systemd"), REPO)
    systemd.start(units)
    try:
        for silo in (SILO_A, SILO_B):
            systemd.write_file(f"/etc/flaap-mq/{silo}/broker-url", broker_url + "\n")
            systemd.run(["systemctl", "start", _unit(silo)])
        for silo in (SILO_A, SILO_B):
            _wait_for(systemd, silo, "worker_started")
            systemd.run(
                [
                    "sh",
                    "-c",
                    f"umask 022; echo 'data of {silo}' > /var/lib/flaap-mq/{silo}/{DATASET}",
                ]
            )
        systemd.prefix = prefix  # type: ignore[attr-defined]
        yield systemd
    finally:
        systemd.stop()
        delete_topology(broker_url, prefix)


def _journal(systemd: private_systemd.PrivateSystemd, silo: str) -> str:
    return systemd.run(
        ["journalctl", "--no-pager", "-o", "cat", "-u", _unit(silo)], check=False
    ).stdout


def _wait_for(systemd, silo: str, event: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if f'"event": "{event}"' in _journal(systemd, silo):
            return
        time.sleep(0.5)
    raise AssertionError(
        f"{_unit(silo)} never logged {event}; its journal:\n{_journal(systemd, silo)}"
    )


@pytest.fixture(scope="module")
def context(manager, broker_url: str) -> Iterator[flaap_mq.FederatedSilosContext]:
    with flaap_mq.create_execution_context(
        broker_url, [SILO_A], topology_prefix=manager.prefix, task_timeout=120
    ) as ctx:
        yield ctx


def _on_silo(context: object, fn) -> object:
    computation = tff.tensorflow.computation(fn)

    @tff.federated_computation
    def on_clients() -> object:
        return tff.federated_eval(computation, tff.CLIENTS)

    with tff.framework.get_context_stack().install(context):
        result = on_clients()
    result = result[0] if isinstance(result, list) else result
    return result.decode() if isinstance(result, bytes) else result


def test_the_worker_runs_its_executor_in_the_sandbox(manager):
    journal = _journal(manager, SILO_A)
    started = [line for line in journal.splitlines() if '"executor_service_started"' in line]
    assert started, journal
    assert '"network": "sandbox"' in started[-1]
    assert f"unix:/run/flaap-mq/{SILO_A}/" in started[-1]
    assert "executor_network_host" not in journal


def test_tensorflow_runs_under_the_unit(context):
    """oneDNN's Conv2D and a matmul, under the unit's seccomp filter and without W^X."""

    def kernels():
        conv = tf.nn.conv2d(tf.ones([2, 8, 8, 3]), tf.ones([3, 3, 3, 4]), 1, "SAME")
        return tf.reduce_sum(conv) + tf.reduce_sum(
            tf.linalg.matmul(tf.ones([64, 64]), tf.ones([64, 64]))
        )

    expected = (
        float(tf.reduce_sum(tf.nn.conv2d(tf.ones([2, 8, 8, 3]), tf.ones([3, 3, 3, 4]), 1, "SAME")))
        + 64.0**3
    )
    assert _on_silo(context, kernels) == pytest.approx(expected)


def test_a_computation_sees_its_own_sandbox_only(context, broker_url):
    environ = _on_silo(context, lambda: tf.io.read_file("/proc/self/environ"))
    password = urllib.parse.urlsplit(broker_url.split(",")[0]).password
    assert "PATH=" in environ and "FLAAP_MQ" not in environ
    assert not password or password not in environ
    processes = _on_silo(context, lambda: tf.size(tf.io.matching_files("/proc/[0-9]*")))
    assert processes == 1
    interfaces = _on_silo(context, lambda: tf.io.read_file("/proc/net/dev"))
    assert [line.split(":")[0].strip() for line in interfaces.splitlines()[2:]] == ["lo"]
    data = _on_silo(context, lambda: tf.io.read_file(f"/var/lib/flaap-mq/{SILO_A}/{DATASET}"))
    assert data == f"data of {SILO_A}\n"


@pytest.mark.parametrize(
    "path, error",
    [
        (f"/run/credentials/{_unit(SILO_A)}/broker-url", "No such file"),  # masked
        (f"/var/lib/flaap-mq/{SILO_B}/{DATASET}", "No such file"),  # another silo's
    ],
    ids=["credential", "other-silo-data"],  # stable ids: the paths hold random names
)
def test_a_computation_reads_no_credential_and_no_other_silo(context, path, error):
    with pytest.raises(SiloExecutionError, match=error):
        _on_silo(context, lambda: tf.io.read_file(path))


@pytest.mark.parametrize(
    "path",
    [f"/var/lib/flaap-mq/{SILO_A}/{DATASET}", f"/run/flaap-mq/{SILO_A}/x", "/tmp/x"],
    ids=["silo-data", "runtime-dir", "tmp"],
)
def test_a_computation_writes_nothing(context, path):
    def write():
        with tf.control_dependencies([tf.io.write_file(path, "written")]):
            return tf.constant(1)

    with pytest.raises(SiloExecutionError, match="Read-only file system"):
        _on_silo(context, write)


def _unit_pids(manager, silo: str) -> set[int]:
    procs = manager.host_cgroup(_unit(silo)) / "cgroup.procs"
    return {int(p) for p in procs.read_text().split()}


def test_no_process_of_the_unit_listens_on_the_host(manager, context):
    pids = _unit_pids(manager, SILO_A)
    assert len(pids) >= 3, "worker, sandbox relay and keeper, executor"
    listening = [
        c
        for c in psutil.net_connections("inet")
        if c.pid in pids and (c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM)
    ]
    assert listening == []


def test_each_silo_has_its_own_user_and_private_state(manager):
    uids = {}
    for silo in (SILO_A, SILO_B):
        # Every process of the unit, the executor in its user namespace included.
        (uids[silo],) = {psutil.Process(p).uids().real for p in _unit_pids(manager, silo)}
        state = manager.run(["stat", "-c", "%a %u", f"/var/lib/private/flaap-mq/{silo}"]).stdout
        assert state.split() == ["700", str(uids[silo])]
    assert uids[SILO_A] != uids[SILO_B]
    assert 0 not in uids.values()


_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


def _connect_from_unit(manager, host: str, port: int) -> str:
    """Connects from a process moved into the running unit's cgroup (its IP filter)."""
    unit_cgroup = manager.run(["systemctl", "show", "-p", "ControlGroup", "--value", _unit(SILO_A)])
    script = (
        f'echo $$ > "/sys/fs/cgroup{unit_cgroup.stdout.strip()}/cgroup.procs" && '
        f'exec /usr/bin/python3 -c "$0" {host} {port}'
    )
    return manager.run(["/bin/bash", "-c", script, _CONNECT]).stdout.strip()


def test_the_ip_filter_lets_the_unit_reach_localhost_and_nothing_unlisted(manager, broker_url):
    parts = urllib.parse.urlsplit(broker_url.split(",")[0])
    broker = socket.gethostbyname(parts.hostname or "localhost")
    assert _connect_from_unit(manager, broker, parts.port or 5672) == "connected"
    # An address of this host that is not loopback, with a listener that
    # answers anyone else: the unit may not reach it.
    own = next(
        (
            a.address
            for addresses in psutil.net_if_addrs().values()
            for a in addresses
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
        ),
        None,
    )
    if own is None:
        pytest.skip("this host has no non-loopback IPv4 address to probe the filter with")
    with socket.create_server((own, 0)) as listener:
        port = listener.getsockname()[1]
        socket.create_connection((own, port), timeout=3).close()  # reachable from outside the unit
        assert _connect_from_unit(manager, own, port) in ("TimeoutError", "PermissionError")


def test_systemd_analyze_rates_the_running_unit_at_most_2(manager):
    out = manager.run(["systemd-analyze", "security", "--no-pager", _unit(SILO_A)]).stdout
    line = next(x for x in out.splitlines() if "Overall exposure level" in x)
    print(f"\n{line.strip()}")
    assert float(re.search(r": (\d+\.\d+)", line).group(1)) <= 2.0, line


def test_stopping_the_unit_leaves_no_process(manager):
    pids = _unit_pids(manager, SILO_B)
    assert pids
    manager.run(["systemctl", "stop", _unit(SILO_B)])
    state = manager.run(["systemctl", "is-active", _unit(SILO_B)], check=False).stdout.strip()
    assert state in ("inactive", "failed")
    assert [p for p in pids if psutil.pid_exists(p)] == []
    journal = _journal(manager, SILO_B)
    assert '"event": "worker_stopped"' in journal, journal
