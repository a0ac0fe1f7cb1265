"""A real worker process answering hand-made tasks over a real broker.

These talk to the worker with raw pika, as a coordinator of another version
(or a confused one) would, and check what comes back on the wire.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import numpy as np
import pika
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import placements

from flaap_mq.broker.declare import declare_blocking
from flaap_mq.local.workers import WorkerProcess
from flaap_mq.protocol import amqp, batch, chunking, envelope, topology
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.testing import messages
from flaap_mq.testing.raw_peer import RawPeer


class RawCoordinator(RawPeer):
    """A reply queue and a publisher, with nothing of flaap-mq's coordinator."""

    worker: WorkerProcess | None = None  # silo a's worker, where a test started one

    def send(
        self, silo_id: str, body: bytes, correlation_id: str, *, reply: bool = True, **props: object
    ) -> None:
        self.channel.basic_publish(
            self.names.tasks_exchange,
            silo_id,
            body,
            pika.BasicProperties(
                delivery_mode=2,
                correlation_id=correlation_id,
                reply_to=self.job_id if reply else None,
                **props,
            ),
            mandatory=True,
        )

    def send_task(
        self, request: object, task_id: str, *, incarnation: str = "", reply: bool = False
    ) -> None:
        """A task as flaap-mq's coordinator sends it: one-way unless `reply`."""
        task = messages.build_task(
            request=request,
            job_id=self.job_id,
            silo_id="a",
            task_id=task_id,
            incarnation=incarnation,
            deadline_unix_ms=envelope.deadline_after(60),
        )
        spec = envelope.spec_for_request(request)
        self.send(
            "a", task.SerializeToString(), task_id, reply=reply, message_id=task_id, type=spec.name
        )

    def get_executor(self) -> tuple[executor_pb2.ExecutorId, str]:
        """A new executor on silo a, and the worker incarnation holding it."""
        task = _get_executor_task(uuid.uuid4().hex)
        self.send("a", task.SerializeToString(), task.task_id)
        _, result = self.reply()
        assert result.WhichOneof("outcome") == "response", result.error.message
        response = executor_pb2.GetExecutorResponse.FromString(result.response)
        return response.executor, result.worker_incarnation

    def no_reply_within(self, seconds: float) -> bool:
        try:
            self.reply(timeout_s=seconds)
        except TimeoutError:
            return True
        return False

    def reply(self, timeout_s: float = 30.0) -> tuple[pika.BasicProperties, task_pb2.TaskResult]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            method, properties, body = self.channel.basic_get(
                self.names.reply_queue(self.job_id), auto_ack=True
            )
            if method is not None:
                return properties, task_pb2.TaskResult.FromString(body)
            time.sleep(0.1)
        raise TimeoutError("no reply")

    def dead_letter(self, message_id: str, timeout_s: float = 20.0) -> pika.BasicProperties:
        """The properties of task `message_id` once it is in the dead-letter queue."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            method, properties, _ = self.channel.basic_get(
                self.names.dead_letter_queue, auto_ack=True
            )
            if method is not None and properties.message_id == message_id:
                return properties
            if method is None:
                time.sleep(0.1)
        pytest.fail(f"task {message_id} did not reach the dead-letter queue")


def logged_dead_letter_reason(log_text: str, message_id: str) -> str:
    """The reason a worker logged (`task_dead_lettered`) for rejecting `message_id`."""
    for line in log_text.splitlines():
        if '"task_dead_lettered"' in line:
            event = json.loads(line)
            if event.get("message_id") == message_id:
                return event["reason"]
    pytest.fail(f"the worker logged no task_dead_lettered for {message_id}")


def assert_rejected_by_the_worker(properties: pika.BasicProperties, silo_queue: str) -> None:
    """Dead-lettered by the broker on the worker's reject, from the silo queue."""
    deaths = properties.headers["x-death"]
    assert deaths[0]["reason"] == "rejected"
    assert deaths[0]["queue"] == silo_queue
    # Nothing the worker could have added: a reject carries no headers.
    assert not [h for h in properties.headers if h.startswith("x-flaap-")]


@pytest.fixture
def raw(broker_url, prefix, workers):
    fleet = workers(["a"])
    coordinator = RawCoordinator(broker_url, prefix)
    coordinator.worker = fleet.workers["a"]
    yield coordinator
    coordinator.close()


