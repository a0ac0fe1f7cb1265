"""Counting TFF executor requests and their bytes, the same way on both paths.

On the direct path a `CountingStub` wraps TFF's `RemoteExecutorGrpcStub`; on
flaap-mq, `count_task_client` wraps the two request methods of the context's
`TaskClient` instance (the benchmark's own instrumentation: flaap-mq's code
is not changed). Disposals count as requests on both paths.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import grpc
import tensorflow_federated as tff
from google.protobuf import message as protobuf_message

from flaap_mq.coordinator.task_client import TaskClient

# As TFF's own local launcher: big models must fit in one gRPC message.
GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
]


@dataclasses.dataclass
class WireCount:
    """Executor requests sent and payload bytes each way (thread-safe)."""

    requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def record(
        self, request: protobuf_message.Message, response: protobuf_message.Message | None
    ) -> None:
        size_in = response.ByteSize() if response is not None else 0
        size_out = request.ByteSize()
        with self._lock:
            self.requests += 1
            self.bytes_out += size_out
            self.bytes_in += size_in

    def snapshot(self) -> tuple[int, int, int]:
        with self._lock:
            return self.requests, self.bytes_out, self.bytes_in


class CountingStub(tff.framework.RemoteExecutorStub):
    """TFF's gRPC stub, counting every request into a `WireCount`."""

    def __init__(self, channel: grpc.Channel, count: WireCount) -> None:
        self._inner = tff.framework.RemoteExecutorGrpcStub(channel)
        self._count = count

    def _counted(self, method: Callable[[Any], Any], request: Any) -> Any:
        response = method(request)
        self._count.record(request, response)
        return response

    def get_executor(self, request: Any) -> Any:
        return self._counted(self._inner.get_executor, request)

    def create_value(self, request: Any) -> Any:
        return self._counted(self._inner.create_value, request)

    def create_struct(self, request: Any) -> Any:
        return self._counted(self._inner.create_struct, request)

    def create_call(self, request: Any) -> Any:
        return self._counted(self._inner.create_call, request)

    def create_selection(self, request: Any) -> Any:
        return self._counted(self._inner.create_selection, request)

    def compute(self, request: Any) -> Any:
        return self._counted(self._inner.compute, request)

    def dispose(self, request: Any) -> Any:
        return self._counted(self._inner.dispose, request)

    def dispose_executor(self, request: Any) -> Any:
        return self._counted(self._inner.dispose_executor, request)

    @property
    def is_ready(self) -> bool:
        return self._inner.is_ready


def count_task_client(client: TaskClient, count: WireCount) -> None:
    """Makes `client` (one instance) record every request it sends into `count`."""
    call = client.call
    send_and_forget = client.send_and_forget

    async def counted_call(
        silo_id: str, request: protobuf_message.Message, **options: Any
    ) -> protobuf_message.Message:
        response = await call(silo_id, request, **options)
        count.record(request, response)
        return response

    def counted_send_and_forget(silo_id: str, request: protobuf_message.Message) -> None:
        count.record(request, None)
        send_and_forget(silo_id, request)

    client.call = counted_call  # type: ignore[method-assign]
    client.send_and_forget = counted_send_and_forget  # type: ignore[method-assign]
