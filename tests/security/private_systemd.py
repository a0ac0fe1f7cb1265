"""A real systemd, booted as PID 1 of private namespaces, for hosts whose PID 1 is not systemd.

Containers and CI machines often run without systemd, so `systemctl` and
`systemd-run` have no manager to talk to. As root with CAP_SYS_ADMIN and a
writable cgroup2 hierarchy, this module boots the host's own
`/lib/systemd/systemd` in new PID, mount, cgroup, UTS and IPC namespaces,
where units start exactly as on a systemd host: the same namespaces,
seccomp filters, credentials, dynamic users and cgroup BPF IP filters. The
network namespace stays the host's, so a unit reaches the same broker.

Nothing of the host is changed but one cgroup, removed by `stop()`:

* the unit search path ($SYSTEMD_UNIT_PATH) holds only the units given plus
  empty stand-ins for the targets services depend on, so no sysinit work
  runs (systemd-tmpfiles would empty the host's /tmp, systemd-sysctl set
  the host's kernel parameters);
* /etc, /var and /opt are overlays whose changes land in `workdir`; /run and
  /tmp are private tmpfs;
* the repository is bound at /opt/flaap-mq, where the shipped unit expects it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
HOST_UNITS = Path("/usr/lib/systemd/system")
# Host units the private manager needs: a journal to read, a bus for systemd-analyze.
COPIED_UNITS = (
    "dbus.service",
    "dbus.socket",
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
STAND_IN_TARGETS = (
    "sysinit",
    "basic",
    "shutdown",
    "network",
    "network-online",
    "multi-user",
    "sockets",
    "paths",
    "timers",
)

_BOOT = r"""
set -euo pipefail
for d in etc var opt; do
  mkdir -p "$WORKDIR/overlay/$d/upper" "$WORKDIR/overlay/$d/work"
  mount -t overlay overlay \
    -o "lowerdir=/$d,upperdir=$WORKDIR/overlay/$d/upper,workdir=$WORKDIR/overlay/$d/work" "/$d"
done
mount -t proc proc /proc
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/flaap-units /opt/flaap-mq
cp -a "$WORKDIR/units/." /run/flaap-units/
mount --bind "$REPO" /opt/flaap-mq
mount -t tmpfs -o mode=1777 tmpfs /tmp  # last: $WORKDIR may be under /tmp
# systemd skips this in a container; credentials (LoadCredential=) need /run shared.
mount --make-rshared /
hostname flaap-private-systemd
export container=flaap-test SYSTEMD_UNIT_PATH=/run/flaap-units
exec "$SYSTEMD" --system --unit=flaap-test.target --log-target=journal-or-kmsg --log-level=info
"""


def unavailable_reason() -> str | None:
    """Why a private systemd cannot be booted here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN) to create the namespaces and mounts"
    for tool in ("unshare", "nsenter", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} not found (util-linux / systemd packages)"
    if not SYSTEMD.is_file():
        return f"{SYSTEMD} not found: install Debian's systemd package"
    try:
        pid1 = Path("/proc/1/comm").read_text().strip()
    except OSError:
        pid1 = "?"
    if pid1 == "systemd":
        return (
            "PID 1 is systemd: run the unit with the host's own manager instead "
            "(systemctl link, or systemd-run -p ...); this harness is for hosts without one"
        )
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    if _cgroup2_dir() is None:
        return "no writable cgroup2 hierarchy (needed for the manager and its IP filters)"
    return None