def _get_executor_task(task_id: str, **overrides: object) -> task_pb2.Task:
    task = messages.build_task(
        request=executor_pb2.GetExecutorRequest(
            cardinalities=value_serialization.serialize_cardinalities({placements.CLIENTS: 1})
        ),
        job_id="raw",
        silo_id="a",
        task_id=task_id,
        deadline_unix_ms=envelope.deadline_after(60),
    )
    for key, value in overrides.items():
        setattr(task, key, value)
    return task


def test_get_executor_answers_with_the_executor_and_the_worker_incarnation(raw):
    raw.send("a", _get_executor_task("t1").SerializeToString(), "t1")
    properties, result = raw.reply()
    assert properties.correlation_id == "t1"
    assert properties.user_id == "guest"  # checked by the broker against the login
    assert result.WhichOneof("outcome") == "response", result.error.message
    executor = executor_pb2.GetExecutorResponse.FromString(result.response).executor
    assert executor.id.startswith("clients=1")  # the executor service's own id
    assert len(result.worker_incarnation) == 16


def test_unknown_protocol_version_gets_a_clear_error_result(raw):
    raw.send("a", _get_executor_task("t2", protocol_version=7).SerializeToString(), "t2")
    _, result = raw.reply()
    assert result.error.code == envelope.ErrorCode.UNSUPPORTED_PROTOCOL
    assert "protocol version 7 is not supported" in result.error.message
    assert not result.error.retryable


def test_request_for_an_unknown_incarnation_is_retryable_state_lost(raw):
    request = executor_pb2.ComputeRequest(
        executor=executor_pb2.ExecutorId(id="clients=1"),
        value_ref=executor_pb2.ValueRef(id="1"),
    )
    task = messages.build_task(
        request=request, job_id="raw", silo_id="a", task_id="t3", incarnation="someoneelse"
    )
    raw.send("a", task.SerializeToString(), "t3")
    _, result = raw.reply()
    assert result.error.code == envelope.ErrorCode.STATE_LOST
    assert "'someoneelse'" in result.error.message
    assert result.error.retryable


def test_task_for_another_silo_is_refused(raw):
    raw.send("a", _get_executor_task("t4", silo_id="b").SerializeToString(), "t4")
    _, result = raw.reply()
    assert result.error.code == envelope.ErrorCode.WRONG_SILO


def test_redelivered_task_id_is_answered_from_cache_not_run_twice(raw):
    body = _get_executor_task("t5").SerializeToString()
    raw.send("a", body, "t5")
    _, first = raw.reply()
    raw.send("a", body, "t5")
    _, second = raw.reply()
    # Running GetExecutor twice would still give an executor id; the same
    # bytes prove the second answer is the first one, not a second run.
    assert second.SerializeToString() == first.SerializeToString()


def test_malformed_task_gets_an_error_reply_and_is_dead_lettered(raw):
    raw.send("a", b"definitely not protobuf \xff\xff", "t6", message_id="bad-6")
    _, result = raw.reply()
    assert result.error.code == envelope.ErrorCode.MALFORMED_TASK
    assert "could not read the task" in result.error.message
    assert_rejected_by_the_worker(raw.dead_letter("bad-6"), raw.names.silo_queue("a"))
    assert logged_dead_letter_reason(raw.worker.log_text(), "bad-6").startswith("malformed: ")


def test_a_task_past_its_deadline_on_arrival_is_rejected_not_run(raw):
    """Expired on the way but not in the queue (no AMQP expiration): the worker rejects it."""
    past = int(time.time() * 1000) - 1000
    body = _get_executor_task("t8", deadline_unix_ms=past).SerializeToString()
    raw.send("a", body, "t8", message_id="t8")
    assert_rejected_by_the_worker(raw.dead_letter("t8"), raw.names.silo_queue("a"))
    assert logged_dead_letter_reason(raw.worker.log_text(), "t8").startswith("expired: ")
    assert raw.no_reply_within(1.0)  # nobody awaits it any more


