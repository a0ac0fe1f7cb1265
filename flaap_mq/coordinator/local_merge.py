"""Runs `merge` on the coordinator, never on a silo.

Why this module exists
----------------------
flaap-mq runs a computation in TFF's mergeable form: `up_to_merge` on every
silo, `merge` of the silos' partial results, then `after_merge` on the silos.
TFF 0.87's `_invoke_merge_in_async_pool` runs each `merge` on the *silo*
context that has just finished, so every silo to finish after the first
receives the partial aggregate of those before it (with one client per silo:
their whole model updates).  In cross-silo
FL only the coordinator may see per-silo partial aggregates.

:class:`LocalMergeContext` is the TFF execution context in which
`SiloSplittingContext` runs every `merge` instead: an asynchronous TFF context
over a `worker_binary` that this process starts and owns (an
`ExecutorService`: sandboxed like a silo's, killed by the kernel if the
coordinator dies, stopped by `close()`), reached over its Unix socket.  It
mirrors TFF's
`local_cpp_executor_factory`, which cannot be used because it leaks its
process.  An `after_merge` whose result has no per-client part runs here
too (TFF runs it on a silo, which then sees the final aggregate); one with
per-client results runs on the silos, which hold the CLIENTS-placed values,
and receives only the merged (global) result.  An invocation with a single
part needs neither: it runs whole on its silo (`partitioning._whole`).
"""

from __future__ import annotations

from collections.abc import Sequence

from flaap_mq.coordinator.computation_cache import ComputationCache
from flaap_mq.coordinator.executor_stub import ServiceStub
from flaap_mq.executor import ExecutorNetwork, ExecutorService
from flaap_mq.tff_internals import (
    async_execution_context,
    compiler,
    invoke_once,
    placements,
    python_executor_stacks,
    remote_executor,
    tensorflow_computation,
)

__all__ = ["LocalMergeContext", "create_local_merge_context"]


class _MergeExecutor(remote_executor.RemoteExecutor):
    """TFF's `RemoteExecutor` over a `ServiceStub`.

    It sends each computation once (`computation_cache`), and a value's
    arrays from their own memory (`ServiceStub.create_value_from_memory`).
    """

    def __init__(self, stub: ServiceStub) -> None:
        super().__init__(stub)
        self._service_stub = stub
        self._computations = ComputationCache()

    async def create_value(self, value: object, type_spec: object = None) -> object:
        async def create() -> remote_executor.RemoteValue:
            ref, value_type = self._service_stub.create_value_from_memory(value, type_spec)
            return remote_executor.RemoteValue(ref, value_type, self)

        return await self._computations.value_for(value, create)

    def close(self) -> None:
        self._computations.clear()
        super().close()


class LocalMergeContext(async_execution_context.AsyncExecutionContext):
    """An async TFF context on a coordinator-owned `worker_binary`.

    `merges_run` counts the invocations it ran (each `merge` is one).  Call
    `close()` when done: it stops the executor service.
    """

    def __init__(self, service: ExecutorService) -> None:
        self.service = service
        self.merges_run = 0
        self._executors: list[_MergeExecutor] = []

        def executor_for(
            cardinalities: dict[placements.PlacementLiteral, int],
        ) -> remote_executor.RemoteExecutor:
            # No CLIENTS-placed argument to count them (`merge` is unplaced;
            # an `after_merge` run here may have an argument without clients):
            # one client, where TFF's local_cpp_executor_factory has none. An
            # all-equal CLIENTS result (a broadcast of the aggregate) needs a
            # member to be read back ("deserialize federated value with no
            # data" with none), and how many there are cannot change its
            # value: `after_merge` holds no aggregation (TFF's mergeable form),
            # and a per-client result runs on the silos, never here.
            if cardinalities.get(placements.CLIENTS) is None:
                cardinalities[placements.CLIENTS] = 1
            executor = _MergeExecutor(ServiceStub(service))
            executor.set_cardinalities(cardinalities)
            self._executors.append(executor)
            return executor

        super().__init__(
            executor_fn=python_executor_stacks.ResourceManagingExecutorFactory(executor_for),
            compiler_fn=compiler.desugar_and_transform_to_native,
            transform_args=tensorflow_computation.transform_args,
            transform_result=tensorflow_computation.transform_result,
        )

    async def invoke(self, comp: object, arg: object) -> object:
        self.merges_run += 1
        return await invoke_once(self, comp, arg)

    def close(self) -> None:
        # Executors first: their cached values are disposed of in the service.
        for executor in self._executors:
            executor.close()
        self._executors.clear()
        self.service.close()


def create_local_merge_context(
    network: ExecutorNetwork = ExecutorNetwork.SANDBOX, hidden_paths: Sequence[str] = ()
) -> LocalMergeContext:
    """Starts a `worker_binary` owned by this process and a context over it.

    Call it from a long-lived thread (normally the main one): the kernel kills
    the binary when the thread that started it exits (`PR_SET_PDEATHSIG`).
    """
    service = ExecutorService(network=network, hidden_paths=hidden_paths)
    service.start()
    try:
        return LocalMergeContext(service)
    except BaseException:
        service.close()
        raise
