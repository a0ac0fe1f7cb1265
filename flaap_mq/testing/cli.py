"""Runs the `flaap-mq` command line in a subprocess, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """`flaap-mq ARGS` with this interpreter; `env` defaults to this process's."""
    return subprocess.run(
        [sys.executable, "-m", "flaap_mq.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=dict(os.environ if env is None else env),
        check=False,
    )
