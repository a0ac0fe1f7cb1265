"""The Task / TaskResult envelope: one TFF executor request per AMQP message.

Both sides of the wire use this module and nothing else to build or read an
envelope, so the mapping between a `RequestKind`, TFF's `executor_pb2`
request and response classes, and the gRPC method of TFF's executor service
lives in exactly one table (`KINDS`).

The TFF payload is carried as serialized bytes: the worker forwards it to its
executor service after checking the envelope, and only parses the executor id
out of it (see `worker.incarnation`).
"""

from __future__ import annotations

import dataclasses
import enum
import time
import uuid

from google.protobuf import message as protobuf_message
from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.protocol import chunking
from flaap_mq.protocol.v1 import task_pb2

PROTOCOL_VERSION = 1

RequestKind = task_pb2.RequestKind
ErrorCode = task_pb2.ErrorCode


@dataclasses.dataclass(frozen=True)
class KindSpec:
    """How one kind of TFF executor request travels."""

    kind: int
    name: str  # the gRPC method of TFF's ExecutorGroup service, e.g. "CreateValue"
    request_type: type[protobuf_message.Message]
    response_type: type[protobuf_message.Message]


KINDS: dict[int, KindSpec] = {
    spec.kind: spec
    for spec in (
        KindSpec(
            RequestKind.GET_EXECUTOR,
            "GetExecutor",
            executor_pb2.GetExecutorRequest,
            executor_pb2.GetExecutorResponse,
        ),
        KindSpec(
            RequestKind.CREATE_VALUE,
            "CreateValue",
            executor_pb2.CreateValueRequest,
            executor_pb2.CreateValueResponse,
        ),
        KindSpec(
            RequestKind.CREATE_CALL,
            "CreateCall",
            executor_pb2.CreateCallRequest,
            executor_pb2.CreateCallResponse,
        ),
        KindSpec(
            RequestKind.CREATE_STRUCT,
            "CreateStruct",
            executor_pb2.CreateStructRequest,
            executor_pb2.CreateStructResponse,
        ),
        KindSpec(
            RequestKind.CREATE_SELECTION,
            "CreateSelection",
            executor_pb2.CreateSelectionRequest,
            executor_pb2.CreateSelectionResponse,
        ),
        KindSpec(
            RequestKind.COMPUTE,
            "Compute",
            executor_pb2.ComputeRequest,
            executor_pb2.ComputeResponse,
        ),
        KindSpec(
            RequestKind.DISPOSE,
            "Dispose",
            executor_pb2.DisposeRequest,
            executor_pb2.DisposeResponse,
        ),
        KindSpec(
            RequestKind.DISPOSE_EXECUTOR,
            "DisposeExecutor",
            executor_pb2.DisposeExecutorRequest,
            executor_pb2.DisposeExecutorResponse,
        ),
    )
}
_KIND_BY_REQUEST_TYPE = {spec.request_type: spec for spec in KINDS.values()}


def kind_name(kind: int) -> str:
    spec = KINDS.get(kind)
    return spec.name if spec else f"unknown kind {kind}"


def spec_for_request(request: protobuf_message.Message) -> KindSpec:
    try:
        return _KIND_BY_REQUEST_TYPE[type(request)]
    except KeyError:
        raise TypeError(f"{type(request).__name__} is not a TFF executor request") from None


class MalformedEnvelope(ValueError):
    """An AMQP body that is not a well-formed envelope; the message says why."""


def new_task_id() -> str:
    return uuid.uuid4().hex


def build_task(
    *,
    request: protobuf_message.Message,
    job_id: str,
    silo_id: str,
    task_id: str,
    deadline_unix_ms: int = 0,
    attempt: int = 1,
) -> task_pb2.Task:
    spec = spec_for_request(request)
    return task_pb2.Task(
        protocol_version=PROTOCOL_VERSION,
        task_id=task_id,
        job_id=job_id,
        silo_id=silo_id,
        attempt=attempt,
        deadline_unix_ms=deadline_unix_ms,
        kind=spec.kind,
        request=request.SerializeToString(),
    )


