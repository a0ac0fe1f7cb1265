"""TFF's own remote path, the baseline: `RemoteExecutor` over gRPC to `worker_binary`s.

Built the way TFF 0.87 builds its local C++ context
(`executor_stacks/executor_factory.py`, `backends/native/execution_contexts.py`):
per silo a `ResourceManagingExecutorFactory` whose stack function returns a
`RemoteExecutor` over a `RemoteExecutorGrpcStub`, inside an
`AsyncExecutionContext` with `desugar_and_transform_to_native` and the
TensorFlow argument and result transformations; then TFF's
`MergeableCompExecutionContext` over those silo contexts. The only
difference from TFF's launcher is that the `worker_binary`s are flaap-mq's
`ExecutorService`s, which this benchmark owns and stops, on the host's
network as TFF runs them (`ExecutorNetwork.HOST`: a TCP port on loopback).

TFF's `RemoteExecutor` calls its stub synchronously inside `async` methods,
so the silos of one round run one after another on this path; that is TFF's
behaviour, measured as is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import grpc
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.native import compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import (
    tensorflow_computation,
)

from bench.wire import GRPC_CHANNEL_OPTIONS, CountingChannel, WireCount
from flaap_mq.executor import ExecutorNetwork, ExecutorService


class DirectSilos:
    """One `worker_binary` per silo; a context manager that stops them.

    On the host's loopback by default, as TFF runs them; `network=SANDBOX`
    puts each in flaap-mq's sandbox, reached through its Unix socket (the
    sandbox row compares the two).
    """

    def __init__(self, num_silos: int, network: ExecutorNetwork = ExecutorNetwork.HOST) -> None:
        self._num_silos = num_silos
        self._network = network
        self._stack = contextlib.ExitStack()
        self.services: list[ExecutorService] = []
        self.count = WireCount()

    def __enter__(self) -> DirectSilos:
        with self._stack as stack:
            for _ in range(self._num_silos):
                self.services.append(stack.enter_context(ExecutorService(network=self._network)))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.services if s.pid is not None]

    def stub(self, silo: int) -> tff.framework.RemoteExecutorGrpcStub:
        channel = grpc.insecure_channel(self.services[silo].target, GRPC_CHANNEL_OPTIONS)
        self._stack.callback(channel.close)
        return tff.framework.RemoteExecutorGrpcStub(CountingChannel(channel, self.count))

    def context(self, num_silos: int) -> tff.framework.MergeableCompExecutionContext:
        """TFF's mergeable context over the first `num_silos` silos."""
        return tff.backends.native.create_mergeable_comp_execution_context(
            [self.silo_context(i) for i in range(num_silos)]
        )

    def silo_context(self, silo: int) -> tff.framework.AsyncExecutionContext:
        stub = self.stub(silo)

        def stack_fn(cardinalities: Mapping[object, int]) -> tff.framework.RemoteExecutor:
            cardinalities = dict(cardinalities)
            if cardinalities.get(tff.CLIENTS) is None:
                cardinalities[tff.CLIENTS] = 1  # as flaap-mq's clients_per_silo=1
            executor = tff.framework.RemoteExecutor(stub)
            executor.set_cardinalities(cardinalities)
            return executor

        return tff.framework.AsyncExecutionContext(
            tff.framework.ResourceManagingExecutorFactory(stack_fn),
            compiler.desugar_and_transform_to_native,
            transform_args=tensorflow_computation.transform_args,
            transform_result=tensorflow_computation.transform_result,
        )

    def executor(self, silo: int) -> tff.framework.RemoteExecutor:
        """A bare `RemoteExecutor` on one silo, for single-request timing."""
        executor = tff.framework.RemoteExecutor(self.stub(silo))
        executor.set_cardinalities({tff.CLIENTS: 1})
        return executor
