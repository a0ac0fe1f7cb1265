"""The TaskBatch: several Tasks for one silo in one AMQP message (protocol version 3).

A chain of small requests (CreateValue, CreateCall, then the Compute that
needs them) costs one persistent, confirmed message instead of one each:
the coordinator's `outbox` decides what travels together, the worker's
`intake` splits a batch into its tasks, and `request.DeliveryFate` acks the
message once all of them are done. Each task in a batch is encoded exactly
as it would be alone (`envelope.encode_task`, never sliced), and read back
and checked as it would be alone (`envelope.read_task`).

Nothing here imports TensorFlow (the worker reads batches).
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import message as protobuf_message

from flaap_mq.protocol import chunking, envelope
from flaap_mq.protocol.v1 import task_pb2

# The most tasks one batch may carry: a worker refuses more (a hostile batch
# must not make it hold unbounded work), and the coordinator never sends more.
MAX_BATCH_TASKS = 256


class UnsupportedProtocol(envelope.MalformedEnvelope):
    """A batch of a protocol version this worker does not speak."""


def encode_batch(tasks: Sequence[tuple[task_pb2.Task, chunking.Payload]]) -> bytes:
    """One message carrying `tasks` (each a task without its request, and the request).

    The caller keeps the batch within the broker's message limit.
    """
    if not 1 <= len(tasks) <= MAX_BATCH_TASKS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_TASKS} tasks, not {len(tasks)}")
    # A chunk size of the request's own size: one message, never slices.
    encoded = [envelope.encode_task(task, request, len(request))[0] for task, request in tasks]
    return task_pb2.TaskBatch(
        protocol_version=envelope.PROTOCOL_VERSION, tasks=encoded
    ).SerializeToString()


def read_batch(body: bytes) -> list[tuple[task_pb2.Task, memoryview]]:
    """Decodes and checks a TaskBatch: its tasks, each read and checked as `read_task` does.

    Raises `MalformedEnvelope` naming the fault (`UnsupportedProtocol` for a
    version this worker does not speak): a batch is run whole or not at all.
    """
    batch = task_pb2.TaskBatch()
    try:
        batch.ParseFromString(body)
    except protobuf_message.DecodeError as e:
        raise envelope.MalformedEnvelope(
            f"body is not a flaap_mq.v1.TaskBatch ({len(body)} bytes): {e}"
        ) from e
    version = envelope.PROTOCOL_VERSION
    if batch.protocol_version != version:
        raise UnsupportedProtocol(
            f"a batch of protocol version {batch.protocol_version} is not supported by this "
            f"worker (it speaks {version}); upgrade the worker or coordinator"
        )
    if not 1 <= len(batch.tasks) <= MAX_BATCH_TASKS:
        raise envelope.MalformedEnvelope(
            f"a batch holds 1 to {MAX_BATCH_TASKS} tasks, this one {len(batch.tasks)}"
        )
    tasks = []
    for i, encoded in enumerate(batch.tasks):
        try:
            task, request = envelope.read_task(encoded)
        except envelope.MalformedEnvelope as e:
            raise envelope.MalformedEnvelope(f"task {i} of the batch: {e}") from e
        if task.protocol_version != version:
            raise envelope.MalformedEnvelope(
                f"task {i} of the batch has protocol version {task.protocol_version}, "
                f"the batch {version}"
            )
        if task.HasField("chunk"):
            raise envelope.MalformedEnvelope(
                f"task {i} of the batch is a slice; slices travel alone"
            )
        tasks.append((task, request))
    return tasks
