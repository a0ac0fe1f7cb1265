"""The executor's sandbox, run as `python -I -S flaap_mq/executor/inside CONFIG_JSON`.

`flaap_mq.executor.service` starts this program; it becomes three processes:

    relay             new user, network, mount and IPC namespaces. Listens on
                      two Unix sockets and joins each connection to the
                      executor's port on the namespace's own loopback: by
                      handing out a connected socket, or by relaying bytes
                      (`relay.py`).
      keeper          waits for the executor and exits with its status (a
                      process that unshares its PID namespace can start no
                      threads, so the relay cannot be the one).
        worker_binary TFF's executor: PID 1 of a new PID namespace with its
                      own /proc. When it exits the kernel kills whatever it
                      started.

Nothing in the host's network namespace listens, and no process outside
this tree shares the executor's loopback. Every mount is read-only to the
executor (the silo's data directory included), the worker's credential files
read as empty, its /proc shows no process but its own, and it may not create
Unix sockets (seccomp), so no service of the host listening on one is in reach. Each process dies
with its parent (PR_SET_PDEATHSIG), so nothing outlives the worker however it
dies.

With `"mode": "host"` (`--executor-network=host`) it only makes sure the
executor dies with its owner, and becomes the executor.

The status pipe (CONFIG["status_fd"]) gets `ready` once the executor accepts
connections, or `error: ...` with a reason an operator can act on. This
program imports only the standard library (`-I -S`: no site-packages, no
environment variables of Python's), so it starts in milliseconds and trusts
nothing installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import IO

import namespaces  # type: ignore[import-not-found]  # this directory is sys.path[0]
import relay  # type: ignore[import-not-found]

EXIT_SANDBOX_FAILED = 3


def _reason(error: BaseException) -> str:
    if isinstance(error, namespaces.SandboxError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _bind_socket(path: str) -> socket.socket:
    """The Unix socket the worker connects to, mode 0600 from its creation."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    return listener


def _keep(config: dict, status: IO[str], relay_pid: int) -> None:
    """The keeper: start the executor as PID 1 of a new PID namespace; exit with it."""
    namespaces.die_with_parent(signal.SIGKILL)
    if os.getppid() != relay_pid:  # the relay died before the line above
        os._exit(1)
    namespaces.enter_pid_namespace()
    executor = os.fork()
    if executor == 0:
        try:
            # PID 1's parent is outside its namespace: getppid() says 0, so
            # the keeper's death before this line cannot be checked here.
            namespaces.die_with_parent(signal.SIGKILL)
            namespaces.mount_proc()
            namespaces.refuse_unix_sockets()
            namespaces.drop_capabilities()
            status.close()  # the executor inherits no descriptor of ours
            _exec_executor(config)
        except BaseException as e:
            with contextlib.suppress(Exception):
                status.write(f"error: {_reason(e)}\n")
                status.flush()
            os._exit(EXIT_SANDBOX_FAILED)
    status.close()
    # PID 1 ignores signals it has no handler for, SIGKILL apart; killed
    # here, it is reaped here too, and the relay then reaps the keeper.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(executor, signal.SIGKILL))
    _, wait_status = os.waitpid(executor, 0)
    os._exit(os.waitstatus_to_exitcode(wait_status) & 0xFF)


def _wait_for_executor(port: int, keeper: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.waitpid(keeper, os.WNOHANG) != (0, 0):
            raise namespaces.SandboxError("TFF's executor exited while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise namespaces.SandboxError(f"TFF's executor did not listen within {timeout_s:.0f} s")


def _exec_executor(config: dict) -> None:
    """Becomes TFF's executor, in the data directory, with this (minimal) environment."""
    os.chdir(config["data_dir"] or "/")
    binary = config["binary"]
    os.execve(binary, [binary, *config["args"]], dict(os.environ))


def main() -> int:
    config = json.loads(sys.argv[1])
    # Here rather than in the owner's fork: Popen's preexec_fn is not safe
    # in a process with threads, and both owners have them.
    namespaces.die_with_parent(signal.SIGKILL)
    if os.getppid() != config["parent_pid"]:
        return EXIT_SANDBOX_FAILED  # the owner died before the line above
    if config["mode"] == "host":  # --executor-network=host: no sandbox
        _exec_executor(config)
    status = os.fdopen(config["status_fd"], "w")
    keeper = 0
    try:
        namespaces.enter_namespaces()
        namespaces.bring_up_loopback()
        # Bound before the file system is sealed: its directory is read-only after.
        listener = _bind_socket(config["socket"])
        handoff = _bind_socket(config["handoff_socket"])
        namespaces.seal_filesystem(config["hidden"])
        namespaces.check_read_only(config["data_dir"] or "/")
        relay_pid = os.getpid()
        keeper = os.fork()
        if keeper == 0:
            try:
                _keep(config, status, relay_pid)
            except BaseException as e:
                status.write(f"error: {_reason(e)}\n")
                status.flush()
            os._exit(EXIT_SANDBOX_FAILED)
        signal.signal(signal.SIGTERM, lambda *_: os.kill(keeper, signal.SIGTERM))
        _wait_for_executor(config["port"], keeper, config["startup_timeout_s"])
    except Exception as e:  # whatever it is, the worker must hear it, not hang
        status.write(f"error: {_reason(e)}\n")
        status.close()
        if keeper:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(keeper, signal.SIGKILL)
                os.waitpid(keeper, 0)
        return EXIT_SANDBOX_FAILED
    threading.Thread(target=relay.serve, args=(listener, config["port"]), daemon=True).start()
    threading.Thread(target=relay.hand_out, args=(handoff, config["port"]), daemon=True).start()
    status.write("ready\n")
    status.close()
    _, wait_status = os.waitpid(keeper, 0)
    return os.waitstatus_to_exitcode(wait_status) & 0xFF


if __name__ == "__main__":
    sys.exit(main())
