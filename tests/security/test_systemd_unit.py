"""deploy/systemd/flaap-mq-worker@.service passes `systemd-analyze verify` cleanly.

Needs Debian's systemd package (systemd-analyze); without it the test is
skipped and says so. It verifies the unit as installed under a scratch root
that holds the system's own units and a stand-in for the venv's `flaap-mq`,
so that the check is about the unit, not about this machine.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "flaap-mq-worker@.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


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


def _verify(tool: str, root: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    installed = root / "etc" / "systemd" / "system" / UNIT.name
    installed.parent.mkdir(parents=True, exist_ok=True)
    installed.write_text(unit_text)
    return subprocess.run(
        [tool, "verify", f"--root={root}", str(installed)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    # What ExecStart names, as `make install` in /opt/flaap-mq leaves it.
    executable = tmp_path / "opt" / "flaap-mq" / ".venv" / "bin" / "flaap-mq"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    shutil.copytree(SYSTEM_UNITS, tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True)
    return tmp_path


def test_worker_unit_verifies_without_a_warning(systemd_analyze, root):
    result = _verify(systemd_analyze, root, UNIT.read_text())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def test_worker_unit_has_what_the_issue_asks(systemd_analyze):
    text = UNIT.read_text()
    for line in [
        "EnvironmentFile=/etc/flaap-mq/%i.env",
        "Environment=FLAAP_MQ_SILO_ID=%i",
        "Restart=always",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "User=flaap-mq",
    ]:
        assert f"\n{line}\n" in text, f"{UNIT.name} lacks {line}"


def test_verify_would_catch_a_broken_unit(systemd_analyze, root):
    """The check above is real: a typo in the unit makes systemd-analyze speak."""
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe")
    result = _verify(systemd_analyze, root, broken)
    assert "Failed to parse boolean value" in result.stderr
