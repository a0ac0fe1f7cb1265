"""Running the rabbitmq-server tools with a hard timeout, and finding what they left running.

The Debian wrappers run the real tools through `su -c`, which puts them in a
new session, out of reach of a process-group kill; and a detached Erlang VM
outlives the command that started it. So every command started here carries
an environment variable with a fresh value (`run_bounded`), by which
`processes_with_env` finds everything it spawned, and `terminate` stops it.
Used by `flaap_mq.local.private_node`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)

# Every command `run_bounded` starts carries this variable, with a fresh value each time.
_RUN_MARKER = "FLAAP_MQ_RUN_ID"


def processes_with_env(name: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment has ``name=value`` (zombies have no environment)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(name) == value:
                found.append(proc)
    return found


def terminate(processes: Sequence[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever outlives ``grace`` seconds; bounded overall."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in processes:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _, processes = psutil.wait_procs(processes, timeout=grace)
        if not processes:
            return
    logger.warning("processes survived SIGKILL: %s", [p.pid for p in processes])


def run_bounded(
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
            terminate(processes_with_env(_RUN_MARKER, run_id), grace=2.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout or "", stderr or "")


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    """A finished command's stdout and stderr, stripped, for an error message."""
    return "\n".join(s.strip() for s in (result.stdout, result.stderr) if s and s.strip())


def find_tool(name: str) -> str:
    """The path of the rabbitmq-server tool `name`; `RuntimeError` if it is not installed."""
    # /usr/sbin is often missing from a non-login PATH.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise RuntimeError(f"{name} not found; install the rabbitmq-server OS package")
    return path


def clean_env() -> dict[str, str]:
    """This process's environment without any `RABBITMQ_*` variable."""
    # A private node must not pick up another node's settings from the caller's environment.
    return {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
