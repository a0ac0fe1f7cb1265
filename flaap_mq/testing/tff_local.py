"""TFF's local C++ execution contexts, with their executor processes stopped afterwards.

`tff.backends.native.create_async_local_cpp_execution_context()` and
`create_sync_local_cpp_execution_context()` return contexts that start a
`worker_binary` subprocess (TFF's C++ executor) on first use.  TFF never stops
it in an orderly way: its `ServiceManager` signals the process only from
`__del__`, i.e. when the context is garbage-collected, which for a context
still referenced happens at interpreter shutdown, if at all.  And even then it
sends SIGINT and waits without a timeout, so a `worker_binary` that inherited
SIGINT as ignored (e.g. started from a non-interactive shell's background job)
hangs the interpreter, and one whose context is never collected outlives it.

`local_cpp_contexts` gives tests and benchmarks such contexts as a context
manager that, on exit, stops exactly the `worker_binary` processes its contexts
started (SIGTERM, then SIGKILL after a grace period), reaps them, and disarms
TFF's `__del__` so that it cannot later signal a pid that has been reused::

    with local_cpp_contexts(num_async=3, with_sync=True) as (silos, reference):
        with tff.framework.get_context_stack().install(reference):
            expected = my_computation(data)

The executor processes are found through TFF 0.87 internals (the
`ServiceManager` in the closure of the contexts' executor factory).  Should a
TFF upgrade move them, the `worker_binary` children of this process started
while the block ran are stopped instead (and left unreaped, as zombies, for
TFF's `__del__` to reap).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psutil
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.execution_contexts import (
    async_execution_context,
    sync_execution_context,
)

__all__ = ["local_cpp_contexts"]

AsyncContext = async_execution_context.AsyncExecutionContext
SyncContext = sync_execution_context.SyncExecutionContext

# Seconds a `worker_binary` gets to exit after SIGTERM before it is SIGKILLed,
# and after SIGKILL before we give up on it.
_TERMINATE_GRACE_S = 30.0
_KILL_GRACE_S = 10.0


@contextlib.contextmanager
def local_cpp_contexts(
    num_async: int = 0, with_sync: bool = False
) -> Iterator[tuple[list[AsyncContext], SyncContext | None]]:
    """TFF local C++ contexts whose `worker_binary` processes are stopped on exit.

    Args:
      num_async: How many async contexts to create, each from
        `tff.backends.native.create_async_local_cpp_execution_context()`
        (e.g. one per silo of a `MergeableCompExecutionContext`).
      with_sync: Whether to create also a sync context, from
        `tff.backends.native.create_sync_local_cpp_execution_context()`
        (e.g. to install as TFF's default context for reference answers).

    Yields:
      `(async_contexts, sync_context)`: the list of `num_async` async contexts,
      and the sync context, or `None` if `with_sync` is false.  Each starts its
      own `worker_binary` when first used.  After the block they must not be
      used: their executors are gone, and they raise rather than start new
      ones that nothing would stop.

    Raises:
      ValueError: If `num_async` is negative.
      RuntimeError: On exit, if a `worker_binary` survived SIGKILL.
    """
    if num_async < 0:
        raise ValueError(f"Expected a non-negative number of async contexts, found {num_async}.")
    running_before = {process.pid for process in _worker_binary_children()}
    async_contexts: list[AsyncContext] = []
    sync_context: SyncContext | None = None
    try:
        for _ in range(num_async):
            async_contexts.append(tff.backends.native.create_async_local_cpp_execution_context())
        if with_sync:
            sync_context = tff.backends.native.create_sync_local_cpp_execution_context()
        yield async_contexts, sync_context
    finally:
        contexts: list[Any] = [*async_contexts]
        if sync_context is not None:
            contexts.append(sync_context)
        _stop_executors(contexts, running_before)


# --------------------------------------------------------------------------
# Finding the executors.


def _service_manager(context: Any) -> Any | None:
    """TFF's `ServiceManager` behind a local C++ context, or None if not found.

    In TFF 0.87, `local_cpp_executor_factory` returns a
    `ResourceManagingExecutorFactory` whose `_executor_stack_fn` is a closure
    over the `ServiceManager` that owns the `worker_binary` (`_process`, a
    `subprocess.Popen`).  Async and sync contexts keep the factory as
    `_executor_factory`.
    """
    factory = getattr(context, "_executor_factory", None)
    stack_fn = getattr(factory, "_executor_stack_fn", None)
    for cell in getattr(stack_fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if type(value).__name__ == "ServiceManager" and hasattr(value, "_process"):
            return value
    return None


def _worker_binary_children() -> list[psutil.Process]:
    """`worker_binary` processes that are children of this process, zombies included.

    Only direct children: TFF starts its executors itself, whereas the
    executors of e.g. `flaap-mq worker` subprocesses are grandchildren and
    belong to those workers.
    """
    found = []
    for process in psutil.Process().children(recursive=False):
        try:
            if process.name() == "worker_binary" or any(
                "worker_binary" in part for part in process.cmdline()
            ):
                found.append(process)
        except psutil.ZombieProcess:
            # Dead but not reaped yet: its command line is gone, its name is not.
            with contextlib.suppress(psutil.Error):
                if process.name() == "worker_binary":
                    found.append(process)
        except psutil.Error:  # gone meanwhile, or not ours to look at
            pass
    return found


# --------------------------------------------------------------------------
# Stopping them.


def _refuse_restart() -> None:
    raise RuntimeError(
        "This TFF local C++ context was closed by `local_cpp_contexts`; its "
        "executor has been stopped. Create a new context."
    )


def _stop_executors(contexts: Sequence[Any], running_before: set[int]) -> None:
    """Stops the `worker_binary` of every context in `contexts`."""
    managers = []
    unmanaged = False
    for context in contexts:
        manager = _service_manager(context)
        if manager is None:
            unmanaged = True
        else:
            managers.append(manager)

    processes: list[subprocess.Popen[bytes]] = []
    for manager in managers:
        # First, so that nothing starts a new executor while we stop this one:
        # TFF's `get_stub` restarts the executor when it finds it not ready.
        manager.get_stub = _refuse_restart
        if isinstance(manager._process, subprocess.Popen):
            processes.append(manager._process)
    try:
        _stop_popens(processes)
    finally:
        for manager in managers:
            if manager._process is None or manager._process.returncode is not None:
                # Reaped by us: TFF's `__del__` would `os.kill` its (maybe reused)
                # pid and wait for it; with no process it does nothing.
                manager._process = None
                manager._stub = None

    if unmanaged:
        ours = {process.pid for process in processes}
        strays = [
            process
            for process in _worker_binary_children()
            if process.pid not in running_before and process.pid not in ours
        ]
        _stop_unowned(strays)


def _stop_popens(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then SIGKILL after a grace period; reaps them (through `Popen`)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_S
    survivors = []
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            survivors.append(process)
    for process in survivors:
        try:
            process.wait(_KILL_GRACE_S)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"worker_binary {process.pid} survived SIGKILL") from e


def _is_dead(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until_dead(processes: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits for `processes` to exit *without reaping them*; returns the living."""
    deadline = time.monotonic() + timeout
    alive = [process for process in processes if not _is_dead(process)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [process for process in alive if not _is_dead(process)]
    return alive


def _stop_unowned(processes: Sequence[psutil.Process]) -> None:
    """Stops executors whose `ServiceManager` was not found, without reaping them.

    Their `Popen` lives on in TFF, whose `__del__` sends SIGINT and then reaps
    them.  Left as zombies, their pids cannot be reused meanwhile, so that
    SIGINT is harmless; reaped by us, it could hit an unrelated process.
    """
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    for process in _wait_until_dead(processes, _TERMINATE_GRACE_S):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    alive = _wait_until_dead(processes, _KILL_GRACE_S)
    if alive:
        raise RuntimeError(f"worker_binary {[p.pid for p in alive]} survived SIGKILL")