def _cgroup2_dir() -> Path | None:
    """This process's own directory in a writable cgroup2 hierarchy."""
    mount = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            mount = Path(left.split()[4])
            break
    if mount is None:
        return None
    own = next(
        (x[3:] for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::")),
        None,
    )
    if own is None:
        return None
    directory = mount / own.lstrip("/")
    return directory if os.access(directory, os.W_OK) else None


class PrivateSystemd:
    """Boots, drives and stops one private systemd; see the module docstring."""

    def __init__(self, workdir: Path, repo: Path) -> None:
        self.workdir = workdir
        self.repo = repo
        parent = _cgroup2_dir()
        if parent is None:
            raise RuntimeError("no writable cgroup2 hierarchy")
        self.cgroup = parent / f"flaap-private-systemd-{uuid.uuid4().hex[:8]}"
        self._process: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None  # the manager, as this (the host's) PID namespace sees it

    def start(self, units: dict[str, str], timeout_s: float = 60.0) -> None:
        """Boots with these units (name -> text; 'x.service.d/y.conf' for drop-ins)."""
        unit_dir = self.workdir / "units"
        unit_dir.mkdir(parents=True)
        for name in COPIED_UNITS:
            shutil.copy(HOST_UNITS / name, unit_dir / name)
        for name in STAND_IN_TARGETS:
            (unit_dir / f"{name}.target").write_text(f"[Unit]\nDescription={name} (stand-in)\n")
        wants = " ".join(COPIED_UNITS)
        (unit_dir / "flaap-test.target").write_text(f"[Unit]\nDescription=test\nWants={wants}\n")
        for name, text in units.items():
            (unit_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (unit_dir / name).write_text(text)
        script = self.workdir / "boot.sh"
        script.write_text(_BOOT)
        self.cgroup.mkdir()
        log = open(self.workdir / "boot.log", "wb")  # noqa: SIM115 (the child keeps it)
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "WORKDIR": str(self.workdir),
            "REPO": str(self.repo),
            "SYSTEMD": str(SYSTEMD),
        }
        # The shell joins the new cgroup first, so the manager's cgroup
        # namespace (and everything it starts) is rooted there.
        self._process = subprocess.Popen(
            [
                "/bin/bash",
                "-c",
                f'echo $$ > "{self.cgroup}/cgroup.procs" && exec unshare --pid --fork '
                f'--mount --cgroup --uts --ipc --propagation private /bin/bash "{script}"',
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pid1 = self._find_manager()
            if self.pid1 is not None:
                state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if self._process.poll() is not None:
                break
            time.sleep(0.2)
        boot_log = (self.workdir / "boot.log").read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"the private systemd did not come up; its output:\n{boot_log}")

    def _find_manager(self) -> int | None:
        assert self._process is not None
        try:
            children = Path(f"/proc/{self._process.pid}/task/{self._process.pid}/children")
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def run(
        self, argv: list[str], *, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Runs `argv` as root inside the manager's namespaces."""
        assert self.pid1 is not None, "not started"
        command = ["nsenter", "-t", str(self.pid1), "-m", "-p", "-u", "-i", "-C", *argv]
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{argv} exited {result.returncode}: {result.stderr[-2000:]}")
        return result

    def write_file(self, path: str, text: str, mode: str = "0600") -> None:
        """A root-owned file inside the manager's (overlaid) file system."""
        self.run(
            ["sh", "-c", f'install -d -m 0700 "$(dirname "{path}")" && umask 077 && cat > "{path}" '
             f'&& chmod {mode} "{path}"'],
            input=text,
        )  # fmt: skip

    def host_cgroup(self, unit: str) -> Path:
        """The unit's cgroup directory, as the host sees it."""
        inside = self.run(["systemctl", "show", "-p", "ControlGroup", "--value", unit]).stdout
        return self.cgroup / inside.strip().lstrip("/")

    def stop(self) -> None:
        """Kills the manager and everything it started; removes the cgroup."""
        if self.pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)  # the kernel kills its whole PID namespace
            self.pid1 = None
        if self._process is not None:
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
            self._process = None
        deadline = time.monotonic() + 30
        while self.cgroup.exists() and time.monotonic() < deadline:
            for directory in sorted(self.cgroup.rglob("*"), key=lambda p: -len(p.parts)):
                if directory.is_dir():
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            try:
                self.cgroup.rmdir()
            except OSError:
                time.sleep(0.2)
