"""A delivery's `TaskRequest`: the worker's ack policy, against a fake link (pure logic)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pika
import pytest

from flaap_mq.broker.link import Delivery, Unroutable
from flaap_mq.protocol import amqp, batch, collector, envelope
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.worker import request as request_module
from flaap_mq.worker.intake import InFlight, Intake
from flaap_mq.worker.outcome import Outcome, OutcomeKind
from flaap_mq.worker.request import Replies, TaskRequest
from flaap_mq.worker.values import ValueTable


class FakeLink:
    """Records what the request does; each publish's confirm is settled by the test."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes, Any]] = []
        self.confirms: list[concurrent.futures.Future[None]] = []
        self.settled: list[tuple[str, bool | None]] = []

    def publish(self, exchange, routing_key, body, properties):
        self.published.append((exchange, routing_key, body, properties))
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.confirms.append(future)
        return future

    def ack(self, delivery: Delivery) -> None:
        self.settled.append(("ack", None))

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        self.settled.append(("reject", requeue))


class FakeLog:
    def __init__(self) -> None:
        self.events: list[str] = []

    def _record(self, event: str, **_fields: Any) -> None:
        self.events.append(event)

    info = warning = debug = error = _record


class State:
    shutting_down = False
    stopping_now = False


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def link() -> FakeLink:
    return FakeLink()


@pytest.fixture
def log() -> FakeLog:
    return FakeLog()


@pytest.fixture
def replies(link: FakeLink, log: FakeLog, state: State) -> Replies:
    return Replies(
        exchange="flaap.replies",
        user_id="silo-a",
        log=log,
        shutting_down=lambda: state.shutting_down,
        stopping_now=lambda: state.stopping_now,
        link=link,
    )


def _request(replies: Replies, *, reply_to: str | None = "job-1", **properties: Any):
    props = pika.BasicProperties(
        reply_to=reply_to, correlation_id="t1", message_id="t1", **properties
    )
    delivery = Delivery(b"body", props, 1, False, "flaap.silo.a", 0)
    return TaskRequest(delivery, replies)


TASK = envelope.task_envelope(
    kind=envelope.RequestKind.COMPUTE, job_id="job", silo_id="a", task_id="t1"
)


def _ok(slices: int = 1) -> Outcome:
    return Outcome(tuple(b"slice" for _ in range(slices)), OutcomeKind.OK)


def _error(failure: envelope.Failure) -> Outcome:
    result = envelope.result_error(
        task_id="t1", silo_id="a", kind=TASK.kind, failure=failure, message="no", incarnation="i"
    )
    return Outcome(
        (result.SerializeToString(),), OutcomeKind.of(failure), failure=failure, value_error="no"
    )


def test_a_reply_is_acked_only_once_the_broker_confirmed_every_slice(replies, link):
    _request(replies).settle(TASK, _ok(slices=3))
    assert len(link.published) == 3 and link.settled == []
    assert all(p[3].user_id == "silo-a" and p[3].correlation_id == "t1" for p in link.published)
    link.confirms[0].set_result(None)
    link.confirms[1].set_result(None)
    assert link.settled == []
    link.confirms[2].set_result(None)
    assert link.settled == [("ack", None)]


def test_an_unroutable_reply_is_acked_its_coordinator_is_gone(replies, link, log):
    _request(replies).settle(TASK, _ok())
    link.confirms[0].set_exception(Unroutable("no route"))
    assert link.settled == [("ack", None)]
    assert "reply_unroutable" in log.events


def test_an_unconfirmed_reply_requeues_the_task_after_a_pause(replies, link, log, monkeypatch):
    monkeypatch.setattr(request_module, "REQUEUE_FIRST_PAUSE_S", 0.05)
    _request(replies, headers={"x-delivery-count": 2}).settle(TASK, _ok())
    link.confirms[0].set_exception(RuntimeError("nacked"))
    assert "reply_not_confirmed" in log.events and link.settled == []
    deadline = time.monotonic() + 5
    while not link.settled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.settled == [("reject", True)]


def test_the_pause_doubles_with_each_delivery_up_to_the_cap(replies):
    assert [request_module.requeue_pause(n) for n in (0, 1, 3, 5, 99)] == [1, 2, 8, 30, 30]
    for count, seen in [(0, 0), (4, 4), ("junk", 0), (-3, 0)]:
        request = _request(replies, headers={"x-delivery-count": count})
        assert request._fate.delivery_count() == seen


def test_no_requeue_by_hand_once_shutting_down(replies, link, state, monkeypatch):
    monkeypatch.setattr(request_module, "REQUEUE_FIRST_PAUSE_S", 0.01)
    _request(replies).settle(TASK, _ok())
    state.shutting_down = True
    link.confirms[0].set_exception(RuntimeError("link closed"))
    time.sleep(0.2)
    assert link.settled == []


