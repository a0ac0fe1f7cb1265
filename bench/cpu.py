"""CPU time per invocation, by process group, for diagnosing where time goes.

On a 2-core machine a path is as fast as the CPU it burns allows: the
benchmark records, around every timed invocation, the user+system CPU
seconds of the coordinator (this process), the broker (when it runs on this
machine), the flaap-mq worker processes and the `worker_binary`s of each
path. Invocations run one at a time, so the other path's processes are idle
and contribute nothing.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Mapping, Sequence

import psutil

COORDINATOR = "coordinator"
BROKER = "broker"
MQ_WORKERS = "flaap-mq workers"
MQ_EXECUTORS = "worker_binary (flaap-mq)"
DIRECT_EXECUTORS = "worker_binary (direct)"

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}


def broker_process(broker_url: str) -> psutil.Process | None:
    """The process listening on the broker's port, if the broker runs here."""
    parts = urllib.parse.urlsplit(broker_url.split(",")[0])
    if (parts.hostname or "") not in _LOCAL_HOSTS:
        return None
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    return None


class CpuMeter:
    """Sums the CPU seconds of named groups of processes."""

    def __init__(self, groups: Mapping[str, Sequence[psutil.Process]]) -> None:
        self._groups = {name: list(procs) for name, procs in groups.items() if procs}

    @property
    def group_names(self) -> list[str]:
        return list(self._groups)

    def snapshot(self, *, own_last: bool) -> dict[str, float]:
        """CPU seconds by group. Reading the others costs this process CPU: read our own
        last before a sample and first after it, and that cost stays out of the delta."""
        names = sorted(self._groups, key=lambda name: (name == COORDINATOR) == own_last)
        cpu = {name: sum(_cpu_seconds(p) for p in self._groups[name]) for name in names}
        return {name: cpu[name] for name in self._groups}

    @staticmethod
    def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


def _cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0  # gone: its CPU no longer counts, which only makes a delta smaller
    return times.user + times.system
