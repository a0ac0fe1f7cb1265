"""The worker's execution pipeline against a fake executor (pure logic: no broker, no TFF)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from flaap_mq.executor import ExecutorCallError
from flaap_mq.protocol import batch, envelope
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.protocol.v1 import tff_executor_pb2 as light
from flaap_mq.testing import messages
from flaap_mq.worker.outcome import Outcome, OutcomeKind
from flaap_mq.worker.pipeline import Pipeline
from flaap_mq.worker.values import ValueTable

SILO = "a"
EXECUTOR = light.ExecutorId(id="clients=1/0")
Kind = envelope.RequestKind


class FakeExecutor:
    """Answers every request as TFF's executor service would, and counts them."""

    def __init__(self) -> None:
        self.running = False
        self.starts = 0
        self.calls: list[tuple[int, bytes]] = []
        self.error: ExecutorCallError | None = None

    def start(self) -> None:
        self.running = True
        self.starts += 1

    def close(self) -> None:
        self.running = False

    def alive(self) -> bool:
        return self.running

    def call(self, kind: int, request: bytes, timeout_s: float | None = None) -> bytes:
        self.calls.append((kind, request))
        if self.error is not None:
            raise self.error
        spec = envelope.KINDS[kind]
        if kind == Kind.GET_EXECUTOR:
            return light.GetExecutorResponse(executor=EXECUTOR).SerializeToString()
        if spec.creates_value:
            ref = light.ValueRef(id=f"service-{len(self.calls)}")
            return spec.light_response_type(value_ref=ref).SerializeToString()
        if kind == Kind.COMPUTE:
            return light.ComputeResponse(value=b"computed").SerializeToString()
        return b""


@pytest.fixture
def executor() -> FakeExecutor:
    fake = FakeExecutor()
    fake.start()
    return fake


@pytest.fixture
def values() -> ValueTable:
    return ValueTable()


def _pipeline(executor: FakeExecutor, values: ValueTable, **overrides: object) -> Pipeline:
    arguments: dict[str, object] = {
        "wait_for_earlier": lambda _sequence, _deadline: True,
        "stopping_now": lambda: False,
        "result_cache_bytes": 1024 * 1024,
        **overrides,
    }
    return Pipeline(SILO, executor, values, **arguments)  # type: ignore[arg-type]


@pytest.fixture
def pipeline(executor: FakeExecutor, values: ValueTable) -> Pipeline:
    return _pipeline(executor, values)


def _task(kind: int, task_id: str, incarnation: str, **fields: object) -> task_pb2.Task:
    fields = {"job_id": "job", "silo_id": SILO, **fields}
    return envelope.task_envelope(
        kind=kind,
        task_id=task_id,
        incarnation=incarnation,
        deadline_unix_ms=envelope.deadline_after(60),
        **fields,  # type: ignore[arg-type]
    )


def _run(
    pipeline: Pipeline,
    task: task_pb2.Task,
    request: bytes,
    *,
    reply_to: str | None = "replies",
    message_id: str | None = None,
) -> Outcome:
    message_id = task.task_id if message_id is None else message_id
    return pipeline.outcome_for(
        task, memoryview(request), reply_to=reply_to, message_id=message_id, sequence=0
    )


def _create_value(pipeline: Pipeline, values: ValueTable, name: str) -> Outcome:
    values.announce(name)
    task = _task(Kind.CREATE_VALUE, name, pipeline.incarnation_id)
    request = light.CreateValueRequest(executor=EXECUTOR, value=b"\x01" * 100)
    return _run(pipeline, task, request.SerializeToString(), reply_to=None)


def _result(outcome: Outcome) -> task_pb2.TaskResult:
    return messages.parse_result(outcome.messages[0])


def test_a_created_value_is_answered_with_its_name_and_kept_under_the_services_ref(
    pipeline, values, executor
):
    outcome = _create_value(pipeline, values, "v1")
    assert outcome.kind is OutcomeKind.OK and not outcome.cached
    response = light.CreateValueResponse.FromString(_result(outcome).response)
    assert response.value_ref.id == "v1"
    assert values.refs(["v1"], deadline=None) == {"v1": "service-1"}