def test_expired_task_is_dead_lettered_by_the_broker_not_run(broker_url, prefix):
    # No worker: the task expires in the silo queue.
    coordinator = RawCoordinator(broker_url, prefix)
    try:
        declare_blocking(
            coordinator.channel, topology.silo_declarations(coordinator.names, ["idle"])
        )
        body = _get_executor_task("t7", silo_id="idle").SerializeToString()
        coordinator.send("idle", body, "t7", message_id="t7", expiration="200")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            method, properties, _ = coordinator.channel.basic_get(
                coordinator.names.dead_letter_queue, auto_ack=True
            )
            if method is not None:
                assert properties.message_id == "t7"
                assert properties.headers["x-death"][0]["reason"] == "expired"
                return
            time.sleep(0.1)
        pytest.fail("the expired task was not dead-lettered")
    finally:
        coordinator.close()


# --------------------------------------------------------------- pipelining
# Value names are the coordinator's (a Create* task's id); Create* tasks go
# one-way, and only the Compute that needs the chain is answered.


@tff.tensorflow.computation(np.float32)
def _add_one(x):
    return x + 1.0


def _value(value: object, type_spec: object) -> executor_pb2.Value:
    proto, _ = value_serialization.serialize_value(value, type_spec)
    return proto


def _ref(value_id: str) -> executor_pb2.ValueRef:
    return executor_pb2.ValueRef(id=value_id)


class _Executor:
    """An executor on silo a, driven with raw tasks as flaap-mq's coordinator does."""

    def __init__(self, raw: RawCoordinator) -> None:
        self.raw = raw
        self.id, self.incarnation = raw.get_executor()

    def _one_way(self, request: object) -> str:
        name = uuid.uuid4().hex
        self.raw.send_task(request, name, incarnation=self.incarnation)
        return name

    def create_value(self, value: executor_pb2.Value) -> str:
        return self._one_way(executor_pb2.CreateValueRequest(executor=self.id, value=value))

    def create_call(self, function: str, argument: str) -> str:
        return self._one_way(
            executor_pb2.CreateCallRequest(
                executor=self.id, function_ref=_ref(function), argument_ref=_ref(argument)
            )
        )

    def create_struct(self, *names: str) -> str:
        elements = [executor_pb2.CreateStructRequest.Element(value_ref=_ref(n)) for n in names]
        return self._one_way(executor_pb2.CreateStructRequest(executor=self.id, element=elements))

    def create_selection(self, source: str, index: int) -> str:
        return self._one_way(
            executor_pb2.CreateSelectionRequest(
                executor=self.id, source_ref=_ref(source), index=index
            )
        )

    def dispose(self, *names: str) -> None:
        self._one_way(
            executor_pb2.DisposeRequest(executor=self.id, value_ref=[_ref(n) for n in names])
        )

    def compute(self, name: str) -> task_pb2.TaskResult:
        task_id = uuid.uuid4().hex
        self.raw.send_task(
            executor_pb2.ComputeRequest(executor=self.id, value_ref=_ref(name)),
            task_id,
            incarnation=self.incarnation,
            reply=True,
        )
        _, result = self.raw.reply()
        assert result.task_id == task_id
        return result


def _computed_float(result: task_pb2.TaskResult) -> float:
    assert result.WhichOneof("outcome") == "response", result.error.message
    value = executor_pb2.ComputeResponse.FromString(result.response).value
    return float(value_serialization.deserialize_value(value, tff.TensorType(np.float32))[0])


def test_a_pipelined_chain_is_computed_with_one_answer(raw):
    executor = _Executor(raw)
    comp = executor.create_value(_value(_add_one, _add_one.type_signature))
    arg = executor.create_value(_value(np.float32(2.0), tff.TensorType(np.float32)))
    call = executor.create_call(comp, arg)
    assert _computed_float(executor.compute(call)) == 3.0
    # The three one-way Create* tasks were run but answered nothing.
    assert raw.no_reply_within(1.0)


def test_a_value_never_created_is_state_lost_at_once_naming_it(raw):
    executor = _Executor(raw)
    started = time.monotonic()
    result = executor.compute("never-made")
    assert result.error.code == envelope.ErrorCode.STATE_LOST
    assert result.error.retryable
    assert "never-made" in result.error.message
    assert time.monotonic() - started < 10  # not after the 60 s deadline


