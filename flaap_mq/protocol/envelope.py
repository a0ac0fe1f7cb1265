"""The Task / TaskResult envelope: one TFF executor request per Task.

A Task travels in a message of its own (sliced when large), or with others
in a TaskBatch (`batch`).

Both sides of the wire use this module and nothing else to build or read an
envelope, so the mapping between a `RequestKind`, TFF's `executor_pb2`
request and response classes, and the gRPC method of TFF's executor service
lives in exactly one table (`KINDS`).

Nothing here imports TensorFlow Federated, which loads all of TensorFlow: the
silo worker, which only forwards bytes, never does (`bench/worker_start.py`). It
reads requests with `tff_executor_pb2`, TFF's executor messages declared
without TensorFlow (`protos/flaap_mq/v1/tff_executor.proto`); TFF's own
classes (`KindSpec.request_type`) are imported on first use, by the
coordinator, which runs TFF anyway.

The TFF payload is carried as serialized bytes. Value references in it are
names chosen by the coordinator (the task id of the Create* task that made
the value, see `task.proto`): the worker forwards a request without value
references (GetExecutor, CreateValue) untouched, and rewrites the names in
the others to its executor service's own references (`worker.values`).

Why one module of some 480 lines: it is the envelope both sides read the
same way, as the table of request kinds (`KINDS`, about 170 lines) and the
codec that writes and reads a kind's Task and TaskResult. Most callers use
both together (`spec_for_request` then `encode_task`, `read_task` then
`decode_request`). The table could move to a module of its own, with every
`envelope.KINDS` and `envelope.kind_name` in the code and docs renamed;
that was not done (issue 14's notes).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import importlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf import message as protobuf_message

from flaap_mq.protocol import chunking, wire
from flaap_mq.protocol.v1 import task_pb2, tff_executor_pb2

if TYPE_CHECKING:
    from tensorflow_federated.proto.v0 import executor_pb2

PROTOCOL_VERSION = 3
# What a worker runs: version 3 only adds the batch (`TaskBatch`), so a
# version 2 coordinator's tasks mean the same, and workers can be upgraded first.
SPOKEN_VERSIONS = frozenset({2, 3})

RequestKind = task_pb2.RequestKind
ErrorCode = task_pb2.ErrorCode


# The package of TFF's executor messages, and of the same messages declared
# without TensorFlow (`tff_executor_pb2`); a request of either is a request.
_TFF_PACKAGE = "tensorflow_federated.v0"
_LIGHT_PACKAGE = tff_executor_pb2.DESCRIPTOR.package
# Imported on first use only: importing it imports TFF and all of TensorFlow.
_TFF_EXECUTOR_MODULE = "tensorflow_federated.proto.v0.executor_pb2"

# A ValueRef of either: TFF's, or `tff_executor_pb2`'s (same fields).
ValueRef = Any


def _no_refs(_request: protobuf_message.Message) -> Sequence[ValueRef]:
    return ()


def _call_refs(request: protobuf_message.Message) -> Sequence[ValueRef]:
    refs = [request.function_ref]
    if request.HasField("argument_ref"):
        refs.append(request.argument_ref)
    return refs


@dataclasses.dataclass(frozen=True)
class KindSpec:
    """How one kind of TFF executor request travels.

    Its request and response messages are named after `name`: TFF's
    (`request_type`, imported on first use) and the same without TensorFlow
    (`light_request_type`, which the worker uses).
    """

    kind: int
    name: str  # the gRPC method of TFF's ExecutorGroup service, e.g. "CreateValue"
    # The request's ValueRef fields (mutable, in place), which name values; the
    # same fields in TFF's message and in the light one.
    value_refs: Callable[[protobuf_message.Message], Sequence[ValueRef]] = _no_refs
    # A Create* request: its task id names the value it makes.
    creates_value: bool = False
    # The answer carries data the sender needs (an executor id, a computed
    # value): such a task must have a reply_to. Others may be sent one-way.
    answers_with_data: bool = False
    # Takes effect only after every task sent before it has run, since those
    # may still use what it disposes of (the sender does not wait for them).
    disposes: bool = False

    @property
    def names_values(self) -> bool:
        """The request has ValueRef fields (all but GetExecutor and CreateValue)."""
        return self.value_refs is not _no_refs

    @property
    def request_type(self) -> type[protobuf_message.Message]:
        """TFF's request class (`executor_pb2`); the first use imports TFF."""
        return getattr(importlib.import_module(_TFF_EXECUTOR_MODULE), f"{self.name}Request")

    @property
    def response_type(self) -> type[protobuf_message.Message]:
        """TFF's response class (`executor_pb2`); the first use imports TFF."""
        return getattr(importlib.import_module(_TFF_EXECUTOR_MODULE), f"{self.name}Response")

    @property
    def light_request_type(self) -> type[protobuf_message.Message]:
        """The request declared without TensorFlow (`tff_executor_pb2`), same bytes."""
        return getattr(tff_executor_pb2, f"{self.name}Request")

    @property
    def light_response_type(self) -> type[protobuf_message.Message]:
        """The response declared without TensorFlow (`tff_executor_pb2`), same bytes."""
        return getattr(tff_executor_pb2, f"{self.name}Response")


