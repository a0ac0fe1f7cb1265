"""Splitting large payloads over several messages, and putting them back, within bounds."""

from __future__ import annotations

import hashlib
import os
import random
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaap_mq.protocol import chunking, collector, envelope, wire
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.testing.messages import parse_result, parse_task


def _split(payload: bytes, size: int) -> list[tuple[task_pb2.Chunk, bytes]]:
    return [(header, b"".join(part)) for header, part in chunking.sliced(payload, size)]


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=5000), size=st.integers(min_value=1, max_value=700))
def test_any_payload_reassembles_exactly(payload, size):
    parts = _split(payload, size)
    assert len(parts) == max(1, -(-len(payload) // size))
    assert all(len(part) <= size for _, part in parts)
    receiver = collector.Collector()
    results = [receiver.add("t", header, part) for header, part in parts]
    assert results[-1].view() == payload
    assert all(r is None for r in results[:-1])
    assert receiver.pinned_bytes == 0


def test_corrupt_slice_fails_the_digest_check():
    parts = _split(os.urandom(100), 30)
    receiver = collector.Collector()
    for header, part in parts[:-1]:
        receiver.add("t", header, part)
    header, part = parts[-1]
    whole = receiver.add("t", header, bytes([part[0] ^ 1]) + part[1:])
    with pytest.raises(chunking.ChunkError, match="SHA-256"):
        whole.view()


def test_last_slice_without_the_others_is_missing_chunks():
    header, part = _split(os.urandom(100), 30)[-1]
    with pytest.raises(collector.ChunksMissing, match="not the earlier ones"):
        collector.Collector().add("t", header, part)


def test_a_gap_is_missing_chunks_and_frees_memory():
    parts = _split(os.urandom(100), 30)
    receiver = collector.Collector()
    receiver.add("t", *parts[0])
    with pytest.raises(collector.ChunksMissing, match="some were lost"):
        receiver.add("t", *parts[2])
    assert receiver.pinned_bytes == 0


def test_redelivered_slice_is_ignored():
    payload = os.urandom(100)
    parts = _split(payload, 30)
    receiver = collector.Collector()
    receiver.add("t", *parts[0])
    assert receiver.add("t", *parts[0]) is None
    for header, part in parts[1:-1]:
        receiver.add("t", header, part)
    assert receiver.add("t", *parts[-1]).view() == payload


def test_memory_is_bounded():
    parts = _split(os.urandom(3000), 1000)
    # Room for the first transfer's slices, but not for a second transfer's.
    budget = collector.TRANSFER_COST + 1 + 3000 + 3 * collector.SLICE_COST
    receiver = collector.Collector(collector.Limits(max_pending_bytes=budget))
    receiver.add("t", *parts[0])
    with pytest.raises(chunking.ChunkError, match="does not fit"):
        receiver.add("u", *parts[0])
    assert receiver.pinned_bytes == collector.TRANSFER_COST + 1 + 3000 + collector.SLICE_COST
    receiver.discard("t")
    assert receiver.pinned_bytes == 0


def test_encode_task_keeps_every_envelope_field_on_every_slice():
    request = os.urandom(1000)
    task = task_pb2.Task(
        protocol_version=2,
        task_id="t",
        job_id="j",
        silo_id="s",
        deadline_unix_ms=5,
        kind=envelope.RequestKind.CREATE_VALUE,
        incarnation="i",
    )
    messages = envelope.encode_task(task, request, 300)
    assert len(messages) == 4
    receiver = collector.Collector()
    for message in messages:
        part, payload = envelope.read_task(message)
        assert (part.task_id, part.job_id, part.silo_id, part.deadline_unix_ms, part.kind) == (
            "t",
            "j",
            "s",
            5,
            envelope.RequestKind.CREATE_VALUE,
        )
        assert part.incarnation == "i"
        whole = receiver.add(part.task_id, part.chunk, payload)
    assert whole.view() == request
    [single] = envelope.encode_task(task, request, 1000)
    assert parse_task(single) == task_pb2.Task(request=request, **_fields(task))
    assert chunking.headers(3, 4) == {chunking.CHUNK_HEADER: "4/4"}
    assert chunking.headers(0, 1) is None


def _fields(message):
    return {f.name: v for f, v in message.ListFields()}


def test_encode_result_slices_only_large_responses():
    result = task_pb2.TaskResult(task_id="t", silo_id="s", worker_incarnation="i")
    [small] = envelope.encode_result(result, b"x", 100)
    assert parse_result(small).response == b"x"
    response = os.urandom(1000)
    parts = [envelope.read_result(m) for m in envelope.encode_result(result, response, 400)]
    assert [p.chunk.index for p, _ in parts] == [0, 1, 2]
    assert all(p.worker_incarnation == "i" for p, _ in parts)
    assert b"".join(bytes(payload) for _, payload in parts) == response


# ------------------------------------------------------------------ bounds
# What a hostile sender's slices can make a receiver hold: never more than
# the receiver's limits, charged at what the messages really pin.

REQUEST_FIELD = task_pb2.Task.DESCRIPTOR.fields_by_name["request"].number
MiB = 1024 * 1024


class Body(bytearray):
    """A message body the tests can watch: alive exactly as long as something holds it."""


def _message(task_id: str, chunk: task_pb2.Chunk, payload_fields: list[bytes]) -> Body:
    """A Task slice as any sender could write it, its payload field written once or more.

    Concatenated protobuf fields merge and the last one wins, so a body with
    the field repeated reads as its last slice, but is as large as all of them.
    """
    task = envelope.task_envelope(
        kind=envelope.RequestKind.CREATE_VALUE, job_id="j", silo_id="s", task_id=task_id
    )
    task.chunk.CopyFrom(chunk)
    key = wire.varint(REQUEST_FIELD << 3 | 2)
    fields = [key + wire.varint(len(f)) + f for f in payload_fields]
    return Body(b"".join([task.SerializeToString(), *fields]))


def _deliver(
    receiver: collector.Collector, body: Body, expires_at: float | None = None
) -> collector.Parts | None:
    """What either side does with a message: read it, collect it if it is a slice."""
    task, payload = envelope.read_task(body)
    if not chunking.is_chunked(task.chunk):
        return None
    return receiver.add(task.task_id, task.chunk, payload, expires_at=expires_at)


def test_a_slice_is_copied_into_its_transfer_and_its_message_let_go():
    header, part = _split(os.urandom(3000), 1000)[0]
    body = _message("t", header, [bytes(300), bytes(part)])  # 300 dead bytes, within slack
    alive = weakref.ref(body)
    receiver = collector.Collector()
    assert _deliver(receiver, body) is None
    del body
    assert alive() is None  # not kept: the slice was written into the transfer's buffer
    # Charged its buffer, the whole declared payload, from the first slice on.
    assert receiver.pinned_bytes == (
        collector.TRANSFER_COST + len("t") + 3000 + collector.SLICE_COST
    )


def test_a_message_repeating_its_payload_field_is_refused_not_held():
    # 4-byte slices; the first one's message also carries 16 MiB of earlier
    # payload fields, which a view of its last field would keep alive.
    header, part = _split(os.urandom(8), 4)[0]
    body = _message("t", header, [bytes(MiB)] * 16 + [bytes(part)])
    alive = weakref.ref(body)
    receiver = collector.Collector()
    with pytest.raises(chunking.ChunkError, match="payload written more than once"):
        _deliver(receiver, body)
    del body
    assert alive() is None
    assert receiver.pinned_bytes == 0
    assert receiver.partial_count == 0


@pytest.mark.parametrize(
    ("declared", "refusal"),
    [
        ({"total_size": 2**40}, "declares a payload of 1099511627776 bytes, over this receiver"),
        ({"count": 10**6}, "declares 1000000 chunks, over this receiver's limit of 16384"),
        ({"sha256": b"short"}, "digest is 5 bytes"),
    ],
)
def test_a_transfer_declaring_too_much_is_refused_at_its_first_slice(declared, refusal):
    header, part = _split(os.urandom(3000), 1000)[0]
    for name, value in declared.items():
        setattr(header, name, value)
    receiver = collector.Collector()
    with pytest.raises(chunking.ChunkError, match=refusal):
        receiver.add("t", header, part)
    assert receiver.pinned_bytes == 0


def test_slices_adding_up_to_more_or_less_than_declared_are_refused():
    payload = os.urandom(3000)
    headers = [header for header, _ in _split(payload, 1000)]
    receiver = collector.Collector()
    receiver.add("long", headers[0], payload[:1500])
    receiver.add("long", headers[1], payload[1500:])
    with pytest.raises(chunking.ChunkError, match="add up to more than the declared 3000"):
        receiver.add("long", headers[2], b"x")
    for header in headers[:2]:
        receiver.add("short", header, b"y" * 900)
    with pytest.raises(chunking.ChunkError, match="hold 2700 bytes, but declared 3000"):
        receiver.add("short", headers[2], b"y" * 900)
    assert receiver.pinned_bytes == 0


def test_a_partial_transfer_is_dropped_at_its_deadline():
    now = [100.0]
    receiver = collector.Collector(collector.Limits(max_age_s=60), clock=lambda: now[0])
    parts = _split(os.urandom(3000), 1000)
    receiver.add("t", *parts[0], expires_at=110.0)
    receiver.add("no-deadline", *parts[0])
    now[0] = 109.9
    receiver.expire()
    assert receiver.partial_count == 2
    now[0] = 110.0
    receiver.expire()
    assert receiver.partial_count == 1
    assert receiver.add("t", *parts[1], expires_at=110.0) is None  # a stray slice now
    with pytest.raises(collector.ChunksMissing):
        receiver.add("t", *parts[2], expires_at=110.0)
    now[0] = 160.0  # max_age_s after it started
    receiver.expire()
    assert receiver.partial_count == 0
    assert receiver.pinned_bytes == 0
    with pytest.raises(chunking.ChunkError, match="deadline passed"):
        receiver.add("late", *parts[0], expires_at=now[0])


def test_complete_slices_stay_charged_until_handed_on_or_dropped():
    payload = os.urandom(3000)
    receiver = collector.Collector()
    for key in ("handed-on", "dropped"):
        for header, part in _split(payload, 1000):
            whole = receiver.add(key, header, part)
        assert receiver.pinned_bytes > 3000
        if key == "handed-on":
            assert whole.view() == payload
            with pytest.raises(chunking.ChunkError, match="already handed on"):
                whole.view()
        del whole  # a task refused before its request was read
        assert receiver.pinned_bytes == 0


def test_the_expiry_records_of_dropped_transfers_do_not_pile_up():
    parts = _split(os.urandom(100), 30)
    receiver = collector.Collector()
    for i in range(5000):
        receiver.add(f"t{i}", *parts[0])
        if i % 100:
            receiver.discard(f"t{i}")
    assert receiver.partial_count == 50
    assert len(receiver._expiry) <= 2 * 50 + 65  # the heap holds little besides live ones


# A receiver with small limits, and a sender that lies in every way it can.
BOUNDS = collector.Limits(
    max_transfer_bytes=4096,
    max_slices=16,
    max_pending_bytes=12 * 1024,
    max_envelope_bytes=512,
    max_age_s=60.0,
)
KEYS = ("a", "b", "c")
LIES = ("none", "none", "none", "repeat", "count", "total", "digest", "index", "long", "short")


def _lie(header: task_pb2.Chunk, part: bytes, lie: str, n: int):
    chunk = task_pb2.Chunk()
    chunk.CopyFrom(header)
    fields = [part]
    if lie == "repeat":
        fields = [bytes(64)] * (1 + n % 40) + [part]
    elif lie == "count":
        chunk.count = n % 40
    elif lie == "total":
        chunk.total_size = n
    elif lie == "digest":
        chunk.sha256 = hashlib.sha256(n.to_bytes(8, "big")).digest()[: 31 + n % 2]
    elif lie == "index":
        chunk.index = n % 40
    elif lie == "long":
        fields = [part + bytes(1 + n % 600)]
    elif lie == "short":
        fields = [part[: len(part) // 2]]
    return chunk, fields


_sends = st.tuples(
    st.just("send"),
    st.integers(0, 3),  # which transfer
    st.none() | st.integers(0, 20),  # which slice (None: that transfer's next)
    st.sampled_from(LIES),
    st.integers(0, 2**40),  # the lie's number
    st.integers(-1, 30),  # the task's deadline, seconds from now
)
_events = st.lists(
    st.one_of(
        _sends,
        # The next slices of one transfer, as an honest sender sends them.
        st.tuples(st.just("burst"), st.integers(0, 3), st.integers(1, 20)),
        st.tuples(st.just("tick"), st.floats(0, 40)),
        st.tuples(st.just("discard"), st.sampled_from(KEYS)),
        st.tuples(st.just("release"), st.integers(0, 7), st.booleans()),
    ),
    min_size=1,
    max_size=60,
)
# (task id, payload, chunk size): 2 to 20 slices (over the limit of 16 at
# times), of payloads up to 6000 bytes (over the limit of 4096 at times).
_transfers = st.lists(
    st.tuples(
        st.sampled_from(KEYS), st.integers(2, 6000), st.integers(0, 2**32), st.integers(2, 20)
    ).map(lambda t: (t[0], random.Random(t[2]).randbytes(t[1]), -(-t[1] // t[3]))),
    min_size=1,
    max_size=4,
)


def _check_join(parts: collector.Parts, known: dict[bytes, bytes]) -> None:
    try:
        joined = parts.view()
    except chunking.ChunkError:
        return
    # Only ever a payload some transfer really had, under its own digest.
    assert joined == known.get(parts.sha256)


@settings(max_examples=300, deadline=None)
@given(transfers=_transfers, events=_events)
def test_no_slice_sequence_exceeds_the_bound_or_joins_wrong(transfers, events):
    """Random orders, duplicates, gaps, lies about totals, oversized and repeated payloads."""
    now = [0.0]
    receiver = collector.Collector(BOUNDS, clock=lambda: now[0])
    known = {hashlib.sha256(payload).digest(): payload for _, payload, _ in transfers}
    sliced = [_split(pl, n) for _, pl, n in transfers]
    cursors = [0] * len(transfers)
    bodies: list[weakref.ref[Body]] = []
    held: list[collector.Parts] = []

    def send(t: int, index: int | None, lie: str, n: int, deadline_s: float) -> None:
        t %= len(transfers)
        if index is None:
            index, cursors[t] = cursors[t], cursors[t] + 1
        header, part = sliced[t][index % len(sliced[t])]
        chunk, fields = _lie(header, part, lie, n)
        body = _message(transfers[t][0], chunk, fields)
        bodies.append(weakref.ref(body))
        try:
            whole = _deliver(receiver, body, expires_at=now[0] + deadline_s)
        except chunking.ChunkError:
            return
        if whole is not None:
            held.append(whole)

    for event in events:
        if event[0] == "send":
            send(*event[1:])
        elif event[0] == "burst":
            for _ in range(event[2]):
                send(event[1], None, "none", 0, 30)
        elif event[0] == "tick":
            now[0] += event[1]
            receiver.expire()
        elif event[0] == "discard":
            receiver.discard(event[1])
        elif held:
            parts = held.pop(event[1] % len(held))
            if event[2]:
                _check_join(parts, known)
            del parts
        pinned = receiver.pinned_bytes
        assert pinned <= BOUNDS.max_pending_bytes
        # What is really kept alive is never more than what is charged.
        assert sum(len(b) for b in (r() for r in bodies) if b is not None) <= pinned
    while held:
        _check_join(held.pop(), known)
    now[0] += BOUNDS.max_age_s + 1
    receiver.expire()
    assert receiver.partial_count == 0
    assert receiver.pinned_bytes == 0
    assert all(r() is None for r in bodies)
