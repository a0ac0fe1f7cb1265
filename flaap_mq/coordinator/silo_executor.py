"""A TFF executor whose executor service is a silo worker behind RabbitMQ.

This is TFF's `RemoteExecutor` protocol (GetExecutor, CreateValue, ...,
Dispose), with four differences that matter:

* values are pipelined. TFF's protocol is chatty: a one-float mean takes
  about ten requests, and each Create* waits for the value ref that the
  executor service hands out. Over a broker, that is ten persistent,
  confirmed round trips. Here the coordinator names each value itself (the
  task id of the Create* task that makes it) and sends Create* requests
  one-way, so a whole chain CreateValue -> CreateCall -> Compute costs one
  round trip: only GetExecutor and Compute, which return data, are awaited.
  The worker maps the names to its executor service's refs
  (`flaap_mq.worker.values`). A Create* that fails on the silo (a TFF error
  in a CreateCall, say) fails the Compute that needs it, with that error,
  naming the silo and the request that failed; a Create* that the broker
  did not take (too large, no silo queue) fails that Compute with the reason;
* every awaited request is awaited, never called synchronously: TFF 0.87's
  `RemoteExecutor` blocks the event loop on each gRPC call, so the silos of a
  round run one after another (4 silos of 1 s each: 4.9 s); here they run
  side by side;
* each computation is sent once per executor, not once per invocation
  (`computation_cache`);
* disposal is one-way and batched: TFF's value finalizers run on whatever
  thread the garbage collector picks, where waiting for a reply could
  deadlock.

Executor creation (GetExecutor) is deferred to the first request, because
TFF's executor factory calls its stack function synchronously.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import weakref
from collections.abc import Mapping, Sequence

from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.coordinator import value_read, value_wire
from flaap_mq.coordinator.computation_cache import ComputationCache
from flaap_mq.coordinator.task_client import TaskClient
from flaap_mq.protocol import envelope
from flaap_mq.tff_internals import (
    computation_types,
    executor_base,
    executor_value_base,
    placements,
    structure,
    value_serialization,
)

_DISPOSE_BATCH_SIZE = 20


@dataclasses.dataclass(frozen=True)
class ExecutorHandle:
    """An executor in a silo's executor service, and the worker process holding it."""

    executor_id: executor_pb2.ExecutorId
    incarnation: str


