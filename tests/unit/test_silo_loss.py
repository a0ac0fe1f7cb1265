"""The silo watch's "no consumer since" bookkeeping: when a silo counts as lost (no broker)."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from flaap_mq.broker.link import QueueCounts
from flaap_mq.coordinator import errors
from flaap_mq.coordinator.calls import Deadline, PendingCall
from flaap_mq.coordinator.silo_watch import SiloState
from flaap_mq.coordinator.task_client import TaskClient
from flaap_mq.protocol import envelope
from flaap_mq.protocol.v1 import task_pb2


def _answer(client: TaskClient, silo: str, consumers: int, at: float) -> None:
    """The broker's answer to a consumer probe started at `at` (time.monotonic())."""
    client._watch._silos[silo].probed_at = at
    done: concurrent.futures.Future[QueueCounts] = concurrent.futures.Future()
    done.set_result(QueueCounts(messages=0, consumers=consumers))
    client._watch._on_checked(silo, done)


@pytest.fixture
def client() -> TaskClient:
    # Never started: nothing connects.
    return TaskClient("amqp://guest:guest@localhost:5672/", ["a", "b"], silo_grace_s=10)


def test_a_silo_is_lost_once_its_queue_has_had_no_consumer_for_the_grace(client, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("flaap_mq.coordinator.silo_watch.time.monotonic", lambda: now[0])
    assert client.lost_reason("a") is None  # nothing known yet
    _answer(client, "a", 0, at=1000.0)
    now[0] = 1009.0
    _answer(client, "a", 0, at=1009.0)  # still none: counted from the first answer
    assert client.lost_reason("a") is None
    now[0] = 1010.5
    assert client.lost_reason("a") == "no-consumer-10s"
    assert client.consumers("a") == 0
    assert client.lost_reason("b") is None


def test_a_consumer_seen_again_clears_it(client, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("flaap_mq.coordinator.silo_watch.time.monotonic", lambda: now[0])
    _answer(client, "a", 0, at=1000.0)
    now[0] = 1011.0
    assert client.lost_reason("a") == "no-consumer-10s"
    _answer(client, "a", 1, at=1011.0)  # a worker (or a standby taking over) consumes
    assert client.lost_reason("a") is None
    _answer(client, "a", 0, at=1012.0)  # gone again: the grace starts again
    now[0] = 1020.0
    assert client.lost_reason("a") is None


def test_the_probe_interval_fits_the_grace(client):
    assert client.check_interval_s == 2.5  # a quarter of a 10 s grace
    short = TaskClient("amqp://guest:guest@localhost:5672/", ["a"], silo_grace_s=0.4)
    assert short.check_interval_s == 0.25
    default = TaskClient("amqp://guest:guest@localhost:5672/", ["a"])
    assert default.check_interval_s == 5.0 and default.silo_grace_s == 60.0
    with pytest.raises(ValueError, match="silo_grace must be positive"):
        TaskClient("amqp://guest:guest@localhost:5672/", ["a"], silo_grace_s=0)


def test_a_silo_state_warns_once_per_absence_and_says_when_a_worker_is_back():
    state = SiloState(probed_at=5.0)
    assert state.answered(0) == (True, False)  # first "none": warn
    assert state.no_consumer_since == 5.0
    state.probed_at = 9.0
    assert state.answered(0) == (False, False)  # said once, not per check
    assert state.no_consumer_since == 5.0  # counted from the first answer
    assert state.answered(2) == (False, True)  # back
    assert (state.consumers, state.no_consumer_since, state.warned) == (2, None, False)
    assert state.answered(3) == (False, False)


def _deadline_answer(silo: str, code: int) -> tuple[task_pb2.TaskResult, memoryview]:
    failure = next(f for f in envelope.Failure if f.code == code)
    result = envelope.result_error(
        task_id="t1",
        silo_id=silo,
        kind=envelope.RequestKind.COMPUTE,
        failure=failure,
        message="value v was still being made when the deadline passed",
        incarnation="i1",
    )
    return result, memoryview(b"")


@pytest.mark.parametrize("within_invocation_deadline", [True, False])
def test_a_silos_deadline_answer_under_an_invocation_deadline_is_the_same_loss(
    client, within_invocation_deadline
):
    # The worker's clock may see the invocation's deadline pass a moment before
    # this process's timer does: its DEADLINE_EXCEEDED answer then arrives first.
    # Under an invocation deadline that is the loss the deadline means (never a
    # retryable timeout); without one, the silo's answer is passed on as it is.
    async def wait() -> object:
        loop = asyncio.get_running_loop()
        call = PendingCall(loop, loop.create_future(), "a", "Compute", 0.0, 1.0)
        call.future.set_result(_deadline_answer("a", envelope.ErrorCode.DEADLINE_EXCEEDED))
        by = Deadline(at=0.0, seconds=2.0) if within_invocation_deadline else None
        return await client._watch.await_reply(call, 5.0, by)

    if within_invocation_deadline:
        with pytest.raises(errors.SiloLostError) as raised:
            asyncio.run(wait())
        assert raised.value.reason == "deadline-2s"
        assert "invocation's deadline (2 s)" in str(raised.value)
        assert "the silo says: value v was still being made" in str(raised.value)
    else:
        result, _ = asyncio.run(wait())
        assert result.error.code == envelope.ErrorCode.DEADLINE_EXCEEDED
