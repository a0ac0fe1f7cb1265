"""TFF's remote executor stub over the coordinator's own `ExecutorService`.

TFF's `RemoteExecutorGrpcStub` calls through grpcio, which copies a request
once more into its own buffers and holds an answer three times on the way in
(`flaap_mq/executor/client.py`), and TFF's `RemoteExecutor.create_value`
copies a tensor four times into its request (`coordinator/value_wire.py`).
Both were on the coordinator's path for a large argument: `after_merge`
receives the original argument, which `SentOnce` creates in the merge
executor, and the coordinator held twice the model while it did
(docs/benchmarks.md, "The executor client").

`ServiceStub` answers TFF's stub interface through `ExecutorService.call`, and
`create_value_from_memory` sends a value the way a silo's is sent: its
arrays written from their own memory (`value_wire`), the request in pieces
that are never joined. One stub serves one `RemoteExecutor`, so it knows the
executor id that executor was given.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import message as protobuf_message
from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.coordinator import value_wire
from flaap_mq.executor import ExecutorService
from flaap_mq.protocol import chunking, envelope
from flaap_mq.tff_internals import computation_types, remote_executor_stub

Response = TypeVar("Response", bound=protobuf_message.Message)


class ServiceStub(remote_executor_stub.RemoteExecutorStub):
    """TFF's `RemoteExecutorStub` for one executor of an `ExecutorService`."""

    def __init__(self, service: ExecutorService) -> None:
        self._service = service
        self.executor_id: executor_pb2.ExecutorId | None = None  # once GetExecutor answered

    def _call(self, request: envelope.Request, response_type: type[Response]) -> Response:
        serialized = envelope.serialized(request)
        answer = self._service.call(
            serialized.spec.kind, chunking.pieces_of(serialized.payload), timeout_s=None
        )
        return response_type.FromString(answer)

    def create_value_from_memory(
        self, value: object, type_spec: computation_types.Type | None
    ) -> tuple[executor_pb2.ValueRef, computation_types.Type]:
        """Creates `value` in the executor, as TFF's `RemoteExecutor.create_value` would.

        Returns its ref and the type TFF's serialization gives it.
        """
        if self.executor_id is None:
            raise ValueError("create_value before set_cardinalities: this stub has no executor")
        value_proto, value_type = value_wire.serialize_value(value, type_spec)
        request = envelope.create_value_request(self.executor_id, value_proto)
        return self._call(request, executor_pb2.CreateValueResponse).value_ref, value_type

    def get_executor(
        self, request: executor_pb2.GetExecutorRequest
    ) -> executor_pb2.GetExecutorResponse:
        response = self._call(request, executor_pb2.GetExecutorResponse)
        self.executor_id = response.executor
        return response

    def create_value(
        self, request: executor_pb2.CreateValueRequest
    ) -> executor_pb2.CreateValueResponse:
        return self._call(request, executor_pb2.CreateValueResponse)

    def create_struct(
        self, request: executor_pb2.CreateStructRequest
    ) -> executor_pb2.CreateStructResponse:
        return self._call(request, executor_pb2.CreateStructResponse)

    def create_call(
        self, request: executor_pb2.CreateCallRequest
    ) -> executor_pb2.CreateCallResponse:
        return self._call(request, executor_pb2.CreateCallResponse)

    def create_selection(
        self, request: executor_pb2.CreateSelectionRequest
    ) -> executor_pb2.CreateSelectionResponse:
        return self._call(request, executor_pb2.CreateSelectionResponse)

    def compute(self, request: executor_pb2.ComputeRequest) -> executor_pb2.ComputeResponse:
        return self._call(request, executor_pb2.ComputeResponse)

    def dispose(self, request: executor_pb2.DisposeRequest) -> executor_pb2.DisposeResponse:
        return self._call(request, executor_pb2.DisposeResponse)

    def dispose_executor(
        self, request: executor_pb2.DisposeExecutorRequest
    ) -> executor_pb2.DisposeExecutorResponse:
        return self._call(request, executor_pb2.DisposeExecutorResponse)

    @property
    def is_ready(self) -> bool:
        return self._service.alive()
