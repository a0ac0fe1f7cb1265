"""A reply the broker refuses (its reply queue is full): retried after a pause, never spun.

The generated definitions bound every reply queue (`max-length-bytes`,
overflow `reject-publish`), so a worker's reply to a full queue is nacked.
The worker then gives the task back to its silo queue after a pause that
doubles at each redelivery; the redelivery is answered from its results
cache, not run again. Once the queue has room the reply goes through; if it
never does, the silo queue's delivery limit dead-letters the task.

Here the reply queue is declared full by its own arguments (`x-max-length`
0, `reject-publish`), which behave as the policy does, so these run on the
shared broker without changing its policies.
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
from flaap_mq.testing import messages
from flaap_mq.worker import request as request_module
from tests.faults import support

SILO = "a"


def _declare_reply_queue(
    channel: object, names: topology.Names, queue: str, job: str, *, full: bool
) -> None:
    """A queue for `job`'s replies; `full`: one that refuses every message.

    Classic, unlike the reply queue a coordinator declares: a quorum queue
    takes a message while it is under its bound, so `x-max-length: 0` only
    refuses the second one.
    """
    arguments: dict[str, object] = {"x-queue-type": "classic", "x-expires": 120_000}
    if full:
        arguments |= {"x-max-length": 0, "x-overflow": "reject-publish"}
    channel.queue_declare(queue, durable=True, arguments=arguments)
    channel.queue_bind(queue, names.replies_exchange, routing_key=job)


def _send_get_executor(channel: object, names: topology.Names, job: str, task_id: str) -> None:
    task = messages.build_task(
        request=executor_pb2.GetExecutorRequest(
            cardinalities=value_serialization.serialize_cardinalities({placements.CLIENTS: 1})
        ),
        job_id=job,
        silo_id=SILO,
        task_id=task_id,
        deadline_unix_ms=envelope.deadline_after(300),
    )
    channel.basic_publish(
        names.tasks_exchange,
        SILO,
        task.SerializeToString(),
        pika.BasicProperties(
            delivery_mode=2, message_id=task_id, correlation_id=task_id, reply_to=job
        ),
        mandatory=True,
    )


def _events(fleet: object, event: str, task_id: str) -> list[dict]:
    return [
        e
        for e in support.fleet_events(fleet)
        if e.get("event") == event and task_id in (e.get("message_id"), e.get("task_id"))
    ]


def test_a_reply_refused_by_a_full_reply_queue_is_sent_again_from_the_cache(
    workers, broker_url, prefix
):
    names = topology.Names(prefix)
    fleet = workers([SILO])
    job = f"full-{uuid.uuid4().hex[:8]}"
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        _declare_reply_queue(channel, names, names.reply_queue(job), job, full=True)
        channel.confirm_delivery()
        _send_get_executor(channel, names, job, task_id)
        support.wait_until(
            lambda: _events(fleet, "reply_not_confirmed", task_id), 30, "the reply nacked"
        )
        refused = _events(fleet, "reply_not_confirmed", task_id)[0]
        assert "broker refused (nack)" in refused["error"]
        assert "max-length-bytes" in refused["error"]
        assert refused["requeue_in_s"] == request_module.REQUEUE_FIRST_PAUSE_S
        # The coordinator catches up: its replies have room again. (A queue
        # with room is bound before the full one goes, so that no reply is
        # ever unroutable in between, which the worker would take as "the
        # coordinator is gone".)
        roomy = names.reply_queue(f"{job}-roomy")
        _declare_reply_queue(channel, names, roomy, job, full=False)
        channel.queue_delete(names.reply_queue(job))
        reply = None
        deadline = time.monotonic() + 30
        while reply is None and time.monotonic() < deadline:
            method, props, body = channel.basic_get(roomy, auto_ack=True)
            if method is None:
                time.sleep(0.1)
            else:
                reply = (props, task_pb2.TaskResult.FromString(body))
        channel.queue_delete(roomy)
    finally:
        connection.close()
    assert reply is not None, "the reply never came once the queue had room"
    props, result = reply
    assert props.correlation_id == task_id
    assert result.WhichOneof("outcome") == "response", result.error.message
    runs = [(e["cached"], e["redelivered"]) for e in _events(fleet, "task", task_id)]
    # Run once; every later delivery answered from the cache.
    assert runs[0] == (False, False) and all(r == (True, True) for r in runs[1:]), runs
    assert len(runs) >= 2
    assert support.drain(broker_url, names.dead_letter_queue) == []


@pytest.mark.faults
def test_a_reply_queue_that_stays_full_ends_the_task_at_the_delivery_limit(
    workers, broker_url, prefix
):
    """About 61 s: pauses of 1, 2, 4, 8, 16 and 30 s between the 6 deliveries."""
    names = topology.Names(prefix)
    fleet = workers([SILO])
    job = f"full-{uuid.uuid4().hex[:8]}"
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    started = time.monotonic()
    try:
        channel = connection.channel()
        _declare_reply_queue(channel, names, names.reply_queue(job), job, full=True)
        channel.confirm_delivery()
        _send_get_executor(channel, names, job, task_id)
        dead = None
        deadline = time.monotonic() + 120
        while dead is None and time.monotonic() < deadline:
            method, props, _ = channel.basic_get(names.dead_letter_queue, auto_ack=True)
            if method is None:
                time.sleep(0.5)
            elif props.message_id == task_id:
                dead = props
        channel.queue_delete(names.reply_queue(job))
    finally:
        connection.close()
    elapsed = time.monotonic() - started
    assert dead is not None, "the task was never dead-lettered"
    assert support.dead_letter_reason(dead) == "delivery_limit"
    refusals = _events(fleet, "reply_not_confirmed", task_id)
    limit = topology.DEFAULT_DELIVERY_LIMIT
    assert [e["delivery_count"] for e in refusals] == list(range(limit + 1))
    assert [e["requeue_in_s"] for e in refusals] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    counted = support.tally(support.fleet_events(fleet))
    assert counted.executions[task_id] == 1, counted.outcomes
    support.record(
        "reply_queue_full",
        deliveries=len(refusals),
        dead_lettered="delivery_limit",
        executions=1,
        seconds_to_dead_letter=round(elapsed, 1),
    )
