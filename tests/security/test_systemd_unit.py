"""deploy/systemd/flaap-mq-worker@.service: verifies, scores 2.0 or lower, lets the sandbox be.

Needs Debian's systemd package (systemd-analyze; `security --offline` needs
systemd 250 or newer); without it a test is skipped and says so. The unit is
checked as installed under a scratch root that holds the system's own units
and a stand-in for the venv's `flaap-mq`, so that the check is about the
unit, not about this machine; with and without the site drop-in
(flaap-mq-worker@.service.d/broker.conf) an operator fills in.

That the unit really runs the worker, its sandbox and TensorFlow under these
settings is tested by booting it: test_systemd_unit_live.py.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "flaap-mq-worker@.service"
DROP_IN = UNIT.parent / f"{UNIT.name}.d" / "broker.conf"
NAMESPACES_PY = REPO / "flaap_mq" / "executor" / "inside" / "namespaces.py"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
INSTANCE = "flaap-mq-worker@hospital-a.service"
MAX_EXPOSURE = 2.0
# What the executor's sandbox (flaap_mq/executor/inside) calls; the unit's
# system call filter must let every one through.
SANDBOX_SYSCALLS = {
    "unshare", "mount", "umount2", "ioctl", "prctl", "socket", "bind", "listen",
    "accept4", "connect", "clone", "clone3", "execve", "wait4", "waitid", "pipe2",
}  # fmt: skip
CLONE_FLAG_TO_NAMESPACE = {
    "CLONE_NEWUSER": "user",
    "CLONE_NEWNET": "net",
    "CLONE_NEWNS": "mnt",
    "CLONE_NEWPID": "pid",
    "CLONE_NEWIPC": "ipc",
    "CLONE_NEWUTS": "uts",
    "CLONE_NEWCGROUP": "cgroup",
}


def _settings(text: str) -> list[tuple[str, str]]:
    """(key, value) of every assignment in the unit text, in order."""
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def _values(key: str, text: str | None = None) -> list[str]:
    return [v for k, v in _settings(UNIT.read_text() if text is None else text) if k == key]


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip(
            "systemd-analyze not found: install Debian's systemd package "
            "(apt-get install -y systemd) to verify the worker's unit"
        )
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} not found: systemd's own units are needed to verify")
    return tool


@pytest.fixture(scope="module")
def systemd_version(systemd_analyze: str) -> int:
    out = subprocess.run(
        [systemd_analyze, "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.match(r"systemd (\d+)", out)
    if not match:
        pytest.skip(f"cannot tell systemd's version from {out[:80]!r}")
    return int(match.group(1))


def _install(root: Path, unit_text: str, drop_in: str | None = None) -> Path:
    installed = root / "etc" / "systemd" / "system" / UNIT.name
    installed.parent.mkdir(parents=True, exist_ok=True)
    installed.write_text(unit_text)
    directory = installed.parent / f"{UNIT.name}.d"
    shutil.rmtree(directory, ignore_errors=True)
    if drop_in is not None:
        directory.mkdir()
        (directory / DROP_IN.name).write_text(drop_in)
    return installed


def _verify(tool: str, root: Path, unit_text: str, drop_in: str | None = None):
    installed = _install(root, unit_text, drop_in)
    return subprocess.run(
        [tool, "verify", f"--root={root}", str(installed)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _exposure(tool: str, root: Path, drop_in: str | None) -> tuple[float, str]:
    _install(root, UNIT.read_text(), drop_in)
    result = subprocess.run(
        [tool, "security", "--offline=yes", f"--root={root}", "--no-pager", INSTANCE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = next((x for x in result.stdout.splitlines() if "Overall exposure level" in x), "")
    match = re.search(r"exposure level for \S+: (\d+\.\d+)", line)
    assert match, f"no exposure level in: {result.stdout[-500:]} {result.stderr}"
    return float(match.group(1)), line.strip()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    # What ExecStart names, as `make install` in /opt/flaap-mq leaves it.
    executable = tmp_path / "opt" / "flaap-mq" / ".venv" / "bin" / "flaap-mq"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    shutil.copytree(SYSTEM_UNITS, tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True)
    return tmp_path


@pytest.mark.parametrize("with_drop_in", [False, True], ids=["unit", "unit+broker.conf"])
def test_worker_unit_verifies_without_a_warning(systemd_analyze, root, with_drop_in):
    drop_in = DROP_IN.read_text() if with_drop_in else None
    result = _verify(systemd_analyze, root, UNIT.read_text(), drop_in)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("with_drop_in", [False, True], ids=["unit", "unit+broker.conf"])
def test_exposure_is_at_most_2(systemd_analyze, systemd_version, root, with_drop_in):
    if systemd_version < 250:
        pytest.skip(f"systemd {systemd_version}: `security --offline` needs systemd 250 or newer")
    drop_in = DROP_IN.read_text() if with_drop_in else None
    exposure, line = _exposure(systemd_analyze, root, drop_in)
    print(f"\n{line}")
    assert exposure <= MAX_EXPOSURE, line


def test_verify_would_catch_a_broken_unit(systemd_analyze, root):
    """The check above is real: a typo in the unit makes systemd-analyze speak."""
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe")
    result = _verify(systemd_analyze, root, broken)
    assert "Failed to parse boolean value" in result.stderr


def test_worker_unit_has_what_the_issue_asks():
    text = UNIT.read_text()
    for line in [
        "DynamicUser=yes",
        "User=flaap-mq-%i",  # one user per silo: DynamicUser alone shares one per template
        "LoadCredential=broker-url:/etc/flaap-mq/%i/broker-url",
        "Environment=FLAAP_MQ_BROKER_URL_FILE=%d/broker-url",
        "Environment=FLAAP_MQ_SILO_ID=%i",
        "StateDirectory=flaap-mq/%i",
        "StateDirectoryMode=0700",
        "RuntimeDirectory=flaap-mq/%i",
        "Restart=always",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "IPAddressDeny=any",
        "IPAddressAllow=localhost",
    ]:
        assert f"\n{line}\n" in text, f"{UNIT.name} lacks {line}"


def test_no_secret_reaches_the_worker_but_by_credential():
    text = UNIT.read_text()
    settings = _settings(text)
    keys = {k for k, _ in settings}
    assert "EnvironmentFile" not in keys, "an environment file invites a password into it"
    for key, value in settings:
        if key == "Environment":
            assert "BROKER_URL=" not in value and "PASS" not in value.upper(), value
    exec_start = " ".join(_values("ExecStart"))
    for flag in ("--broker-url ", "--broker-url=", "--key-file", "amqp"):
        assert flag not in exec_start, f"ExecStart carries {flag!r}: argv is public"
    assert "--executor-network" not in exec_start, "the insecure escape hatch is not for the unit"


def test_the_drop_in_only_adds_addresses_and_files():
    settings = _settings(DROP_IN.read_text())
    allowed = [v for k, v in settings if k == "IPAddressAllow"]
    assert allowed, "broker.conf names the broker's address"
    for value in allowed:
        assert not {"any", "link-local", "0.0.0.0/0", "::/0"} & set(value.split()), value
    assert not [k for k, _ in settings if k in ("IPAddressDeny", "EnvironmentFile", "ExecStart")]
    for key, value in settings:
        if key == "Environment":
            assert "BROKER_URL=" not in value and "PASS" not in value.upper(), value


def test_unit_allows_exactly_the_namespaces_the_sandbox_makes():
    if not NAMESPACES_PY.is_file():
        pytest.skip(f"{NAMESPACES_PY} not found: no executor sandbox to compare with")
    used = {
        node.id
        for node in ast.walk(ast.parse(NAMESPACES_PY.read_text()))
        if isinstance(node, ast.Name)
        and isinstance(node.ctx, ast.Load)
        and node.id in CLONE_FLAG_TO_NAMESPACE
    }
    needed = {CLONE_FLAG_TO_NAMESPACE[flag] for flag in used}
    allowed = set(" ".join(_values("RestrictNamespaces")).split())
    assert needed, "the sandbox creates no namespace?"
    assert needed <= allowed, f"the sandbox needs {sorted(needed - allowed)} too"
    assert allowed <= needed, f"the unit allows {sorted(allowed - needed)}, which nothing uses"


def test_unit_keeps_what_the_sandbox_needs_and_sets_nothing_that_breaks_it():
    families = set(" ".join(_values("RestrictAddressFamilies")).split())
    assert {"AF_UNIX", "AF_INET"} <= families  # the executor's socket; the loopback ioctl
    text = UNIT.read_text()
    # PrivateNetwork would cut the worker off its broker; the executor's
    # network namespace is the worker's to make. MemoryDenyWriteExecute breaks
    # oneDNN (measured: Conv2D fails); RestrictNamespaces=yes forbids the sandbox.
    for forbidden in ("PrivateNetwork=yes", "MemoryDenyWriteExecute=yes", "RestrictNamespaces=yes"):
        assert f"\n{forbidden}\n" not in text, forbidden
    assert _values("ProcSubset") == ["pid"], "ProcSubset=pid: nothing over /proc to lock"


def _syscall_group(tool: str, name: str, cache: dict[str, set[str]]) -> set[str]:
    if name not in cache:
        out = subprocess.run(
            [tool, "syscall-filter", name], capture_output=True, text=True, check=True
        ).stdout
        members: set[str] = set()
        for line in out.splitlines()[1:]:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry.startswith("@"):
                members |= _syscall_group(tool, entry, cache)
            else:
                members.add(entry)
        cache[name] = members
    return cache[name]


def test_system_call_filter_lets_the_sandbox_through(systemd_analyze):
    """The filter as systemd applies it: the allow list, then each ~deny list removed."""
    cache: dict[str, set[str]] = {}

    def expand(words: list[str]) -> set[str]:
        out: set[str] = set()
        for word in words:
            out |= _syscall_group(systemd_analyze, word, cache) if word.startswith("@") else {word}
        return out

    allowed: set[str] = set()
    for value in _values("SystemCallFilter"):
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    missing = SANDBOX_SYSCALLS - allowed
    assert not missing, f"the unit's system call filter blocks {sorted(missing)}"
    for dangerous in ("pivot_root", "setuid", "init_module", "kexec_load", "reboot", "bpf"):
        assert dangerous not in allowed, dangerous
