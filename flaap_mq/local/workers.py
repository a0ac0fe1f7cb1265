"""Silo workers as real subprocesses, for the demo, the tests and the benchmarks.

`WorkerFleet` starts `flaap-mq worker` processes exactly as an operator
would (one per silo), waits until each consumes its queue, and stops them
the way systemd does (SIGTERM, then SIGKILL after a grace period). It owns
them: whatever happens, `close()` leaves none running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import pika
import pika.exceptions
import psutil

from flaap_mq.protocol import topology


def queue_consumers(broker_url: str, queue: str) -> int | None:
    """Consumers of `queue`, or None if it does not exist yet."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url.split(",")[0]))
    try:
        channel = connection.channel()
        try:
            return channel.queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return None
    finally:
        if connection.is_open:
            connection.close()


SANDBOX_PROGRAM = "flaap_mq/executor/inside"


def worker_binaries_of(pid: int) -> list[psutil.Process]:
    """`worker_binary` processes below `pid` (executors a worker started)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if _is_worker_binary(c)]


def all_executor_processes() -> list[psutil.Process]:
    """Every `worker_binary` on this machine, and every sandbox process around one."""
    return [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if _is_worker_binary(p) or _is_sandbox(p)
    ]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _is_worker_binary(process: psutil.Process) -> bool:
    return any("worker_binary" in part for part in _cmdline(process)[:1])


def _is_sandbox(process: psutil.Process) -> bool:
    """The executor sandbox's relay or keeper (`python -I -S .../executor/inside`)."""
    return any(part.endswith(SANDBOX_PROGRAM) for part in _cmdline(process)[:5])


CLI_PROGRAM = (sys.executable, "-m", "flaap_mq.cli")


class WorkerProcess:
    """One `flaap-mq worker` subprocess.

    With `own_process_group` it leads a process group of its own, as a
    command started from a terminal does, so that `interrupt` can signal that
    whole group the way Ctrl-C does without reaching the caller. `program`
    runs the `flaap-mq` command line: `python -m flaap_mq.cli` by default, or
    a program that calls `flaap_mq.cli.main` with the arguments it is given.
    """

    def __init__(
        self,
        broker_url: str,
        silo_id: str,
        *,
        prefix: str,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        own_process_group: bool = False,
        program: Sequence[str] | None = None,
    ) -> None:
        self.silo_id = silo_id
        self.broker_url = broker_url
        self.prefix = prefix
        self.log_path = log_path
        args = [
            *(program or CLI_PROGRAM),
            "worker",
            "--silo-id",
            silo_id,
            "--prefix",
            prefix,
            "--log-format",
            "json",
            *extra_args,
        ]
        run_env = {**os.environ, **(env or {}), "FLAAP_MQ_BROKER_URL": broker_url}
        if not (env or {}).get("FLAAP_MQ_BROKER_URL_FILE"):
            # An inherited URL file would win over broker_url (resolve_broker_url).
            run_env.pop("FLAAP_MQ_BROKER_URL_FILE", None)
        self._log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            args,
            env=run_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            process_group=0 if own_process_group else None,
        )
        self._own_process_group = own_process_group

    @property
    def pid(self) -> int:
        return self.process.pid

    def executor_pids(self) -> list[int]:
        return [p.pid for p in worker_binaries_of(self.pid)]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def task_events(
        self,
        at_least: int = 0,
        timeout_s: float = 30.0,
        task_ids: Collection[str] | None = None,
    ) -> list[dict]:
        """The `task` events in the worker's JSON log (of `task_ids` only, if
        given), once `at_least` are there.

        The worker logs a task after settling it, so its reply can reach the
        coordinator before the line is written: a caller that knows how many
        tasks it sent waits for that many instead of reading too early.
        Raises TimeoutError if they are not all logged within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.log_text()
            complete = text[: text.rfind("\n") + 1]  # not a line still being written
            events = [
                event
                for event in (json.loads(line) for line in complete.splitlines() if line[:1] == "{")
                if event.get("event") == "task"
                and (task_ids is None or event.get("task_id") in task_ids)
            ]
            if len(events) >= at_least:
                return events
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"worker {self.silo_id} logged {len(events)} tasks in {timeout_s:.0f} s,"
                    f" not the {at_least} it was sent"
                )
            time.sleep(0.05)

    def stop(self, grace_s: float = 30.0) -> int:
        """SIGTERM, as systemd does; SIGKILL if it has not exited in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_log()
        return self.process.returncode

    def interrupt(self) -> None:
        """SIGINT to the worker's whole process group, as a terminal's Ctrl-C.

        Needs `own_process_group`: the group would otherwise be the caller's.
        """
        if not self._own_process_group:
            raise RuntimeError("interrupt() needs a worker started with own_process_group=True")
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL: a crash. The executor dies with it (PDEATHSIG)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file not in (None, subprocess.DEVNULL):
            self._log_file.close()
            self._log_file = subprocess.DEVNULL


