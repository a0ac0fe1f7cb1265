"""Reply intake (`coordinator.replies`): which reply settles which call, without a broker."""

from __future__ import annotations

import asyncio

import pika.spec
import pytest

from flaap_mq.coordinator import calls, errors, replies
from flaap_mq.protocol import chunking, collector, envelope
from flaap_mq.protocol.v1 import task_pb2

TASK = envelope.task_envelope(
    kind=envelope.spec_named("Compute").kind, job_id="j", silo_id="a", task_id="t1"
)
USERS = {"a": "user-a", "b": "user-b"}


def _result(task_id: str = "t1", silo: str = "a") -> task_pb2.TaskResult:
    return task_pb2.TaskResult(task_id=task_id, silo_id=silo)


def _props(correlation_id: str = "t1", user_id: str | None = "user-a"):
    return pika.spec.BasicProperties(correlation_id=correlation_id, user_id=user_id)


def _bodies(response: bytes, chunk_bytes: int) -> list[bytes]:
    result = envelope.result_ok(TASK, None, incarnation="i", duration_us=1)
    return envelope.encode_result(result, response, chunk_bytes)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _pending(loop, silo: str = "a") -> calls.PendingCall:
    return calls.PendingCall(loop, loop.create_future(), silo, "Compute", 0.0, 1e9)


def test_a_reply_from_the_silo_asked_matches(loop):
    call = _pending(loop)
    assert replies.unmatched("t1", _result(), "user-a", call, USERS) is None
    assert replies.unmatched("t1", _result(), None, call, None) is None  # no user check


@pytest.mark.parametrize(
    ("correlation_id", "result", "user", "event", "level"),
    [
        ("t2", _result("t1"), "user-a", "reply_id_mismatch", "warning"),
        ("t1", _result(silo="b"), "user-b", "reply_from_wrong_silo", "warning"),
        ("t1", _result(), "user-b", "reply_from_wrong_user", "warning"),
        ("t1", _result(), None, "reply_from_wrong_user", "warning"),
    ],
)
def test_a_reply_that_does_not_match_is_dropped(loop, correlation_id, result, user, event, level):
    dropped = replies.unmatched(correlation_id, result, user, _pending(loop), USERS)
    assert (dropped.event, dropped.level) == (event, level)


def test_a_reply_for_no_call_or_a_settled_one_is_unclaimed(loop):
    assert replies.unmatched("t1", _result(), "user-a", None, USERS).event == "reply_unclaimed"
    answered = _pending(loop)
    answered.answered = True
    dropped = replies.unmatched("t1", _result(), "user-a", answered, USERS)
    assert (dropped.event, dropped.level) == ("reply_unclaimed", "debug")


def test_the_wrong_user_is_named():
    call = calls.PendingCall(None, None, "a", "Compute", 0.0, 1e9)  # type: ignore[arg-type]
    dropped = replies.unmatched("t1", _result(), "user-b", call, USERS)
    assert (dropped.fields["expected_user"], dropped.fields["user"]) == ("user-a", "user-b")


def test_a_whole_reply_settles_its_call_once():
    async def main() -> tuple[list[replies.Dropped | None], bytes]:
        table = calls.CallTable()
        call = _pending(asyncio.get_running_loop())
        table.add("t1", call)
        (body,) = _bodies(b"response", 1024)
        taken = [replies.take(table, body, _props(), USERS) for _ in range(2)]
        _, payload = await call.future
        return taken, bytes(payload)

    taken, payload = asyncio.run(main())
    assert taken[0] is None and taken[1].event == "reply_unclaimed"  # a duplicate
    assert payload == b"response"


def test_slices_are_collected_and_the_last_settles_the_call():
    response = bytes(range(256)) * 4

    async def main() -> tuple[list[replies.Dropped | None], bytes, int]:
        table = calls.CallTable()
        call = _pending(asyncio.get_running_loop())
        table.add("t1", call)
        bodies = _bodies(response, 100)
        taken = [replies.take(table, b, _props(), USERS) for b in bodies[:-1]]
        held = table.transfers.pinned_bytes
        assert not call.future.done()
        taken.append(replies.take(table, bodies[-1], _props(), USERS))
        result, parts = await call.future
        assert not result.HasField("chunk")
        return taken, parts.view(), held

    taken, joined, held = asyncio.run(main())
    assert taken == [None] * 11 and joined == response and held > 0


def test_a_result_failing_its_digest_fails_its_check():
    async def main() -> tuple[replies.Dropped | None, collector.Parts]:
        table = calls.CallTable()
        call = _pending(asyncio.get_running_loop())
        table.add("t1", call)
        good, bad = _bodies(b"a" * 1000, 100), _bodies(b"b" * 1000, 100)
        for body in good[:-1]:
            assert replies.take(table, body, _props(), USERS) is None
        # The last slice of another payload of the same size, with the first's digest.
        result, part = envelope.read_result(bad[-1])
        result.chunk.sha256 = envelope.read_result(good[-1])[0].chunk.sha256
        forged = envelope.encode_result(result, bytes(part), 1000)[0]
        dropped = replies.take(table, forged, _props(), USERS)
        _, parts = await call.future
        return dropped, parts

    dropped, parts = asyncio.run(main())
    assert dropped is None  # checked by the caller, `TaskClient.ask`, which fails the call
    with pytest.raises(chunking.ChunkError, match="SHA-256"):
        parts.view()


def test_a_slice_over_the_limits_fails_the_call_retryable():
    async def main() -> tuple[replies.Dropped | None, BaseException]:
        table = calls.CallTable(collector.Limits(max_transfer_bytes=500))
        call = _pending(asyncio.get_running_loop())
        table.add("t1", call)
        dropped = replies.take(table, _bodies(b"x" * 1000, 100)[0], _props(), USERS)
        failure = await asyncio.gather(call.future, return_exceptions=True)
        return dropped, failure[0]

    dropped, failure = asyncio.run(main())
    assert (dropped.event, dropped.level) == ("reply_chunks_invalid", "warning")
    assert isinstance(failure, errors.SiloRetryableError) and failure.silo_id == "a"


def test_slices_for_a_call_over_start_no_transfer():
    table = calls.CallTable()
    body = _bodies(b"x" * 1000, 100)[0]
    assert replies.take(table, body, _props(), USERS).event == "reply_unclaimed"
    assert table.transfers.pinned_bytes == 0


def test_a_malformed_reply_is_dropped():
    dropped = replies.take(calls.CallTable(), b"\xff not a result", _props(), USERS)
    assert (dropped.event, dropped.level) == ("reply_malformed", "warning")
