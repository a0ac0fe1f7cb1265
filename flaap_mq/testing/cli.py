"""Runs the `flaap-mq` command line in a subprocess, as an operator would.

Commands that never load TensorFlow (`_FORKED_COMMANDS`) run in a process
forked from a helper that has already imported flaap-mq's command line: the
imports (pika, structlog, gRPC: a quarter of a second) were most of what such
a run cost, and the security tests run these commands some two hundred
times. Each run is still a process of its own, with its own arguments,
environment, working directory, standard streams and exit status; Python
then exits it as it exits `python -m flaap_mq.cli` (a `SystemExit`, or an
uncaught exception's traceback and status 1; `atexit` handlers; threads
joined). Anything whose start-up Python reads from the environment (a
`PYTHON*` or locale variable) differs from the helper's gets a fresh
interpreter instead, as do the commands that load TensorFlow.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

# Commands whose code never imports TensorFlow (`flaap_mq.cli.main`).
_FORKED_COMMANDS = frozenset({"topology", "status", "worker", "admin", "dead-letters"})
# Read by the interpreter (or the C library) when it starts, not later.
_STARTUP_PREFIXES = ("PYTHON", "LC_", "LANG", "LD_")

# The helper: imports the command line and what `main` imports for the
# commands above, then forks once per request; the child leaves the loop and
# becomes `python -m flaap_mq.cli ARGS` (sys.exit(main()) as its last line).
_HELPER = """
import json, os, sys

import flaap_mq.cli
import flaap_mq.admin.definitions, flaap_mq.admin.housekeeping, flaap_mq.admin.status
import flaap_mq.admin.topology_cli, flaap_mq.broker.link, flaap_mq.executor
import flaap_mq.worker.worker


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    raise SystemExit(0)


request = serve()
for fd, opened in (
    (0, os.open(os.devnull, os.O_RDONLY)),
    (1, os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)),
    (2, os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)),
):
    os.dup2(opened, fd)
    os.close(opened)
if request["cwd"] is not None:
    os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
sys.argv = [flaap_mq.cli.__file__, *request["args"]]
sys.exit(flaap_mq.cli.main(request["args"]))
"""


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """`flaap-mq ARGS` with this interpreter; `env` defaults to this process's."""
    run_env = dict(os.environ if env is None else env)
    if args and args[0] in _FORKED_COMMANDS:
        helper = _Helper.get()
        if helper.can_run(run_env):
            return helper.run(list(args), run_env, cwd, timeout)
    return subprocess.run(
        [sys.executable, "-m", "flaap_mq.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=run_env,
        check=False,
    )


def _startup_settings(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_STARTUP_PREFIXES)}


def _text(data: bytes) -> str:
    """As `subprocess.run(text=True)` decodes: the locale's encoding, universal newlines."""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _Helper:
    """One forking helper per test process, started on first use."""

    _instance: _Helper | None = None
    _starting = threading.Lock()

    @classmethod
    def get(cls) -> _Helper:
        with cls._starting:
            if cls._instance is None or cls._instance._process.poll() is not None:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        self._env = dict(os.environ)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _HELPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
        )
        self._received = b""
        self._outputs = tempfile.mkdtemp(prefix="flaap-cli-")
        self._lock = threading.Lock()
        atexit.register(self.close)

    def can_run(self, env: Mapping[str, str]) -> bool:
        return _startup_settings(env) == _startup_settings(self._env)

    def run(
        self, args: list[str], env: dict[str, str], cwd: Path | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        stdout_path = os.path.join(self._outputs, "stdout")
        stderr_path = os.path.join(self._outputs, "stderr")
        request = {
            "args": args,
            "env": env,
            "cwd": None if cwd is None else str(cwd),
            "stdout": stdout_path,
            "stderr": stderr_path,
        }
        with self._lock:
            self._process.stdin.write(json.dumps(request).encode() + b"\n")
            self._process.stdin.flush()
            pid = self._reply(None)["pid"]
            try:
                returncode = self._reply(timeout)["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)  # as subprocess.run does; the helper reaps it
                self._reply(None)
                raise subprocess.TimeoutExpired(
                    ["flaap-mq", *args],
                    timeout,
                    _text(Path(stdout_path).read_bytes()),
                    _text(Path(stderr_path).read_bytes()),
                ) from None
            stdout = _text(Path(stdout_path).read_bytes())
            stderr = _text(Path(stderr_path).read_bytes())
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "flaap_mq.cli", *args], returncode, stdout, stderr
        )

    def _reply(self, timeout: float | None) -> dict:
        """The helper's next line; read unbuffered, so that `select` sees what is left."""
        fd = self._process.stdout.fileno()
        while b"\n" not in self._received:
            if timeout is not None and not select.select([fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired("flaap-mq", timeout)
            data = os.read(fd, 4096)
            if not data:
                raise RuntimeError(f"the flaap-mq helper exited ({self._process.poll()})")
            self._received += data
        line, self._received = self._received.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()
        shutil.rmtree(self._outputs, ignore_errors=True)
