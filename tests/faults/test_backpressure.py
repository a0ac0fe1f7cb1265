"""Backpressure: 2,500 tasks queued for one silo do not grow its worker past the prefetch window.

The tasks (64 KB CreateValue requests on a real executor, 160 MB in all)
wait in the broker; the worker holds at most `prefetch` of them at a time, so
its resident memory (psutil, the worker process alone) stays flat while it
works through them. Every task is answered exactly once.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pika
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import placements

from flaap_mq.broker.declare import declare_blocking
from flaap_mq.protocol import envelope, topology
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.testing import messages
from tests.faults import support

# 160 MB queued in all, far over what the memory bound below allows, so a
# worker that held the queue (or kept the requests it served) fails it. This
# was 10,000 tasks of 16 KB: the same bytes, at four times the per-message
# cost to this suite (publish, deliver, run, reply), for no assertion more.
TASKS = 2_500
VALUE_FLOATS = 16 * 1024  # 64 KB a task
PREFETCH = 8
SILO = "bp"


def _task(request, task_id: str, incarnation: str = "") -> bytes:
    return messages.build_task(
        request=request,
        job_id="bp",
        silo_id=SILO,
        task_id=task_id,
        deadline_unix_ms=envelope.deadline_after(900),
        incarnation=incarnation,
    ).SerializeToString()


def test_thousands_of_queued_tasks_stay_outside_the_worker(workers, broker_url, prefix):
    names = topology.Names(prefix)
    fleet = workers([SILO], extra_args=["--prefetch", str(PREFETCH)])
    worker = fleet.workers[SILO]
    executors = worker.executor_pids()
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    job = f"bp-{uuid.uuid4().hex[:8]}"
    declare_blocking(channel, topology.reply_declarations(names, job))
    reply_queue = names.reply_queue(job)

    incarnation = ""

    def send(request, task_id: str) -> None:
        channel.basic_publish(
            names.tasks_exchange,
            SILO,
            _task(request, task_id, incarnation),
            pika.BasicProperties(
                delivery_mode=2,
                # A Create* task's message id names the value it makes.
                message_id=task_id,
                correlation_id=task_id,
                reply_to=job,
                type=envelope.spec_for_request(request).name,
            ),
        )

    def replies() -> int:
        return channel.queue_declare(reply_queue, passive=True).method.message_count

    # An executor on the silo to create the values in.
    send(
        executor_pb2.GetExecutorRequest(
            cardinalities=value_serialization.serialize_cardinalities({placements.CLIENTS: 1})
        ),
        "get-executor",
    )
    support.wait_until(lambda: replies() == 1, 60, "GetExecutor answered")
    _, _, body = channel.basic_get(reply_queue, auto_ack=True)
    result = task_pb2.TaskResult.FromString(body)
    executor = executor_pb2.GetExecutorResponse.FromString(result.response).executor
    incarnation = result.worker_incarnation
    value, _ = value_serialization.serialize_value(
        np.arange(VALUE_FLOATS, dtype=np.float32), tff.TensorType(np.float32, [VALUE_FLOATS])
    )
    request = executor_pb2.CreateValueRequest(executor=executor, value=value)

    # Warm up, so the baseline includes what serving any task costs.
    for i in range(200):
        send(request, f"warm-{i}")
    support.wait_until(lambda: replies() == 200, 120, "warm-up answered")
    channel.queue_purge(reply_queue)
    time.sleep(1)
    rss_base = support.rss_bytes(worker.pid)

    began = time.monotonic()
    for i in range(TASKS):
        send(request, f"task-{i}")
    published_in = time.monotonic() - began
    rss_peak, depth_peak = rss_base, 0
    deadline = time.monotonic() + 600
    while True:
        rss_peak = max(rss_peak, support.rss_bytes(worker.pid))
        depth = channel.queue_declare(names.silo_queue(SILO), passive=True).method.message_count
        depth_peak = max(depth_peak, depth)
        done = replies()
        if done >= TASKS:
            break
        assert time.monotonic() < deadline, f"only {done} of {TASKS} answered"
        assert worker.process.poll() is None, "the worker died"
        time.sleep(0.2)
    drained_in = time.monotonic() - began
    answered: dict[str, int] = {}
    for method, properties, body in channel.consume(
        reply_queue, auto_ack=True, inactivity_timeout=2
    ):
        if method is None:
            break
        answered[properties.correlation_id] = answered.get(properties.correlation_id, 0) + 1
        assert task_pb2.TaskResult.FromString(body).WhichOneof("outcome") == "response"
    connection.close()
    support.assert_nothing_left(fleet, executors)
    assert support.drain(broker_url, names.silo_queue(SILO)) == []
    assert support.drain(broker_url, names.dead_letter_queue) == []

    assert len(answered) == TASKS and set(answered.values()) == {1}
    counted = support.tally(support.fleet_events(fleet))
    assert counted.duplicate_executions == 0
    queued_mb = TASKS * len(_task(request, "task-0")) / 2**20
    growth_mb = (rss_peak - rss_base) / 2**20
    # The window is 8 tasks of 64 KB; allow for the allocator and the results
    # cache's bookkeeping, far below the 160 MB a worker holding the queue would need.
    assert growth_mb < 40, growth_mb
    assert depth_peak > PREFETCH * 10, depth_peak  # the tasks really were queued
    support.record(
        "backpressure",
        tasks=TASKS,
        prefetch=PREFETCH,
        queued_mb=round(queued_mb, 1),
        queue_depth_peak=depth_peak,
        rss_base_mb=round(rss_base / 2**20, 1),
        rss_growth_mb=round(growth_mb, 1),
        published_s=round(published_in, 1),
        drained_s=round(drained_in, 1),
        tasks_lost=0,
        duplicate_executions=0,
    )
