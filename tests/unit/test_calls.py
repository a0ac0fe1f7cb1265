"""The coordinator's call table and deadlines (`coordinator.calls`), without a broker."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flaap_mq.coordinator import calls, errors
from flaap_mq.protocol import chunking, collector


def _call(loop: asyncio.AbstractEventLoop, silo: str = "a", *, expires_at: float = 1e9):
    return calls.PendingCall(loop, loop.create_future(), silo, "Compute", 0.0, expires_at)


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("flaap_mq.coordinator.calls.time.monotonic", lambda: now[0])
    return now


def test_without_an_invocation_deadline_a_task_gets_its_own_timeout(clock):
    assert calls.timeout_now(30.0) == (30.0, None)
    with calls.invocation_deadline(None):
        assert calls.timeout_now(30.0) == (30.0, None)


def test_an_invocation_deadline_cuts_the_timeouts_of_its_tasks(clock):
    with calls.invocation_deadline(10):
        assert calls.timeout_now(30.0) == (10.0, calls.Deadline(1010.0, 10))
        assert calls.timeout_now(5.0) == (5.0, None)  # its own timeout comes first
        clock[0] = 1007.5
        assert calls.timeout_now(30.0)[0] == 2.5
        clock[0] = 1020.0  # past: the task expires at once, never with a negative timeout
        assert calls.timeout_now(30.0)[0] == 0.001
    assert calls.timeout_now(30.0) == (30.0, None)  # gone with its context


def test_asyncio_tasks_inherit_the_invocation_deadline(clock):
    async def main() -> tuple[float, calls.Deadline | None]:
        with calls.invocation_deadline(4):
            return await asyncio.create_task(asyncio.sleep(0, calls.timeout_now(60.0)))

    assert asyncio.run(main()) == (4.0, calls.Deadline(1004.0, 4))


def test_a_call_is_settled_from_another_thread_and_the_first_outcome_wins():
    async def main() -> object:
        call = _call(asyncio.get_running_loop())
        thread = threading.Thread(target=call.settle, args=(("result", b""), None))
        thread.start()
        thread.join()
        call.settle(None, RuntimeError("too late"))
        return await call.future

    assert asyncio.run(main()) == ("result", b"")


def test_settling_a_call_whose_loop_is_closed_is_harmless():
    loop = asyncio.new_event_loop()
    call = _call(loop)
    loop.close()
    call.settle(None, RuntimeError("nobody waits"))  # no raise


def test_forgetting_a_call_drops_its_partial_transfer():
    table = calls.CallTable(collector.Limits(max_pending_bytes=1024 * 1024))
    loop = asyncio.new_event_loop()
    try:
        call = _call(loop)
        table.add("t1", call)
        assert table.get("t1") is call and table.waiting() == [call]
        chunk, pieces = next(chunking.sliced(b"x" * 300, 100))
        part = b"".join(pieces)
        assert table.transfers.add("t1", chunk, part, expires_at=call.expires_at) is None
        assert table.transfers.pinned_bytes > 0
        table.forget("t1")
        assert table.get("t1") is None and table.waiting() == []
        assert table.transfers.pinned_bytes == 0
        table.forget("t1")  # however often a call ends
    finally:
        loop.close()


def test_a_lost_broker_fails_every_waiting_call_as_retryable():
    async def main() -> list[BaseException]:
        loop = asyncio.get_running_loop()
        table = calls.CallTable()
        waiting = [_call(loop, "a"), _call(loop, "b")]
        for i, call in enumerate(waiting):
            table.add(f"t{i}", call)
        table.fail_all(ConnectionError("gone"))
        return list(await asyncio.gather(*(c.future for c in waiting), return_exceptions=True))

    failures = asyncio.run(main())
    assert [type(e) for e in failures] == [errors.SiloRetryableError] * 2
    assert [(e.silo_id, e.request) for e in failures] == [("a", "Compute"), ("b", "Compute")]
    assert "broker: gone" in str(failures[0])