def test_a_failed_one_way_create_fails_the_compute_that_needs_it(raw):
    """The first cause, a CreateValue, reaches the Compute two links down the chain."""
    executor = _Executor(raw)
    comp = executor.create_value(_value(_add_one, _add_one.type_signature))
    arg = executor.create_value(executor_pb2.Value())  # empty: the service refuses it
    call = executor.create_call(comp, arg)
    result = executor.compute(call)
    assert result.error.code == envelope.ErrorCode.EXECUTOR_ERROR
    assert not result.error.retryable
    assert f"uses value {call}, which could not be made" in result.error.message
    assert "CreateValue failed on silo 'a'" in result.error.message


_BIG = 4 * 1024 * 1024  # float32 elements: a CreateValue that takes a while


@tff.tensorflow.computation(tff.TensorType(np.float32, [_BIG]))
def _total(x):
    return tf.reduce_sum(x)


def test_a_disposal_never_overtakes_a_task_sent_before_it(raw):
    """A Dispose of a value that a CreateCall sent before it still needs.

    The CreateCall waits for its slow argument; the function it calls was
    made long before, so a Dispose of the function could run at once, before
    the CreateCall reaches the executor service, which would then fail with
    "value not found". The worker holds every disposal until the tasks sent
    before it have finished.
    """
    executor = _Executor(raw)
    comp = executor.create_value(_value(_total, _total.type_signature))
    assert raw.no_reply_within(0.5)  # made before anything slow arrives
    model = np.ones(_BIG, np.float32)
    arg = executor.create_value(_value(model, tff.TensorType(np.float32, [_BIG])))
    call = executor.create_call(comp, arg)
    executor.dispose(comp)
    assert _computed_float(executor.compute(call)) == float(_BIG)


def test_a_compute_without_reply_to_is_dead_lettered_with_the_reason(raw):
    executor = _Executor(raw)
    raw.send_task(
        executor_pb2.ComputeRequest(executor=executor.id, value_ref=_ref("x")),
        "no-reply",
        incarnation=executor.incarnation,
    )
    assert_rejected_by_the_worker(raw.dead_letter("no-reply"), raw.names.silo_queue("a"))
    reason = logged_dead_letter_reason(raw.worker.log_text(), "no-reply")
    assert reason.startswith("malformed_task: ")
    assert "Compute task needs a reply_to" in reason


def test_the_last_slice_without_the_others_is_answered_chunk_invalid(raw):
    """As when the earlier slices went to a worker process that has since died."""
    executor, incarnation = raw.get_executor()
    task = envelope.task_envelope(
        kind=envelope.RequestKind.CREATE_VALUE,
        job_id=raw.job_id,
        silo_id="a",
        task_id="sliced",
        incarnation=incarnation,
        deadline_unix_ms=envelope.deadline_after(60),
    )
    request = executor_pb2.CreateValueRequest(
        executor=executor,
        value=_value(np.zeros(1024, np.float32), tff.TensorType(np.float32, [1024])),
    )
    messages = envelope.encode_task(task, request.SerializeToString(), 1000)
    assert len(messages) > 2
    raw.send(
        "a",
        messages[-1],
        "sliced",
        message_id="sliced",
        type="CreateValue",
        headers=chunking.headers(len(messages) - 1, len(messages)),
    )
    _, result = raw.reply()
    assert result.task_id == "sliced"
    assert result.error.code == envelope.ErrorCode.CHUNK_INVALID
    assert result.error.retryable
    assert "not the earlier ones" in result.error.message


# ------------------------------------------------------------ a light worker
# The worker forwards bytes: it must never import TensorFlow (4 s, 700 MB).

# `flaap-mq worker` as the console script runs it (`flaap_mq.cli.main`), which
# then writes to the file named first which of those modules it imported, and
# where from: an audit hook sees each import as it happens.
_WORKER_REPORTING_IMPORTS = """
import json, sys, traceback
HEAVY = ("tensorflow", "tensorflow_federated")
imported_from = {}

def audit(event, args):
    if event == "import" and args[0].split(".")[0] in HEAVY and not imported_from:
        imported_from[args[0]] = "".join(traceback.format_stack(limit=30))

sys.addaudithook(audit)
from flaap_mq import cli
code = cli.main(sys.argv[2:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
with open(sys.argv[1], "w") as report:
    json.dump({"exit_code": code, "loaded": loaded, "imported_from": imported_from}, report)
sys.exit(code)
"""