KINDS: dict[int, KindSpec] = {
    spec.kind: spec
    for spec in (
        KindSpec(
            RequestKind.GET_EXECUTOR,
            "GetExecutor",
            answers_with_data=True,
        ),
        KindSpec(
            RequestKind.CREATE_VALUE,
            "CreateValue",
            creates_value=True,
        ),
        KindSpec(
            RequestKind.CREATE_CALL,
            "CreateCall",
            value_refs=_call_refs,
            creates_value=True,
        ),
        KindSpec(
            RequestKind.CREATE_STRUCT,
            "CreateStruct",
            value_refs=lambda r: [e.value_ref for e in r.element],
            creates_value=True,
        ),
        KindSpec(
            RequestKind.CREATE_SELECTION,
            "CreateSelection",
            value_refs=lambda r: [r.source_ref],
            creates_value=True,
        ),
        KindSpec(
            RequestKind.COMPUTE,
            "Compute",
            value_refs=lambda r: [r.value_ref],
            answers_with_data=True,
        ),
        KindSpec(
            RequestKind.DISPOSE,
            "Dispose",
            value_refs=lambda r: list(r.value_ref),
            disposes=True,
        ),
        KindSpec(
            RequestKind.DISPOSE_EXECUTOR,
            "DisposeExecutor",
            disposes=True,
        ),
    )
}
_KIND_BY_REQUEST_NAME = {
    f"{package}.{spec.name}Request": spec
    for spec in KINDS.values()
    for package in (_TFF_PACKAGE, _LIGHT_PACKAGE)
}
_KIND_BY_NAME = {spec.name: spec for spec in KINDS.values()}


def kind_name(kind: int) -> str:
    spec = KINDS.get(kind)
    return spec.name if spec else f"unknown kind {kind}"


def spec_named(name: str | None) -> KindSpec | None:
    """The kind whose name is `name` (as in a task's AMQP `type` property), if any."""
    return _KIND_BY_NAME.get(name or "")


def spec_for_request(request: protobuf_message.Message) -> KindSpec:
    """The kind of `request`, TFF's message or the light one (by its full name)."""
    descriptor = getattr(type(request), "DESCRIPTOR", None)
    try:
        return _KIND_BY_REQUEST_NAME[descriptor.full_name]
    except (KeyError, AttributeError):
        raise TypeError(f"{type(request).__name__} is not a TFF executor request") from None


class MalformedEnvelope(ValueError):
    """An AMQP body that is not a well-formed envelope; the message says why."""


def new_task_id() -> str:
    return uuid.uuid4().hex


@dataclasses.dataclass(frozen=True)
class SerializedRequest:
    """A TFF executor request already serialized, and its kind.

    A large request may be `chunking.Gathered` pieces (a CreateValue around a
    tensor's own memory, `create_value_request`): it is sent as it is, never
    joined into one `bytes`.
    """

    spec: KindSpec
    payload: chunking.Payload


