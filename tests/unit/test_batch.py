"""The TaskBatch codec: several tasks in one message, read back and checked whole."""

from __future__ import annotations

import pytest
from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.protocol import batch, envelope
from flaap_mq.protocol.v1 import task_pb2


def _batched(*task_ids: str) -> list[tuple[task_pb2.Task, bytes]]:
    out = []
    for task_id in task_ids:
        request = executor_pb2.ComputeRequest(
            executor=executor_pb2.ExecutorId(id="x"),
            value_ref=executor_pb2.ValueRef(id=f"v-{task_id}"),
        )
        task = envelope.task_envelope(
            kind=envelope.RequestKind.COMPUTE, job_id="job-1", silo_id="a", task_id=task_id
        )
        out.append((task, request.SerializeToString()))
    return out


def test_a_batch_round_trips_its_tasks_in_order():
    tasks = _batched("t1", "t2", "t3")
    read = batch.read_batch(batch.encode_batch(tasks))
    assert [t.task_id for t, _ in read] == ["t1", "t2", "t3"]
    assert [bytes(r) for _, r in read] == [r for _, r in tasks]
    assert all(t.protocol_version == envelope.PROTOCOL_VERSION for t, _ in read)


def test_an_older_worker_reads_a_batch_as_a_task_of_a_version_it_does_not_speak():
    """So a version 2 worker answers UNSUPPORTED_PROTOCOL, not a confusing error."""
    as_task = task_pb2.Task.FromString(batch.encode_batch(_batched("t1", "t2")))
    assert as_task.protocol_version == envelope.PROTOCOL_VERSION == 3
    assert [f.name for f, _ in as_task.ListFields()] == ["protocol_version"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\xff\xff\xff", "is not a flaap_mq.v1.TaskBatch"),
        (task_pb2.TaskBatch(protocol_version=3).SerializeToString(), "holds 1 to 256 tasks"),
        (
            task_pb2.TaskBatch(protocol_version=3, tasks=[b"x"] * 257).SerializeToString(),
            "holds 1 to 256 tasks",
        ),
        (
            task_pb2.TaskBatch(
                protocol_version=3, tasks=[task_pb2.Task(protocol_version=3).SerializeToString()]
            ).SerializeToString(),
            "task 0 of the batch: task is missing",
        ),
    ],
)
def test_a_malformed_batch_is_refused_whole_with_the_reason(body, says):
    with pytest.raises(envelope.MalformedEnvelope, match=says) as raised:
        batch.read_batch(body)
    assert not isinstance(raised.value, batch.UnsupportedProtocol)


def test_a_batch_of_another_version_is_unsupported():
    body = task_pb2.TaskBatch(protocol_version=4, tasks=[b""]).SerializeToString()
    with pytest.raises(batch.UnsupportedProtocol, match="version 4 is not supported"):
        batch.read_batch(body)


@pytest.mark.parametrize("fault", ["older_part", "slice"])
def test_a_batch_part_of_another_version_or_a_slice_is_refused(fault):
    tasks = _batched("t1", "t2")
    task = tasks[1][0]
    if fault == "older_part":
        task.protocol_version = 2
    else:
        task.chunk.CopyFrom(task_pb2.Chunk(index=0, count=2, total_size=10))
    with pytest.raises(envelope.MalformedEnvelope, match="task 1 of the batch"):
        batch.read_batch(batch.encode_batch(tasks))


def test_encode_batch_refuses_an_empty_or_oversized_batch():
    with pytest.raises(ValueError, match="1 to 256"):
        batch.encode_batch([])
    with pytest.raises(ValueError, match="1 to 256"):
        batch.encode_batch(_batched(*(f"t{i}" for i in range(257))))