def test_the_worker_never_imports_tensorflow(broker_url, prefix, workers, tmp_path):
    """Every kind of request, and a malformed one, run by a worker without TensorFlow.

    Through the worker's entry point as the command runs it: whatever import
    the command line, the executor's start or any request's handling pulls
    in is seen. Speed and memory are `bench/worker_start.py`'s.
    """
    report = tmp_path / "imports.json"
    fleet = workers(["a"], program=[sys.executable, "-c", _WORKER_REPORTING_IMPORTS, str(report)])
    raw = RawCoordinator(broker_url, prefix)
    try:
        executor = _Executor(raw)  # GetExecutor
        comp = executor.create_value(_value(_add_one, _add_one.type_signature))
        arg = executor.create_value(_value(np.float32(2.0), tff.TensorType(np.float32)))
        pair = executor.create_struct(arg)
        first = executor.create_selection(pair, 0)
        call = executor.create_call(comp, first)
        assert _computed_float(executor.compute(call)) == 3.0
        executor.dispose(comp, arg, pair, first, call)
        raw.send_task(
            executor_pb2.DisposeExecutorRequest(executor=executor.id),
            "dispose-executor",
            incarnation=executor.incarnation,
        )
        # A malformed request is refused as before: the light messages check it.
        task = envelope.task_envelope(
            kind=envelope.RequestKind.COMPUTE,
            job_id=raw.job_id,
            silo_id="a",
            task_id="garbage",
            incarnation=executor.incarnation,
        )
        raw.send("a", envelope.encode_task(task, b"\x0a\x03\x0a\x01\xc3", 1 << 20)[0], "garbage")
        _, result = raw.reply()
        assert result.error.code == envelope.ErrorCode.MALFORMED_TASK
        assert "not a valid ComputeRequest" in result.error.message
    finally:
        raw.close()
        exit_codes = fleet.close()  # SIGTERM: drains, then writes its report
    assert exit_codes == {"a": 0}
    imports = json.loads(report.read_text())
    assert imports["loaded"] == [], (
        f"the worker imported {imports['loaded'][:5]}..., first from:\n"
        + "".join(imports["imported_from"].values())
    )


# ------------------------------------------------------------------ batches
# Protocol version 3: a chain's tasks in one message (`TaskBatch`), the last
# one awaited. The delivery is acked once every task in it is done.


def _batch_body(
    raw: RawCoordinator, executor: _Executor, requests: list[object], task_ids: list[str]
) -> bytes:
    """`requests` as one TaskBatch to silo a's `executor`, under `task_ids`."""
    tasks = []
    for request, task_id in zip(requests, task_ids, strict=True):
        task = envelope.task_envelope(
            kind=envelope.spec_for_request(request).kind,
            job_id=raw.job_id,
            silo_id="a",
            task_id=task_id,
            incarnation=executor.incarnation,
            deadline_unix_ms=envelope.deadline_after(60),
        )
        tasks.append((task, request.SerializeToString()))
    return batch.encode_batch(tasks)


def _send_batch(raw: RawCoordinator, body: bytes, last: str, *, reply: bool = True) -> None:
    """As the coordinator sends a batch: its last task's id as correlation and message id."""
    raw.send("a", body, last, reply=reply, message_id=last, type=amqp.BATCH_TYPE)


def _chain(executor: _Executor, *, argument: executor_pb2.Value | None = None):
    """add_one(2.0) and its Compute: the requests, and their task ids (the first three
    name the values they make)."""
    task_ids = [uuid.uuid4().hex for _ in range(4)]
    if argument is None:
        argument = _value(np.float32(2.0), tff.TensorType(np.float32))
    requests = [
        executor_pb2.CreateValueRequest(
            executor=executor.id, value=_value(_add_one, _add_one.type_signature)
        ),
        executor_pb2.CreateValueRequest(executor=executor.id, value=argument),
        executor_pb2.CreateCallRequest(
            executor=executor.id, function_ref=_ref(task_ids[0]), argument_ref=_ref(task_ids[1])
        ),
        executor_pb2.ComputeRequest(executor=executor.id, value_ref=_ref(task_ids[2])),
    ]
    return requests, task_ids


def _logged_tasks(raw: RawCoordinator, task_ids: list[str], count: int) -> list[dict]:
    """The worker's `task` log events for `task_ids`, in the order logged, once
    `count` are (the reply or the dead-lettering can come before the line)."""
    return raw.worker.task_events(at_least=count, task_ids=set(task_ids))