class WorkerFleet:
    """Workers for several silos; a context manager that always stops them."""

    def __init__(
        self,
        broker_url: str,
        silo_ids: Sequence[str],
        *,
        prefix: str = "flaap",
        log_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        per_silo_args: Mapping[str, Sequence[str]] | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 120.0,
        program: Sequence[str] | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.prefix = prefix
        self.silo_ids = list(silo_ids)
        self._log_dir = log_dir
        self._extra_args = list(extra_args)
        self._per_silo_args = {silo: list(args) for silo, args in (per_silo_args or {}).items()}
        self._env = dict(env or {})
        self._start_timeout_s = start_timeout_s
        self._program = program
        self.workers: dict[str, WorkerProcess] = {}
        self.exit_codes: dict[str, int] = {}

    def start(self) -> WorkerFleet:
        try:
            for silo_id in self.silo_ids:
                self.start_worker(silo_id, wait=False)
            self.wait_consuming(self.silo_ids)
        except BaseException:
            self.close()
            raise
        return self

    def start_worker(self, silo_id: str, *, wait: bool = True) -> WorkerProcess:
        """Starts silo `silo_id`'s worker; one whose worker still runs is refused.

        (Starting another would leave the first running with nothing to stop it.)
        """
        running = self.workers.get(silo_id)
        if running is not None and running.process.poll() is None:
            raise RuntimeError(
                f"silo {silo_id!r} already has a running worker (pid {running.pid}); "
                "stop it first, or use the fleet that started it"
            )
        log_path = self._log_dir / f"worker-{silo_id}.log" if self._log_dir else None
        worker = WorkerProcess(
            self.broker_url,
            silo_id,
            prefix=self.prefix,
            extra_args=[*self._extra_args, *self._per_silo_args.get(silo_id, [])],
            log_path=log_path,
            env=self._env,
            program=self._program,
        )
        self.workers[silo_id] = worker
        if wait:
            self.wait_consuming([silo_id])
        return worker

    def wait_consuming(self, silo_ids: Sequence[str]) -> None:
        names = topology.Names(self.prefix)
        deadline = time.monotonic() + self._start_timeout_s
        waiting = list(silo_ids)
        while waiting:
            for silo_id in list(waiting):
                worker = self.workers[silo_id]
                if worker.process.poll() is not None:
                    raise RuntimeError(
                        f"worker for silo {silo_id!r} exited with {worker.process.returncode} "
                        f"while starting:\n{worker.log_text()[-3000:]}"
                    )
                if (queue_consumers(self.broker_url, names.silo_queue(silo_id)) or 0) > 0:
                    waiting.remove(silo_id)
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(
                    f"workers for silos {waiting} did not start consuming within "
                    f"{self._start_timeout_s:.0f} s"
                )
            if waiting:
                time.sleep(0.2)

    def close(self) -> dict[str, int]:
        for silo_id, worker in self.workers.items():
            self.exit_codes[silo_id] = worker.stop()
        return self.exit_codes

    def __enter__(self) -> WorkerFleet:
        # `with WorkerFleet(...).start() as fleet:` must not start a second set.
        return self if self.workers else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