def test_stopping_at_once_leaves_the_task_to_the_broker(replies, link, state, log):
    state.stopping_now = True
    _request(replies).settle(TASK, _ok())
    link.confirms[0].set_exception(RuntimeError("link closed"))
    assert link.settled == []
    assert "reply_abandoned" in log.events


def test_a_one_way_task_is_acked_at_once_even_when_it_failed(replies, link, log):
    _request(replies, reply_to=None).settle(TASK, _ok())
    _request(replies, reply_to=None).settle(TASK, _error(envelope.Failure.EXECUTOR_ERROR))
    assert link.published == []
    assert link.settled == [("ack", None), ("ack", None)]
    assert log.events == ["one_way_task_failed"]


def test_a_failure_with_a_reply_to_is_answered_and_acked_once_confirmed(replies, link):
    _request(replies).settle(TASK, _error(envelope.Failure.STATE_LOST))
    assert len(link.published) == 1 and link.settled == []
    link.confirms[0].set_result(None)
    assert link.settled == [("ack", None)]


@pytest.mark.parametrize(
    "failure",
    [
        envelope.Failure.UNSUPPORTED_PROTOCOL,
        envelope.Failure.WRONG_SILO,
        envelope.Failure.MALFORMED_TASK,
    ],
)
def test_a_refused_task_is_answered_then_rejected_unrequeued(replies, link, log, failure):
    _request(replies).settle(TASK, _error(failure))
    assert len(link.published) == 1 and link.settled == []
    assert "task_dead_lettered" in log.events
    link.confirms[0].set_exception(RuntimeError("not confirmed"))  # rejected either way
    assert link.settled == [("reject", False)]
    assert "error_reply_not_confirmed" in log.events


def test_a_refused_one_way_task_is_rejected_at_once(replies, link):
    _request(replies, reply_to=None).settle(TASK, _error(envelope.Failure.WRONG_SILO))
    assert link.published == [] and link.settled == [("reject", False)]


def test_an_expired_task_is_rejected_unanswered(replies, link, log):
    reason = "expired: deadline passed before the task could run"
    expired = Outcome((), OutcomeKind.EXPIRED, False, envelope.Failure.DEADLINE_EXCEEDED, reason)
    _request(replies).settle(TASK, expired)
    assert link.published == [] and link.settled == [("reject", False)]
    assert log.events == ["task_dead_lettered"]


def test_an_unreadable_message_is_answered_where_it_says_whom_then_rejected(replies, link):
    error = task_pb2.TaskResult(task_id="t1").SerializeToString()
    unreadable = Outcome((error,), OutcomeKind.MALFORMED, False, None, "junk")
    _request(replies).settle(None, unreadable)
    assert link.published[0][2] == error and link.settled == []
    link.confirms[0].set_result(None)
    assert link.settled == [("reject", False)]


def test_a_stored_slice_is_acked_and_a_failed_handler_requeues(replies, link):
    _request(replies).slice_stored()
    _request(replies).give_back()
    assert link.settled == [("ack", None), ("reject", True)]


# ------------------------------------------------------------------ batches
# A batch's tasks share one delivery: it is settled once, when the last of
# them has its verdict, as the gravest verdict says.


def _batch(replies: Replies, kinds: list[int], *, reply_to: str | None = "job-1"):
    props = pika.BasicProperties(reply_to=reply_to, correlation_id="b-last", type=amqp.BATCH_TYPE)
    delivery = Delivery(b"batch", props, 7, False, "flaap.silo.a", 0)
    tasks = [
        envelope.task_envelope(kind=kind, job_id="job", silo_id="a", task_id=f"b{i}")
        for i, kind in enumerate(kinds)
    ]
    return tasks, TaskRequest.for_batch(delivery, replies, tasks)


CREATE, COMPUTE = envelope.RequestKind.CREATE_VALUE, envelope.RequestKind.COMPUTE


def test_only_a_batchs_last_task_is_answered_and_each_names_itself(replies):
    _, requests = _batch(replies, [CREATE, CREATE, COMPUTE])
    assert [r.reply_to for r in requests] == [None, None, "job-1"]
    assert [r.correlation_id for r in requests] == ["b0", "b1", "b2"]
    assert [r.message_id for r in requests] == ["b0", "b1", "b2"]


def test_a_batch_is_acked_once_every_task_is_done_and_the_reply_confirmed(replies, link):
    tasks, requests = _batch(replies, [CREATE, CREATE, COMPUTE])
    requests[0].settle(tasks[0], _ok())
    requests[2].settle(tasks[2], _ok())  # may finish before an earlier one-way task
    assert link.settled == []
    assert [p[3].correlation_id for p in link.published] == ["b2"]
    link.confirms[0].set_result(None)
    assert link.settled == []  # the second task is still running
    requests[1].settle(tasks[1], _ok())
    assert link.settled == [("ack", None)]