def _nothing_left_unacked(raw: RawCoordinator) -> bool:
    """Stops the worker: a delivery it had not acked goes back to the silo queue."""
    raw.worker.stop()
    queue = raw.channel.queue_declare(raw.names.silo_queue("a"), passive=True)
    return queue.method.message_count == 0


def test_a_batch_runs_its_chain_and_answers_its_last_task_once(raw):
    executor = _Executor(raw)
    requests, task_ids = _chain(executor)
    _send_batch(raw, _batch_body(raw, executor, requests, task_ids), task_ids[-1])
    properties, result = raw.reply()
    assert properties.correlation_id == result.task_id == task_ids[-1]
    assert _computed_float(result) == 3.0
    assert raw.no_reply_within(1.0)  # the three Create* tasks are one-way
    logged = _logged_tasks(raw, task_ids, len(task_ids))
    assert sorted(e["task_id"] for e in logged) == sorted(task_ids)
    assert all(e["batched"] and e["outcome"] == "ok" and not e["cached"] for e in logged)
    assert _nothing_left_unacked(raw)  # acked, once every task was done


def test_a_batch_delivered_again_is_answered_from_the_cache_not_run_again(raw):
    executor = _Executor(raw)
    requests, task_ids = _chain(executor)
    body = _batch_body(raw, executor, requests, task_ids)
    _send_batch(raw, body, task_ids[-1])
    _, first = raw.reply()
    _send_batch(raw, body, task_ids[-1])  # as the broker redelivers it
    _, second = raw.reply()
    assert second.SerializeToString() == first.SerializeToString()
    logged = _logged_tasks(raw, task_ids, 8)
    assert len(logged) == 8
    ran = [e for e in logged if not e["cached"]]
    assert sorted(e["task_id"] for e in ran) == sorted(task_ids)  # each task ran once


def test_a_failed_create_in_a_batch_fails_its_compute_naming_the_cause(raw):
    executor = _Executor(raw)
    # An empty value: the executor service refuses it.
    requests, task_ids = _chain(executor, argument=executor_pb2.Value())
    _send_batch(raw, _batch_body(raw, executor, requests, task_ids), task_ids[-1])
    _, result = raw.reply()
    assert result.error.code == envelope.ErrorCode.EXECUTOR_ERROR
    assert f"uses value {task_ids[2]}, which could not be made" in result.error.message
    assert "CreateValue failed on silo 'a'" in result.error.message
    assert _nothing_left_unacked(raw)  # answered, so acked: not dead-lettered


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b"\xff\xff not a batch", envelope.ErrorCode.MALFORMED_TASK, "not a flaap_mq.v1.TaskBatch"),
        (
            task_pb2.TaskBatch(protocol_version=9, tasks=[b""]).SerializeToString(),
            envelope.ErrorCode.UNSUPPORTED_PROTOCOL,
            "batch of protocol version 9 is not supported",
        ),
    ],
)
def test_an_unreadable_batch_is_answered_and_dead_lettered_whole(raw, body, code, says):
    last = f"batch-{uuid.uuid4().hex[:8]}"
    _send_batch(raw, body, last)
    _, result = raw.reply()
    assert result.task_id == last
    assert result.error.code == code
    assert says in result.error.message
    assert not result.error.retryable
    assert_rejected_by_the_worker(raw.dead_letter(last), raw.names.silo_queue("a"))


def test_a_batch_with_a_task_no_worker_can_run_is_dead_lettered_once_the_rest_is_done(raw):
    """A Compute before the last task has no reply_to: refused; the batch dead-lettered."""
    executor = _Executor(raw)
    requests, task_ids = _chain(executor)
    # The Compute first, then the three Create* tasks: nothing is awaited.
    requests, task_ids = [requests[3], *requests[:3]], [task_ids[3], *task_ids[:3]]
    _send_batch(raw, _batch_body(raw, executor, requests, task_ids), task_ids[-1], reply=False)
    assert_rejected_by_the_worker(raw.dead_letter(task_ids[-1]), raw.names.silo_queue("a"))
    reason = logged_dead_letter_reason(raw.worker.log_text(), task_ids[0])
    assert "Compute task needs a reply_to" in reason
    logged = _logged_tasks(raw, task_ids, len(task_ids))
    assert {e["task_id"] for e in logged} == set(task_ids)  # all ran
