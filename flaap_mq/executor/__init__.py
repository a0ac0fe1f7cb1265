"""TFF's C++ executor service, run where nothing but its owner can reach it.

Used by both sides of the wire: the silo worker runs its tasks in one, and
the coordinator runs `merge` in one. `service` owns the process;
`environment` decides what it inherits; `inside/` is the program that builds
its sandbox (standard library only, run in a fresh interpreter).
"""

from flaap_mq.executor.service import (
    CHANNEL_OPTIONS,
    HOST_NETWORK_MARK,
    ExecutorCallError,
    ExecutorNetwork,
    ExecutorService,
    SandboxUnavailable,
    wait_until_gone,
    worker_binary_path,
)

__all__ = [
    "CHANNEL_OPTIONS",
    "HOST_NETWORK_MARK",
    "ExecutorCallError",
    "ExecutorNetwork",
    "ExecutorService",
    "SandboxUnavailable",
    "wait_until_gone",
    "worker_binary_path",
]