def test_a_batch_with_a_refused_task_is_dead_lettered_whole_once_all_are_done(replies, link, log):
    tasks, requests = _batch(replies, [CREATE, COMPUTE])
    requests[0].settle(tasks[0], _error(envelope.Failure.MALFORMED_TASK))
    assert link.settled == []
    requests[1].settle(tasks[1], _ok())
    link.confirms[-1].set_result(None)
    assert link.settled == [("reject", False)]
    assert "task_dead_lettered" in log.events


def test_a_batch_whose_reply_was_not_confirmed_goes_back_once(replies, link, monkeypatch):
    monkeypatch.setattr(request_module, "REQUEUE_FIRST_PAUSE_S", 0.05)
    tasks, requests = _batch(replies, [CREATE, COMPUTE])
    requests[0].settle(tasks[0], _ok())
    requests[1].settle(tasks[1], _ok())
    link.confirms[0].set_exception(RuntimeError("nacked"))
    deadline = time.monotonic() + 5
    while not link.settled and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert link.settled == [("reject", True)]


def test_a_batch_task_the_worker_failed_on_requeues_the_batch_at_once(replies, link):
    tasks, requests = _batch(replies, [CREATE, CREATE], reply_to=None)
    requests[0].give_back()
    requests[1].settle(tasks[1], _ok())
    assert link.settled == [("reject", True)]


def test_a_batch_left_by_a_worker_stopping_at_once_is_not_settled(replies, link, state):
    tasks, requests = _batch(replies, [CREATE, COMPUTE])
    requests[0].settle(tasks[0], _ok())
    requests[1].settle(tasks[1], _ok())
    state.stopping_now = True
    link.confirms[0].set_exception(RuntimeError("link closed"))
    assert link.settled == []


# ------------------------------------------------------------ a sliced reply


def test_a_sliced_reply_has_at_most_a_window_of_slices_unconfirmed(replies, link):
    slices = request_module.REPLY_WINDOW * 2 + 1
    _request(replies).settle(TASK, _ok(slices=slices))
    assert len(link.published) == request_module.REPLY_WINDOW
    # A draining worker waits for it: between two windows the link may hold
    # nothing unconfirmed, yet the reply is not all out.
    assert replies.replying
    for confirmed in range(slices):
        link.confirms[confirmed].set_result(None)
        assert len(link.published) == min(slices, request_module.REPLY_WINDOW + confirmed + 1)
        assert len(link.published) - (confirmed + 1) <= request_module.REPLY_WINDOW
    assert link.settled == [("ack", None)]
    assert not replies.replying
    assert [p[3].headers["x-flaap-chunk"] for p in link.published] == [
        f"{i + 1}/{slices}" for i in range(slices)
    ]


def test_a_sliced_reply_stops_at_the_first_slice_not_confirmed(replies, link, monkeypatch):
    monkeypatch.setattr(request_module, "REQUEUE_FIRST_PAUSE_S", 0.05)
    _request(replies).settle(TASK, _ok(slices=10))
    link.confirms[1].set_exception(RuntimeError("nacked"))
    for future in link.confirms:
        if not future.done():
            future.set_result(None)
    assert len(link.published) == request_module.REPLY_WINDOW  # nothing more after it
    deadline = time.monotonic() + 5
    while not link.settled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.settled == [("reject", True)]


def test_intake_hands_a_batch_to_the_pool_as_one_chain_in_its_order(replies, log):
    """A batch's tasks run one after another on one pool thread (`Intake`): each is
    announced and numbered in the batch's order, and all go in one submission."""
    submitted: list[list] = []
    values = ValueTable()
    intake = Intake(
        replies=replies,
        submit=submitted.append,
        collector=collector.Collector(),
        values=values,
        in_flight=InFlight(),
        log=log,
    )
    tasks = [
        envelope.task_envelope(kind=kind, job_id="job", silo_id="a", task_id=f"b{i}")
        for i, kind in enumerate([CREATE, CREATE, COMPUTE])
    ]
    body = batch.encode_batch([(task, b"") for task in tasks])
    props = pika.BasicProperties(reply_to="job-1", correlation_id="b2", type=amqp.BATCH_TYPE)
    intake.on_delivery(Delivery(body, props, 7, False, "flaap.silo.a", 0))
    single = pika.BasicProperties(reply_to="job-1", correlation_id="t1", message_id="t1")
    intake.on_delivery(
        Delivery(envelope.encode_task(TASK, b"", 1 << 20)[0], single, 8, False, "q", 0)
    )

    assert [len(entries) for entries in submitted] == [3, 1]
    chain = submitted[0]
    assert [received[0].task_id for _, _, received in chain] == ["b0", "b1", "b2"]
    assert [sequence for _, sequence, _ in chain] == sorted(s for _, s, _ in chain)
    assert submitted[1][0][1] > chain[-1][1]  # the next delivery comes after the whole batch
    values.made("b1", "ref-1", "executor")  # `made` keeps only what was announced
    assert values.refs(["b1"], deadline=time.monotonic() + 1) == {"b1": "ref-1"}