Request = protobuf_message.Message | SerializedRequest


def serialized(request: Request) -> SerializedRequest:
    """`request` serialized, with its kind (as is if it already is)."""
    if isinstance(request, SerializedRequest):
        return request
    return SerializedRequest(spec_for_request(request), request.SerializeToString())


_CREATE_VALUE_FIELDS = tff_executor_pb2.CreateValueRequest.DESCRIPTOR.fields_by_name
_CREATE_VALUE_VALUE = _CREATE_VALUE_FIELDS["value"].number
_CREATE_VALUE_EXECUTOR = _CREATE_VALUE_FIELDS["executor"].number


def create_value_request(
    executor: executor_pb2.ExecutorId, value: executor_pb2.Value | chunking.Gathered
) -> SerializedRequest:
    """A CreateValueRequest, serialized without copying `value` into it.

    `CreateValueRequest(value=value)` deep-copies the value, and TFF keeps a
    tensor in a repeated field, so the copy walks every element (0.2 s per
    64 MiB here). An embedded message is written as its serialized bytes, so
    the request is the value's serialized bytes between two short fields,
    in the order protobuf writes them: the same bytes as
    `CreateValueRequest(executor=..., value=...).SerializeToString()`. A
    value already serialized as pieces (`coordinator.value_wire`) stays in
    pieces, which the messages are cut from (`encode_task`).
    """
    body = value if isinstance(value, chunking.Gathered) else value.SerializeToString()
    executor_bytes = executor.SerializeToString()
    fields = {
        _CREATE_VALUE_VALUE: (wire.field_head(_CREATE_VALUE_VALUE, len(body)), body),
        _CREATE_VALUE_EXECUTOR: (
            wire.field_head(_CREATE_VALUE_EXECUTOR, len(executor_bytes)),
            executor_bytes,
        ),
    }
    pieces = [piece for number in sorted(fields) for piece in fields[number]]
    return SerializedRequest(KINDS[RequestKind.CREATE_VALUE], chunking.Gathered(pieces))


def task_envelope(
    *,
    kind: int,
    job_id: str,
    silo_id: str,
    task_id: str,
    deadline_unix_ms: int = 0,
    incarnation: str = "",
) -> task_pb2.Task:
    """A Task without its request, to be sent with `encode_task`."""
    return task_pb2.Task(
        incarnation=incarnation,
        protocol_version=PROTOCOL_VERSION,
        task_id=task_id,
        job_id=job_id,
        silo_id=silo_id,
        deadline_unix_ms=deadline_unix_ms,
        kind=kind,
    )


_TASK_PAYLOAD = task_pb2.Task.DESCRIPTOR.fields_by_name["request"].number
_RESULT_PAYLOAD = task_pb2.TaskResult.DESCRIPTOR.fields_by_name["response"].number


def read_task(body: bytes) -> tuple[task_pb2.Task, memoryview]:
    """Decodes and checks a Task; its `request` is returned apart, as a view of `body`.

    The Task comes back without its request, which is not copied (a model
    can be hundreds of megabytes). Raises `MalformedEnvelope` naming the
    fault. An unknown protocol version is not malformed: the caller answers
    it with `UNSUPPORTED_PROTOCOL`, so it is returned, not raised.
    """
    task = task_pb2.Task()
    try:
        rest, request = wire.split_off(body, _TASK_PAYLOAD)
        task.ParseFromString(rest)
    except (wire.WireError, protobuf_message.DecodeError) as e:
        raise MalformedEnvelope(f"body is not a flaap_mq.v1.Task ({len(body)} bytes): {e}") from e
    if request is None:
        request = memoryview(b"")  # proto3: an empty request is not written
    if task.protocol_version not in SPOKEN_VERSIONS:
        return task, request
    missing = [f for f in ("task_id", "job_id", "silo_id") if not getattr(task, f)]
    if missing:
        raise MalformedEnvelope(f"task is missing {', '.join(missing)}")
    if task.kind not in KINDS:
        raise MalformedEnvelope(f"task {task.task_id} has unknown request kind {task.kind}")
    return task, request


