"""A real worker process answering hand-made tasks over a real broker.

These talk to the worker with raw pika, as a coordinator of another version
(or a confused one) would, and check what comes back on the wire.
"""

from __future__ import annotations

import time
import uuid

import pika
import pytest
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import placements

from flaap_mq.protocol import envelope, topology
from flaap_mq.protocol.v1 import task_pb2


class RawCoordinator:
    """A reply queue and a publisher, with nothing of flaap-mq's coordinator."""

    def __init__(self, broker_url: str, prefix: str) -> None:
        self.names = topology.Names(prefix)
        self.job_id = f"raw-{uuid.uuid4().hex[:8]}"
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()
        topology.declare_blocking(
            self.channel,
            topology.shared_declarations(self.names)
            + topology.reply_declarations(self.names, self.job_id),
        )
        self.channel.confirm_delivery()

    def send(self, silo_id: str, body: bytes, correlation_id: str, **props: object) -> None:
        self.channel.basic_publish(
            self.names.tasks_exchange,
            silo_id,
            body,
            pika.BasicProperties(
                delivery_mode=2, correlation_id=correlation_id, reply_to=self.job_id, **props
            ),
            mandatory=True,
        )

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

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def raw(broker_url, prefix, workers):
    workers(["a"])
    coordinator = RawCoordinator(broker_url, prefix)
    yield coordinator
    coordinator.close()


def _get_executor_task(task_id: str, **overrides: object) -> task_pb2.Task:
    task = envelope.build_task(
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


def test_get_executor_answers_with_an_id_naming_the_worker_incarnation(raw):
    raw.send("a", _get_executor_task("t1").SerializeToString(), "t1")
    properties, result = raw.reply()
    assert properties.correlation_id == "t1"
    assert properties.user_id == "guest"  # checked by the broker against the login
    assert result.WhichOneof("outcome") == "response", result.error.message
    executor = executor_pb2.GetExecutorResponse.FromString(result.response).executor
    assert executor.id.startswith(result.worker_incarnation + "/")


def test_unknown_protocol_version_gets_a_clear_error_result(raw):
    raw.send("a", _get_executor_task("t2", protocol_version=7).SerializeToString(), "t2")
    _, result = raw.reply()
    assert result.error.code == envelope.ErrorCode.UNSUPPORTED_PROTOCOL
    assert "protocol version 7 is not supported" in result.error.message
    assert not result.error.retryable


def test_request_for_an_unknown_incarnation_is_retryable_state_lost(raw):
    request = executor_pb2.ComputeRequest(
        executor=executor_pb2.ExecutorId(id="someoneelse/clients=1"),
        value_ref=executor_pb2.ValueRef(id="1"),
    )
    task = envelope.build_task(request=request, job_id="raw", silo_id="a", task_id="t3")
    raw.send("a", task.SerializeToString(), "t3")
    _, result = raw.reply()
    assert result.error.code == envelope.ErrorCode.STATE_LOST
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
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        method, properties, _ = raw.channel.basic_get(raw.names.dead_letter_queue, auto_ack=True)
        if method is not None and properties.message_id == "bad-6":
            assert properties.headers["x-flaap-reason"].startswith("malformed")
            return
        time.sleep(0.1)
    pytest.fail("the malformed task did not reach the dead-letter queue")


def test_expired_task_is_dead_lettered_by_the_broker_not_run(broker_url, prefix):
    # No worker: the task expires in the silo queue.
    coordinator = RawCoordinator(broker_url, prefix)
    try:
        topology.declare_blocking(
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