def test_a_compute_names_the_services_ref_and_answers_with_the_value(pipeline, values, executor):
    _create_value(pipeline, values, "v1")
    task = _task(Kind.COMPUTE, "c1", pipeline.incarnation_id)
    request = light.ComputeRequest(executor=EXECUTOR, value_ref=light.ValueRef(id="v1"))
    outcome = _run(pipeline, task, request.SerializeToString())
    assert outcome.kind is OutcomeKind.OK
    sent = light.ComputeRequest.FromString(executor.calls[-1][1])
    assert sent.value_ref.id == "service-1"
    assert light.ComputeResponse.FromString(_result(outcome).response).value == b"computed"


def test_a_redelivered_task_is_answered_from_the_cache_not_run_twice(pipeline, executor):
    task = _task(Kind.GET_EXECUTOR, "g1", "")
    request = light.GetExecutorRequest().SerializeToString()
    first = _run(pipeline, task, request)
    again = _run(pipeline, task, request)
    assert len(executor.calls) == 1
    assert (first.cached, again.cached) == (False, True)
    assert again.messages == first.messages


def test_a_duplicate_arriving_while_the_first_runs_waits_for_it(pipeline, executor):
    release = threading.Event()
    call = executor.call

    def slow_call(kind: int, request: bytes, timeout_s: float | None = None) -> bytes:
        release.wait(10)
        return call(kind, request, timeout_s)

    executor.call = slow_call  # type: ignore[method-assign]
    task = _task(Kind.GET_EXECUTOR, "g1", "")
    request = light.GetExecutorRequest().SerializeToString()
    outcomes: list[Outcome] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(_run(pipeline, task, request)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(executor.calls) == 1
    assert sorted(o.cached for o in outcomes) == [False, True]


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"protocol_version": 99}, OutcomeKind.UNSUPPORTED_PROTOCOL),
        ({"silo_id": "b"}, OutcomeKind.WRONG_SILO),
    ],
)
def test_tasks_no_worker_can_run_are_refused_unrun(pipeline, executor, fields, kind):
    task = _task(Kind.GET_EXECUTOR, "g1", "")
    for name, value in fields.items():
        setattr(task, name, value)
    outcome = _run(pipeline, task, light.GetExecutorRequest().SerializeToString())
    assert outcome.kind is kind and kind.refused
    assert _result(outcome).error.code == outcome.failure.code
    assert executor.calls == []


def test_a_compute_without_reply_to_is_refused_as_malformed(pipeline, executor):
    task = _task(Kind.COMPUTE, "c1", pipeline.incarnation_id)
    request = light.ComputeRequest(executor=EXECUTOR, value_ref=light.ValueRef(id="v"))
    outcome = _run(pipeline, task, request.SerializeToString(), reply_to=None)
    assert outcome.kind is OutcomeKind.MALFORMED_TASK and outcome.kind.refused
    assert executor.calls == []


def test_a_task_past_its_deadline_is_expired_unrun_and_unanswered(pipeline, executor):
    task = _task(Kind.GET_EXECUTOR, "g1", "")
    task.deadline_unix_ms = 1
    outcome = _run(pipeline, task, light.GetExecutorRequest().SerializeToString())
    assert outcome.kind is OutcomeKind.EXPIRED and outcome.messages == ()
    assert outcome.value_error.startswith("expired: ")
    assert executor.calls == []


def test_a_task_for_another_incarnation_is_state_lost(pipeline, values, executor):
    values.announce("v1")
    task = _task(Kind.CREATE_VALUE, "v1", "an-earlier-incarnation")
    request = light.CreateValueRequest(executor=EXECUTOR, value=b"\x01")
    outcome = _run(pipeline, task, request.SerializeToString())
    assert outcome.kind is OutcomeKind.STATE_LOST and not outcome.kind.refused
    assert executor.calls == []


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, OutcomeKind.DEADLINE_EXCEEDED),
        (grpc.StatusCode.UNAVAILABLE, OutcomeKind.EXECUTOR_UNAVAILABLE),
        (grpc.StatusCode.INVALID_ARGUMENT, OutcomeKind.EXECUTOR_ERROR),
    ],
)
def test_executor_errors_are_answered_with_their_failure(pipeline, executor, code, kind):
    executor.error = ExecutorCallError(code, "no")
    outcome = _run(pipeline, _task(Kind.GET_EXECUTOR, "g1", ""), b"")
    assert outcome.kind is kind
    assert OutcomeKind.of(outcome.failure) is kind


