"""TFF's local runtime, for reference answers, on executors that are stopped afterwards.

Tests compare what flaap-mq computes with what TFF's own local runtime
computes. `tff.backends.native.create_*_local_cpp_execution_context()` would
start a `worker_binary` on a TCP port of every interface, and never stop it
in an orderly way (TFF's `ServiceManager` signals it only from `__del__`,
with a SIGINT the binary ignores). `local_cpp_contexts` builds the same
contexts, the way TFF 0.87's `local_cpp_executor_factory` does (a
`RemoteExecutor` per invocation over one stub, `default_num_clients=0`,
`desugar_and_transform_to_native`, TensorFlow's argument and result
transformations), on `flaap_mq.executor.ExecutorService`s: sandboxed like
every executor flaap-mq starts, and stopped when the block ends::

    with local_cpp_contexts(num_async=3, with_sync=True) as (silos, reference):
        with tff.framework.get_context_stack().install(reference):
            expected = my_computation(data)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import tensorflow_federated as tff

from flaap_mq.executor import ExecutorService
from flaap_mq.tff_internals import compiler, tensorflow_computation

__all__ = ["local_cpp_contexts"]

AsyncContext = tff.framework.AsyncExecutionContext
SyncContext = tff.framework.SyncExecutionContext


def _executor_factory(channel: grpc.Channel) -> tff.framework.ResourceManagingExecutorFactory:
    """TFF 0.87's `local_cpp_executor_factory`, over `channel`."""
    stub = tff.framework.RemoteExecutorGrpcStub(channel)

    def stack_fn(cardinalities: dict) -> tff.framework.RemoteExecutor:
        if cardinalities.get(tff.CLIENTS) is None:
            cardinalities[tff.CLIENTS] = 0  # TFF's default_num_clients
        executor = tff.framework.RemoteExecutor(stub)
        executor.set_cardinalities(cardinalities)
        return executor

    return tff.framework.ResourceManagingExecutorFactory(stack_fn)


@contextlib.contextmanager
def local_cpp_contexts(
    num_async: int = 0, with_sync: bool = False
) -> Iterator[tuple[list[AsyncContext], SyncContext | None]]:
    """TFF local C++ contexts, each on its own executor, all stopped on exit.

    Args:
      num_async: how many async contexts (e.g. one per silo of a
        `MergeableCompExecutionContext`).
      with_sync: whether to create a sync context too (e.g. to install as
        TFF's default context for reference answers).

    Yields:
      `(async_contexts, sync_context)`; `sync_context` is None unless
      `with_sync`. After the block their executors are gone.
    """
    if num_async < 0:
        raise ValueError(f"Expected a non-negative number of async contexts, found {num_async}.")
    kinds = [AsyncContext] * num_async + ([SyncContext] if with_sync else [])
    with contextlib.ExitStack() as stack:
        contexts = []
        for kind in kinds:
            service = stack.enter_context(ExecutorService())
            channel = service.open_channel()
            stack.callback(channel.close)  # closed before its service stops
            contexts.append(
                kind(
                    executor_fn=_executor_factory(channel),
                    compiler_fn=compiler.desugar_and_transform_to_native,
                    transform_args=tensorflow_computation.transform_args,
                    transform_result=tensorflow_computation.transform_result,
                )
            )
        yield contexts[:num_async], contexts[num_async] if with_sync else None
