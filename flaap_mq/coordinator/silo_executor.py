"""A TFF executor whose executor service is a silo worker behind RabbitMQ.

This is TFF's `RemoteExecutor` protocol (GetExecutor, CreateValue, ...,
Dispose), with two differences that matter:

* every request is awaited, never called synchronously: TFF 0.87's
  `RemoteExecutor` blocks the event loop on each gRPC call, so the silos of a
  round run one after another (4 silos of 1 s each: 4.9 s); here they run side
  by side;
* disposal is fire-and-forget and batched: TFF's value finalizers run on
  whatever thread the garbage collector picks, where waiting for a reply
  could deadlock.

Executor creation (GetExecutor) is deferred to the first awaited request,
because TFF's executor factory calls its stack function synchronously.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Mapping

from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.executors import (
    executor_base,
    executor_value_base,
    value_serialization,
)
from tensorflow_federated.python.core.impl.types import computation_types, placements

from flaap_mq.coordinator.task_client import TaskClient

_DISPOSE_BATCH_SIZE = 20


class SiloValue(executor_value_base.ExecutorValue):
    """A value held in a silo's executor service, disposed when unreferenced."""

    def __init__(
        self,
        value_ref: executor_pb2.ValueRef,
        type_spec: computation_types.Type,
        executor: SiloExecutor,
        executor_id: executor_pb2.ExecutorId,
    ) -> None:
        self._value_ref = value_ref
        self._type_signature = type_spec
        self._executor = executor
        weakref.finalize(self, executor._dispose, value_ref, executor_id)

    @property
    def type_signature(self) -> computation_types.Type:
        return self._type_signature

    @property
    def reference(self) -> executor_pb2.ValueRef:
        return self._value_ref

    async def compute(self) -> object:
        return await self._executor._compute(self._value_ref, self._type_signature)


class SiloExecutor(executor_base.Executor):
    """Executes on one silo through a `TaskClient`; see the module docstring."""

    def __init__(
        self,
        client: TaskClient,
        silo_id: str,
        cardinalities: Mapping[placements.PlacementLiteral, int],
    ) -> None:
        self._client = client
        self._silo_id = silo_id
        self._cardinalities = dict(cardinalities)
        self._executor_id: executor_pb2.ExecutorId | None = None
        self._creating: asyncio.Future[executor_pb2.ExecutorId] | None = None
        self._dispose_lock = threading.Lock()
        self._dispose_refs: list[executor_pb2.ValueRef] = []
        self._closed = False

    @property
    def silo_id(self) -> str:
        return self._silo_id

    async def _call(self, request):
        return await self._client.call(self._silo_id, request)

    async def _executor(self) -> executor_pb2.ExecutorId:
        """The silo-side executor for our cardinalities, created on first use."""
        if self._executor_id is not None:
            return self._executor_id
        if self._closed:
            raise RuntimeError(f"executor for silo {self._silo_id!r} is closed")
        # Concurrent first requests share one GetExecutor.
        if self._creating is None:
            self._creating = asyncio.ensure_future(self._get_executor())
        try:
            self._executor_id = await asyncio.shield(self._creating)
        except BaseException:
            self._creating = None
            raise
        return self._executor_id

    async def _get_executor(self) -> executor_pb2.ExecutorId:
        request = executor_pb2.GetExecutorRequest(
            cardinalities=value_serialization.serialize_cardinalities(self._cardinalities)
        )
        response = await self._call(request)
        return response.executor

    def _wrap(
        self,
        response: executor_pb2.CreateValueResponse,
        type_spec: computation_types.Type,
        executor_id: executor_pb2.ExecutorId,
    ) -> SiloValue:
        return SiloValue(response.value_ref, type_spec, self, executor_id)

    async def create_value(self, value: object, type_spec: object = None) -> SiloValue:
        executor_id = await self._executor()
        value_proto, type_spec = value_serialization.serialize_value(value, type_spec)
        response = await self._call(
            executor_pb2.CreateValueRequest(executor=executor_id, value=value_proto)
        )
        return self._wrap(response, type_spec, executor_id)

    async def create_call(self, comp: SiloValue, arg: SiloValue | None = None) -> SiloValue:
        executor_id = await self._executor()
        if not isinstance(comp.type_signature, computation_types.FunctionType):
            raise TypeError(f"expected a function to call, got {comp.type_signature}")
        response = await self._call(
            executor_pb2.CreateCallRequest(
                executor=executor_id,
                function_ref=comp.reference,
                argument_ref=arg.reference if arg is not None else None,
            )
        )
        return self._wrap(response, comp.type_signature.result, executor_id)

    async def create_struct(self, elements: object) -> SiloValue:
        executor_id = await self._executor()
        elements = structure.from_container(elements)
        proto_elements = []
        type_elements = []
        for name, value in structure.iter_elements(elements):
            proto_elements.append(
                executor_pb2.CreateStructRequest.Element(
                    name=name or None, value_ref=value.reference
                )
            )
            type_elements.append((name, value.type_signature) if name else value.type_signature)
        response = await self._call(
            executor_pb2.CreateStructRequest(executor=executor_id, element=proto_elements)
        )
        return self._wrap(response, computation_types.StructType(type_elements), executor_id)

    async def create_selection(self, source: SiloValue, index: int) -> SiloValue:
        executor_id = await self._executor()
        if not isinstance(source.type_signature, computation_types.StructType):
            raise TypeError(f"can only select from a struct, got {source.type_signature}")
        response = await self._call(
            executor_pb2.CreateSelectionRequest(
                executor=executor_id, source_ref=source.reference, index=index
            )
        )
        return self._wrap(response, source.type_signature[index], executor_id)

    async def _compute(
        self, value_ref: executor_pb2.ValueRef, type_spec: computation_types.Type
    ) -> object:
        executor_id = await self._executor()
        response = await self._call(
            executor_pb2.ComputeRequest(executor=executor_id, value_ref=value_ref)
        )
        value, _ = value_serialization.deserialize_value(response.value, type_spec)
        return value

    def _dispose(
        self, value_ref: executor_pb2.ValueRef, executor_id: executor_pb2.ExecutorId
    ) -> None:
        """Called by value finalizers, from any thread; never waits."""
        with self._dispose_lock:
            if executor_id != self._executor_id:
                return  # that executor is already gone, and its values with it
            self._dispose_refs.append(value_ref)
            if len(self._dispose_refs) < _DISPOSE_BATCH_SIZE:
                return
            refs, self._dispose_refs = self._dispose_refs, []
        self._client.send_and_forget(
            self._silo_id, executor_pb2.DisposeRequest(executor=executor_id, value_ref=refs)
        )

    def close(self) -> None:
        """Releases the silo-side executor (fire-and-forget; TFF calls this synchronously)."""
        self._closed = True
        with self._dispose_lock:
            executor_id, self._executor_id = self._executor_id, None
            self._dispose_refs = []
        if executor_id is not None:
            self._client.send_and_forget(
                self._silo_id, executor_pb2.DisposeExecutorRequest(executor=executor_id)
            )
