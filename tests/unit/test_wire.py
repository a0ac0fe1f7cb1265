"""Protobuf wire format around one large bytes field (pure logic)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaap_mq.protocol import wire
from flaap_mq.protocol.v1 import task_pb2

REQUEST = task_pb2.Task.DESCRIPTOR.fields_by_name["request"].number


@settings(max_examples=200, deadline=None)
@given(
    task_id=st.text(max_size=40),
    version=st.integers(min_value=0, max_value=2**32 - 1),
    deadline=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    request=st.binary(max_size=3000),
)
def test_split_off_and_append_round_trip_any_task(task_id, version, deadline, request):
    task = task_pb2.Task(
        task_id=task_id, protocol_version=version, deadline_unix_ms=deadline, request=request
    )
    rest, payload = wire.split_off(task.SerializeToString(), REQUEST)
    # proto3 does not write an empty bytes field: then it is absent.
    assert (payload is None) == (request == b"")
    assert bytes(payload or b"") == request
    header = task_pb2.Task.FromString(rest)
    assert header.request == b""
    assert (header.task_id, header.protocol_version, header.deadline_unix_ms) == (
        task_id,
        version,
        deadline,
    )
    rebuilt = rest + wire.field_head(REQUEST, len(request)) + request
    assert task_pb2.Task.FromString(rebuilt) == task


def test_the_payload_view_is_not_a_copy():
    body = task_pb2.Task(task_id="t", request=b"x" * 1000).SerializeToString()
    _, payload = wire.split_off(body, REQUEST)
    assert payload.obj is body


def test_the_last_occurrence_of_a_field_wins_as_in_protobuf():
    first = task_pb2.Task(request=b"first").SerializeToString()
    body = first + wire.field_head(REQUEST, len(b"second")) + b"second"
    assert task_pb2.Task.FromString(body).request == b"second"
    assert bytes(wire.split_off(body, REQUEST)[1]) == b"second"


@pytest.mark.parametrize(
    "garbage",
    [b"\x0f", b"\x42\x05ab", b"\x80", b"\x00\x01", b"\x42" + b"\xff" * 11],
)
def test_bytes_that_are_not_a_message_are_refused(garbage):
    with pytest.raises(wire.WireError):
        wire.split_off(garbage, REQUEST)


def test_a_body_of_countless_tiny_fields_is_refused_at_once():
    """64 MiB of 2-byte fields would hold a reading thread for seconds: refused early."""
    task = task_pb2.Task(task_id="t", request=b"x").SerializeToString()
    flood = task + b"\x28\x01" * (
        32 * 1024 * 1024
    )  # field 5 (reserved, once attempt), again and again
    with pytest.raises(wire.WireError, match="top-level fields"):
        wire.split_off(flood, REQUEST)
    # A real envelope is far below the limit.
    assert len(list(wire.fields(task))) < wire.MAX_FIELDS