class SiloValue(executor_value_base.ExecutorValue):
    """A value named by the coordinator, held in a silo's executor service.

    Disposed of when unreferenced. Until the broker has confirmed the task
    that makes it, it keeps the values it was made from (`parents`), so that
    a Compute can report a value lost on the way to the broker, however far
    back in the chain.
    """

    def __init__(
        self,
        value_id: str,
        type_spec: computation_types.Type,
        executor: SiloExecutor,
        remote: ExecutorHandle,
        sent: concurrent.futures.Future[None],
        parents: Sequence[SiloValue] = (),
    ) -> None:
        self._value_ref = executor_pb2.ValueRef(id=value_id)
        self._type_signature = type_spec
        self._executor = executor
        self.remote = remote
        self._sent = sent
        self._parents: Sequence[SiloValue] = tuple(parents)
        self._settled = False  # this value's task and its parents' are all at the broker
        weakref.finalize(self, executor._dispose, value_id, remote)

    @property
    def type_signature(self) -> computation_types.Type:
        return self._type_signature

    @property
    def reference(self) -> executor_pb2.ValueRef:
        return self._value_ref

    async def compute(self) -> object:
        return await self._executor._compute(self)

    async def wait_sent(self) -> None:
        """Returns once the broker holds the tasks making this value and its parents.

        Raises the `SiloError` of the first that it did not take. Cancelling
        the wait leaves the publishes' futures alone: the link settles them.
        """
        unsettled: list[SiloValue] = []
        stack, seen = [self], set()
        while stack:
            value = stack.pop()
            if value._settled or id(value) in seen:
                continue
            seen.add(id(value))
            unsettled.append(value)
            stack.extend(value._parents)
        outcomes = await asyncio.gather(
            *(asyncio.shield(asyncio.wrap_future(v._sent)) for v in unsettled),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        for value in unsettled:
            value._settled, value._parents = True, ()  # lets the chain be collected


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
        self._remote: ExecutorHandle | None = None
        self._creating: asyncio.Future[ExecutorHandle] | None = None
        self._dispose_lock = threading.Lock()
        self._dispose_ids: list[str] = []
        self._computations = ComputationCache()
        self._closed = False

    @property
    def silo_id(self) -> str:
        return self._silo_id

    async def _executor(self) -> ExecutorHandle:
        """The silo-side executor for our cardinalities, created on first use."""
        if self._remote is not None:
            return self._remote
        if self._closed:
            raise RuntimeError(f"executor for silo {self._silo_id!r} is closed")
        # Concurrent first requests share one GetExecutor.
        if self._creating is None:
            self._creating = asyncio.ensure_future(self._get_executor())
        try:
            self._remote = await asyncio.shield(self._creating)
        except BaseException:
            self._creating = None
            raise
        return self._remote

    async def _get_executor(self) -> ExecutorHandle:
        request = executor_pb2.GetExecutorRequest(
            cardinalities=value_serialization.serialize_cardinalities(self._cardinalities)
        )
        answer = await self._client.ask(self._silo_id, request)
        return ExecutorHandle(answer.response.executor, answer.incarnation)

    def _make(
        self,
        remote: ExecutorHandle,
        request: envelope.Request,
        type_spec: computation_types.Type,
        parents: Sequence[SiloValue] = (),
    ) -> SiloValue:
        """Sends a Create* request one-way; the value is named by its task id."""
        value_id = envelope.new_task_id()
        sent = self._client.send(
            self._silo_id, request, incarnation=remote.incarnation, task_id=value_id
        )
        return SiloValue(value_id, type_spec, self, remote, sent, parents)

    async def create_value(self, value: object, type_spec: object = None) -> SiloValue:
        remote = await self._executor()

        async def create() -> SiloValue:
            # As TFF's serialize_value, large arrays written from their own memory.
            value_proto, value_type = value_wire.serialize_value(value, type_spec)
            request = envelope.create_value_request(remote.executor_id, value_proto)
            return self._make(remote, request, value_type)

        return await self._computations.value_for(value, create)  # type: ignore[return-value]

    async def create_call(self, comp: SiloValue, arg: SiloValue | None = None) -> SiloValue:
        remote = await self._executor()
        if not isinstance(comp.type_signature, computation_types.FunctionType):
            raise TypeError(f"expected a function to call, got {comp.type_signature}")
        request = executor_pb2.CreateCallRequest(
            executor=remote.executor_id,
            function_ref=comp.reference,
            argument_ref=arg.reference if arg is not None else None,
        )
        parents = (comp,) if arg is None else (comp, arg)
        return self._make(remote, request, comp.type_signature.result, parents)

    async def create_struct(self, elements: object) -> SiloValue:
        remote = await self._executor()
        elements = structure.from_container(elements)
        proto_elements = []
        type_elements = []
        parents = []
        for name, value in structure.iter_elements(elements):
            proto_elements.append(
                executor_pb2.CreateStructRequest.Element(
                    name=name or None, value_ref=value.reference
                )
            )
            type_elements.append((name, value.type_signature) if name else value.type_signature)
            parents.append(value)
        request = executor_pb2.CreateStructRequest(
            executor=remote.executor_id, element=proto_elements
        )
        return self._make(remote, request, computation_types.StructType(type_elements), parents)

    async def create_selection(self, source: SiloValue, index: int) -> SiloValue:
        remote = await self._executor()
        if not isinstance(source.type_signature, computation_types.StructType):
            raise TypeError(f"can only select from a struct, got {source.type_signature}")
        request = executor_pb2.CreateSelectionRequest(
            executor=remote.executor_id, source_ref=source.reference, index=index
        )
        return self._make(remote, request, source.type_signature[index], (source,))

    async def _compute(self, value: SiloValue) -> object:
        request = executor_pb2.ComputeRequest(
            executor=value.remote.executor_id, value_ref=value.reference
        )
        answer = asyncio.ensure_future(
            self._client.ask(self._silo_id, request, incarnation=value.remote.incarnation)
        )
        # The chain's tasks are usually long at the broker. Waited for beside
        # the answer, so that a value the broker refused is reported as such,
        # and no longer than the answer is waited for (its task timeout): with
        # the broker gone, a send settles only once the link gives the broker
        # up, 30 s on.
        sent = asyncio.ensure_future(value.wait_sent())
        try:
            await asyncio.wait({answer, sent}, return_when=asyncio.FIRST_EXCEPTION)
            if sent.done():
                sent.result()  # the broker's refusal, which explains a failed answer
            reply = answer.result()
        except BaseException:
            for task in (answer, sent):
                task.cancel()
                task.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        # Arrays read from the answer's own buffer, not copied (`value_read`).
        return value_read.deserialize_compute_response(reply.payload, value.type_signature)

    def _dispose(self, value_id: str, remote: ExecutorHandle) -> None:
        """Called by value finalizers, from any thread; never waits."""
        with self._dispose_lock:
            if remote != self._remote:
                return  # that executor is already gone, and its values with it
            self._dispose_ids.append(value_id)
            if len(self._dispose_ids) < _DISPOSE_BATCH_SIZE:
                return
            ids, self._dispose_ids = self._dispose_ids, []
        self._client.send(
            self._silo_id,
            executor_pb2.DisposeRequest(
                executor=remote.executor_id,
                value_ref=[executor_pb2.ValueRef(id=i) for i in ids],
            ),
            incarnation=remote.incarnation,
        )

    def close(self) -> None:
        """Releases the silo-side executor (one-way; TFF calls this synchronously)."""
        self._closed = True
        with self._dispose_lock:
            remote, self._remote = self._remote, None
            self._dispose_ids = []
        self._computations.clear()
        if remote is not None:
            self._client.send(
                self._silo_id,
                executor_pb2.DisposeExecutorRequest(executor=remote.executor_id),
                incarnation=remote.incarnation,
            )