def test_a_dead_executor_is_started_again_under_a_new_incarnation(pipeline, executor):
    old = pipeline.incarnation_id
    executor.close()
    outcome = _run(pipeline, _task(Kind.GET_EXECUTOR, "g1", ""), b"")
    assert outcome.kind is OutcomeKind.OK
    assert executor.starts == 2 and pipeline.incarnation_id != old
    assert _result(outcome).worker_incarnation == pipeline.incarnation_id


def test_a_worker_stopping_at_once_starts_no_executor(executor, values):
    pipeline = _pipeline(executor, values, stopping_now=lambda: True)
    pipeline.close_executor()
    outcome = _run(pipeline, _task(Kind.GET_EXECUTOR, "g1", ""), b"")
    assert outcome.kind is OutcomeKind.EXECUTOR_UNAVAILABLE
    assert executor.starts == 1


def test_a_disposal_waits_for_earlier_tasks_until_its_deadline(executor, values):
    waited: list[int] = []

    def never(sequence: int, _deadline: float | None) -> bool:
        waited.append(sequence)
        return False

    pipeline = _pipeline(executor, values, wait_for_earlier=never)
    task = _task(Kind.DISPOSE_EXECUTOR, "d1", pipeline.incarnation_id)
    request = light.DisposeExecutorRequest(executor=EXECUTOR).SerializeToString()
    outcome = pipeline.outcome_for(
        task, memoryview(request), reply_to=None, message_id="d1", sequence=7
    )
    assert waited == [7]
    assert outcome.kind is OutcomeKind.DEADLINE_EXCEEDED
    assert executor.calls == []


def test_a_failed_value_is_failed_for_the_tasks_that_name_it(pipeline, values, executor):
    executor.error = ExecutorCallError(grpc.StatusCode.INVALID_ARGUMENT, "bad value")
    outcome = _create_value(pipeline, values, "v1")
    assert outcome.kind is OutcomeKind.EXECUTOR_ERROR
    pipeline.settle_value("v1", outcome)
    with pytest.raises(Exception, match="bad value"):
        values.refs(["v1"], deadline=None)


def test_an_unreadable_message_is_answered_only_where_it_says_whom(pipeline):
    told = pipeline.unreadable(envelope.MalformedEnvelope("junk"), "corr-1")
    assert told.kind is OutcomeKind.MALFORMED
    assert _result(told).task_id == "corr-1"
    assert _result(told).error.code == envelope.ErrorCode.MALFORMED_TASK
    assert "junk" in _result(told).error.message
    assert pipeline.unreadable(envelope.MalformedEnvelope("junk"), None).messages == ()


def test_a_batch_of_another_version_is_answered_unsupported_protocol(pipeline):
    told = pipeline.unreadable(batch.UnsupportedProtocol("a batch of version 9"), "corr-1")
    assert told.kind is OutcomeKind.MALFORMED  # dead-lettered, like any message it cannot read
    assert _result(told).error.code == envelope.ErrorCode.UNSUPPORTED_PROTOCOL
    assert "version 9" in _result(told).error.message


def test_a_version_2_task_is_still_run(pipeline, executor):
    # Version 3 only adds the batch: a worker upgraded first runs an older
    # coordinator's tasks.
    task = _task(Kind.GET_EXECUTOR, "g1", "")
    task.protocol_version = 2
    outcome = _run(pipeline, task, light.GetExecutorRequest().SerializeToString())
    assert outcome.kind is OutcomeKind.OK
    assert len(executor.calls) == 1


def test_every_failure_has_its_outcome_named_as_logged():
    for failure in envelope.Failure:
        assert OutcomeKind.of(failure).value == failure.name.lower()
    refused = {k for k in OutcomeKind if k.refused}
    assert refused == {
        OutcomeKind.UNSUPPORTED_PROTOCOL,
        OutcomeKind.WRONG_SILO,
        OutcomeKind.MALFORMED_TASK,
    }