def encode_task(
    task: task_pb2.Task, request: chunking.Payload, chunk_bytes: int
) -> Sequence[bytes]:
    """The messages carrying `task` (without its request) and `request` (see `_encode`)."""
    return _encode(task, _TASK_PAYLOAD, request, chunk_bytes)


def encode_result(
    result: task_pb2.TaskResult, response: chunking.Payload, chunk_bytes: int
) -> Sequence[bytes]:
    """The messages carrying `result` (without its response) and `response`."""
    return _encode(result, _RESULT_PAYLOAD, response, chunk_bytes)


def _encode(
    message: task_pb2.Task | task_pb2.TaskResult,
    number: int,
    payload: chunking.Payload,
    chunk_bytes: int,
) -> Sequence[bytes]:
    """One serialized message, or one per `chunk_bytes` slice of a larger payload.

    The payload is written after the serialized envelope, never copied into
    a protobuf message (concatenated messages merge): each byte of it is
    copied once, into the message that carries it (`bytes`, which pika
    needs), straight from the payload's own pieces. Slices are made as they
    are asked for (`Slices`), so that a sender that publishes a few at a time
    never holds the payload twice.
    """
    if len(payload) <= chunk_bytes:
        pieces = chunking.pieces_of(payload)
        head = message.SerializeToString() + wire.field_head(number, len(payload))
        return [b"".join((head, *pieces))]
    return Slices(message, number, payload, chunk_bytes)


class Slices(collections.abc.Sequence):  # type: ignore[type-arg]
    """The messages carrying a sliced payload, each made (its bytes copied) when indexed.

    Holds only views of the payload: `payload_size` is what it keeps alive.
    """

    def __init__(
        self,
        message: task_pb2.Task | task_pb2.TaskResult,
        number: int,
        payload: chunking.Payload,
        chunk_bytes: int,
    ) -> None:
        self._message = message
        self._number = number
        self._slices = list(chunking.sliced(payload, chunk_bytes))
        self.payload_size = len(payload)

    def __len__(self) -> int:
        return len(self._slices)

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]  # type: ignore[misc]
        header, part = self._slices[index]
        piece = type(self._message)()
        piece.CopyFrom(self._message)
        piece.chunk.CopyFrom(header)
        head = piece.SerializeToString() + wire.field_head(self._number, _size_of(part))
        return b"".join((head, *part))


def messages_size(messages: Sequence[bytes]) -> int:
    """The bytes `messages` (`_encode`'s) hold, without making any of them."""
    if isinstance(messages, Slices):
        return messages.payload_size
    return sum(len(m) for m in messages)


def _size_of(part: Sequence[memoryview]) -> int:
    """The bytes in one slice's views."""
    return sum(view.nbytes for view in part)


def decode_request(
    task: task_pb2.Task, payload: chunking.Buffer | None = None, *, light: bool = False
) -> protobuf_message.Message:
    """The task's request, parsed (from `payload`, if the caller read it already).

    As TFF's message, or with `light` as `tff_executor_pb2`'s, without
    TensorFlow: the worker's, which reads only executor ids and value refs.
    Both parse the same bytes, and refuse the same (a TFF `Value` apart,
    which the light message keeps serialized).
    """
    spec = KINDS[task.kind]
    request = (spec.light_request_type if light else spec.request_type)()
    try:
        request.ParseFromString(task.request if payload is None else payload)
    except protobuf_message.DecodeError as e:
        raise MalformedEnvelope(
            f"task {task.task_id}: request is not a valid {KINDS[task.kind].name}Request: {e}"
        ) from e
    return request