def parse_task(body: bytes) -> task_pb2.Task:
    """Decodes and checks a Task; raises `MalformedEnvelope` naming the fault.

    An unknown protocol version is not malformed: the caller answers it with
    `UNSUPPORTED_PROTOCOL`, so it is returned, not raised.
    """
    task = task_pb2.Task()
    try:
        task.ParseFromString(body)
    except protobuf_message.DecodeError as e:
        raise MalformedEnvelope(f"body is not a flaap_mq.v1.Task ({len(body)} bytes): {e}") from e
    if task.protocol_version != PROTOCOL_VERSION:
        return task
    missing = [f for f in ("task_id", "job_id", "silo_id") if not getattr(task, f)]
    if missing:
        raise MalformedEnvelope(f"task is missing {', '.join(missing)}")
    if task.kind not in KINDS:
        raise MalformedEnvelope(f"task {task.task_id} has unknown request kind {task.kind}")
    return task


def decode_request(task: task_pb2.Task) -> protobuf_message.Message:
    request = KINDS[task.kind].request_type()
    try:
        request.ParseFromString(task.request)
    except protobuf_message.DecodeError as e:
        raise MalformedEnvelope(
            f"task {task.task_id}: request is not a valid {KINDS[task.kind].name}Request: {e}"
        ) from e
    return request


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
    task: task_pb2.Task, response: bytes, *, incarnation: str, duration_us: int
) -> task_pb2.TaskResult:
    return task_pb2.TaskResult(
        protocol_version=PROTOCOL_VERSION,
        task_id=task.task_id,
        silo_id=task.silo_id,
        kind=task.kind,
        response=response,
        worker_incarnation=incarnation,
        duration_us=duration_us,
    )


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


def parse_result(body: bytes) -> task_pb2.TaskResult:
    result = task_pb2.TaskResult()
    try:
        result.ParseFromString(body)
    except protobuf_message.DecodeError as e:
        raise MalformedEnvelope(f"body is not a flaap_mq.v1.TaskResult: {e}") from e
    if not result.task_id:
        raise MalformedEnvelope("result has no task_id")
    if result.WhichOneof("outcome") is None:
        raise MalformedEnvelope(f"result {result.task_id} has neither response nor error")
    return result


Envelope = task_pb2.Task | task_pb2.TaskResult


def _split_payload(message: Envelope, field: str, chunk_bytes: int) -> list[Envelope]:
    """One copy of `message` per slice of its payload `field`, each with its `Chunk`."""
    template = type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.name == field:
            continue  # copying a huge payload only to replace it would double memory
        if descriptor.message_type is not None:
            getattr(template, descriptor.name).CopyFrom(value)
        else:
            setattr(template, descriptor.name, value)
    parts = []
    payload = getattr(message, field)  # read once: each read copies the bytes
    for header, part in chunking.slices(payload, chunk_bytes):
        piece = type(message)()
        piece.CopyFrom(template)
        setattr(piece, field, bytes(part))
        piece.chunk.CopyFrom(header)
        parts.append(piece)
    return parts


def split_task(task: task_pb2.Task, chunk_bytes: int) -> list[task_pb2.Task]:
    """The task itself, or one task per slice of a request over `chunk_bytes`."""
    if len(task.request) <= chunk_bytes:
        return [task]
    return _split_payload(task, "request", chunk_bytes)


def split_result(result: bytes, chunk_bytes: int) -> list[bytes]:
    """A serialized result as is, or one serialized result per slice of its response."""
    if len(result) <= chunk_bytes:
        return [result]
    parsed = task_pb2.TaskResult.FromString(result)
    if parsed.WhichOneof("outcome") != "response":
        return [result]
    return [p.SerializeToString() for p in _split_payload(parsed, "response", chunk_bytes)]
