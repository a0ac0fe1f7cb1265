"""Splitting large payloads over several messages, and putting them back."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaap_mq.protocol import chunking, envelope
from flaap_mq.protocol.v1 import task_pb2


def _split(payload: bytes, size: int) -> list[tuple[task_pb2.Chunk, bytes]]:
    return [(header, bytes(part)) for header, part in chunking.slices(payload, size)]


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=5000), size=st.integers(min_value=1, max_value=700))
def test_any_payload_reassembles_exactly(payload, size):
    parts = _split(payload, size)
    assert len(parts) == max(1, -(-len(payload) // size))
    assert all(len(part) <= size for _, part in parts)
    reassembler = chunking.Reassembler()
    results = [reassembler.add("t", header, part) for header, part in parts]
    assert results[-1].join() == payload
    assert all(r is None for r in results[:-1])
    assert reassembler.pending_bytes == 0


def test_corrupt_slice_fails_the_digest_check():
    parts = _split(os.urandom(100), 30)
    reassembler = chunking.Reassembler()
    for header, part in parts[:-1]:
        reassembler.add("t", header, part)
    header, part = parts[-1]
    whole = reassembler.add("t", header, bytes([part[0] ^ 1]) + part[1:])
    with pytest.raises(chunking.ChunkError, match="SHA-256"):
        whole.join()


def test_last_slice_without_the_others_is_missing_chunks():
    header, part = _split(os.urandom(100), 30)[-1]
    with pytest.raises(chunking.ChunksMissing, match="not the earlier ones"):
        chunking.Reassembler().add("t", header, part)


def test_a_gap_is_missing_chunks_and_frees_memory():
    parts = _split(os.urandom(100), 30)
    reassembler = chunking.Reassembler()
    reassembler.add("t", *parts[0])
    with pytest.raises(chunking.ChunksMissing, match="some were lost"):
        reassembler.add("t", *parts[2])
    assert reassembler.pending_bytes == 0


def test_redelivered_slice_is_ignored():
    payload = os.urandom(100)
    parts = _split(payload, 30)
    reassembler = chunking.Reassembler()
    reassembler.add("t", *parts[0])
    assert reassembler.add("t", *parts[0]) is None
    for header, part in parts[1:-1]:
        reassembler.add("t", header, part)
    assert reassembler.add("t", *parts[-1]).join() == payload


def test_memory_is_bounded():
    parts = _split(os.urandom(100), 30)
    reassembler = chunking.Reassembler(max_bytes=50)
    reassembler.add("t", *parts[0])
    with pytest.raises(chunking.ChunkError, match="more than 50 bytes"):
        reassembler.add("t", *parts[1])
    assert reassembler.pending_bytes == 0


def test_encode_task_keeps_every_envelope_field_on_every_slice():
    request = os.urandom(1000)
    task = task_pb2.Task(
        protocol_version=2,
        task_id="t",
        job_id="j",
        silo_id="s",
        attempt=2,
        deadline_unix_ms=5,
        kind=envelope.RequestKind.CREATE_VALUE,
        incarnation="i",
    )
    messages = envelope.encode_task(task, request, 300)
    assert len(messages) == 4
    reassembler = chunking.Reassembler()
    for message in messages:
        part, payload = envelope.read_task(message)
        assert (part.task_id, part.job_id, part.silo_id, part.attempt, part.kind) == (
            "t",
            "j",
            "s",
            2,
            envelope.RequestKind.CREATE_VALUE,
        )
        assert part.incarnation == "i"
        whole = reassembler.add(part.task_id, part.chunk, payload)
    assert whole.join() == request
    [single] = envelope.encode_task(task, request, 1000)
    assert envelope.parse_task(single) == task_pb2.Task(request=request, **_fields(task))
    assert chunking.headers(3, 4) == {chunking.CHUNK_HEADER: "4/4"}
    assert chunking.headers(0, 1) is None


def _fields(message):
    return {f.name: v for f, v in message.ListFields()}


def test_encode_result_slices_only_large_responses():
    result = task_pb2.TaskResult(task_id="t", silo_id="s", worker_incarnation="i")
    [small] = envelope.encode_result(result, b"x", 100)
    assert envelope.parse_result(small).response == b"x"
    response = os.urandom(1000)
    parts = [envelope.read_result(m) for m in envelope.encode_result(result, response, 400)]
    assert [p.chunk.index for p, _ in parts] == [0, 1, 2]
    assert all(p.worker_incarnation == "i" for p, _ in parts)
    assert b"".join(bytes(payload) for _, payload in parts) == response