def executor_id_of(spec: KindSpec, request: chunking.Buffer) -> str:
    """The `executor.id` of a serialized `spec` request, without decoding the rest.

    Every TFF executor request but GetExecutor has an `ExecutorId executor`
    field. Skipping the other fields by their wire-format lengths spares a
    64 MiB CreateValue a full decode (and copy) just to learn its executor.
    """
    number = spec.light_request_type.DESCRIPTOR.fields_by_name["executor"].number
    found = ""
    try:
        for field, _, value_start, end in wire.fields(request):
            if field == number:
                found = tff_executor_pb2.ExecutorId.FromString(bytes(request[value_start:end])).id
    except (wire.WireError, protobuf_message.DecodeError) as e:
        raise MalformedEnvelope(f"request is not a valid {spec.name}Request: {e}") from e
    return found


def deadline_after(seconds: float | None) -> int:
    """Deadline `seconds` from now in Unix milliseconds; 0 (none) for None."""
    if seconds is None:
        return 0
    return int((time.time() + seconds) * 1000)


def deadline_passed(task: task_pb2.Task, now_unix_ms: int | None = None) -> bool:
    if not task.deadline_unix_ms:
        return False
    now = int(time.time() * 1000) if now_unix_ms is None else now_unix_ms
    return now >= task.deadline_unix_ms


def result_ok(
    task: task_pb2.Task, response: bytes | None, *, incarnation: str, duration_us: int
) -> task_pb2.TaskResult:
    """A successful result; without the response if None (see `encode_result`)."""
    result = task_pb2.TaskResult(
        protocol_version=PROTOCOL_VERSION,
        task_id=task.task_id,
        silo_id=task.silo_id,
        kind=task.kind,
        worker_incarnation=incarnation,
        duration_us=duration_us,
    )
    if response is not None:
        result.response = response
    return result


class Failure(enum.Enum):
    """Error codes with whether TFF may retry the invocation after them."""

    EXECUTOR_ERROR = (ErrorCode.EXECUTOR_ERROR, False)
    MALFORMED_TASK = (ErrorCode.MALFORMED_TASK, False)
    UNSUPPORTED_PROTOCOL = (ErrorCode.UNSUPPORTED_PROTOCOL, False)
    EXECUTOR_UNAVAILABLE = (ErrorCode.EXECUTOR_UNAVAILABLE, True)
    STATE_LOST = (ErrorCode.STATE_LOST, True)
    DEADLINE_EXCEEDED = (ErrorCode.DEADLINE_EXCEEDED, False)
    WRONG_SILO = (ErrorCode.WRONG_SILO, False)
    # Resending the whole request can succeed: retryable.
    CHUNK_INVALID = (ErrorCode.CHUNK_INVALID, True)

    @property
    def code(self) -> int:
        return self.value[0]

    @property
    def retryable(self) -> bool:
        return self.value[1]


def result_error(
    *,
    task_id: str,
    silo_id: str,
    kind: int,
    failure: Failure,
    message: str,
    incarnation: str,
    duration_us: int = 0,
) -> task_pb2.TaskResult:
    return task_pb2.TaskResult(
        protocol_version=PROTOCOL_VERSION,
        task_id=task_id,
        silo_id=silo_id,
        kind=kind,
        error=task_pb2.Error(code=failure.code, message=message, retryable=failure.retryable),
        worker_incarnation=incarnation,
        duration_us=duration_us,
    )


def read_result(body: bytes) -> tuple[task_pb2.TaskResult, memoryview]:
    """Decodes and checks a TaskResult; its `response` apart, as a view of `body`."""
    result = task_pb2.TaskResult()
    try:
        rest, response = wire.split_off(body, _RESULT_PAYLOAD)
        result.ParseFromString(rest)
    except (wire.WireError, protobuf_message.DecodeError) as e:
        raise MalformedEnvelope(f"body is not a flaap_mq.v1.TaskResult: {e}") from e
    if not result.task_id:
        raise MalformedEnvelope("result has no task_id")
    if response is None:
        if result.WhichOneof("outcome") is None:
            raise MalformedEnvelope(f"result {result.task_id} has neither response nor error")
        response = memoryview(b"")
    return result, response
