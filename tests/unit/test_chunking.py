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
    if len(parts) == 1:
        assert results == [None] or results == [payload]
    assert results[-1] == payload
    assert all(r is None for r in results[:-1])
    assert reassembler.pending_bytes == 0


def test_corrupt_slice_fails_the_digest_check():
    parts = _split(os.urandom(100), 30)
    reassembler = chunking.Reassembler()
    for header, part in parts[:-1]:
        reassembler.add("t", header, part)
    header, part = parts[-1]
    with pytest.raises(chunking.ChunkError, match="SHA-256"):
        reassembler.add("t", header, bytes([part[0] ^ 1]) + part[1:])


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
    assert reassembler.add("t", *parts[-1]) == payload


def test_memory_is_bounded():
    parts = _split(os.urandom(100), 30)
    reassembler = chunking.Reassembler(max_bytes=50)
    reassembler.add("t", *parts[0])
    with pytest.raises(chunking.ChunkError, match="more than 50 bytes"):
        reassembler.add("t", *parts[1])
    assert reassembler.pending_bytes == 0


def test_split_task_keeps_every_envelope_field():
    task = task_pb2.Task(
        protocol_version=1,
        task_id="t",
        job_id="j",
        silo_id="s",
        attempt=2,
        deadline_unix_ms=5,
        kind=envelope.RequestKind.CREATE_VALUE,
        request=os.urandom(1000),
    )
    parts = envelope.split_task(task, 300)
    assert len(parts) == 4
    reassembler = chunking.Reassembler()
    for part in parts:
        assert (part.task_id, part.job_id, part.silo_id, part.attempt, part.kind) == (
            "t",
            "j",
            "s",
            2,
            envelope.RequestKind.CREATE_VALUE,
        )
        assert chunking.headers(part.chunk)[chunking.CHUNK_HEADER].endswith("/4")
        whole = reassembler.add(part.task_id, part.chunk, part.request)
    assert whole == task.request
    assert envelope.split_task(task, 1000) == [task]


def test_split_result_leaves_errors_and_small_results_alone():
    small = task_pb2.TaskResult(task_id="t", response=b"x").SerializeToString()
    assert envelope.split_result(small, 100) == [small]
    big = task_pb2.TaskResult(task_id="t", response=os.urandom(1000)).SerializeToString()
    parts = [task_pb2.TaskResult.FromString(p) for p in envelope.split_result(big, 400)]
    assert [p.chunk.index for p in parts] == [0, 1, 2]
    assert b"".join(p.response for p in parts) == task_pb2.TaskResult.FromString(big).response
