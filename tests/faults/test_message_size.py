"""A message over the broker's size limit is refused with a clear error, never dropped silently.

* The coordinator knows the limit: the task is refused before it is sent.
* The broker's limit is lower than the coordinator thinks (a private node
  with `max_message_size` = 4 MiB, the client left at RabbitMQ's 128 MiB
  default): the broker closes the channel; the caller still gets
  `MessageTooLargeError`, quickly, and the link goes on serving other calls.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization

import flaap_mq
from flaap_mq.coordinator.task_client import TaskClient
from flaap_mq.local.workers import WorkerFleet
from flaap_mq.protocol import topology
from tests.faults import comps, support
from tests.faults.conftest import PRIVATE_MAX_MESSAGE_BYTES


def _create_value(num_bytes: int) -> executor_pb2.CreateValueRequest:
    value, _ = value_serialization.serialize_value(
        np.zeros(num_bytes // 4, np.float32), tff.TensorType(np.float32, [num_bytes // 4])
    )
    return executor_pb2.CreateValueRequest(
        executor=executor_pb2.ExecutorId(id="any/clients=1"), value=value
    )


def test_task_over_the_known_limit_is_refused_before_sending(broker_url, prefix):
    names = topology.Names(prefix)
    client = TaskClient(broker_url, ["a"], names=names, max_message_bytes=64 * 1024)
    client.start()
    try:
        with pytest.raises(flaap_mq.MessageTooLargeError) as raised:
            asyncio.run(client.ask("a", _create_value(100 * 1024), timeout_s=30))
    finally:
        client.close()
    assert "over the broker's limit of 65536 bytes" in str(raised.value)
    assert raised.value.silo_id == "a"
    assert support.drain(broker_url, names.silo_queue("a")) == []


@pytest.mark.broker_node
def test_task_over_the_brokers_own_limit_fails_clearly_and_the_link_recovers(
    private_node, node_prefix, tmp_path
):
    url = private_node.url
    names = topology.Names(node_prefix)
    fleet = WorkerFleet(url, ["a"], prefix=node_prefix, log_dir=tmp_path).start()
    executors = fleet.workers["a"].executor_pids()
    try:
        context = flaap_mq.create_execution_context(
            url, ["a"], topology_prefix=node_prefix, task_timeout=60, max_attempts=1
        )
        with tff.framework.get_context_stack().install(context):
            assert comps.mean([1.0, 3.0]) == pytest.approx(2.0)
            # Over the broker's limit, under the client's (RabbitMQ's default).
            too_big = _create_value(PRIVATE_MAX_MESSAGE_BYTES + 1024 * 1024)
            started = time.monotonic()
            with pytest.raises(flaap_mq.MessageTooLargeError) as raised:
                asyncio.run(context.client.ask("a", too_big, timeout_s=60))
            refused_in = time.monotonic() - started
            assert refused_in < 20, "the caller waited for a timeout instead of an error"
            assert "refused by the broker: over its limit of 4194304 bytes" in str(raised.value)
            # The next over-sized message is refused before sending: the link
            # learnt the broker's limit.
            with pytest.raises(flaap_mq.MessageTooLargeError):
                asyncio.run(context.client.ask("a", too_big, timeout_s=60))
            # Everything else goes on working on the same connection.
            assert comps.mean([2.0, 4.0]) == pytest.approx(3.0)
        sent = context.client.requests_sent
        context.close()
        support.wait_queues_empty(url, [names.silo_queue("a")])
    finally:
        support.assert_nothing_left(fleet, executors)
    assert support.drain(url, names.silo_queue("a")) == []
    assert support.drain(url, names.dead_letter_queue) == []
    counted = support.tally(support.fleet_events(fleet))
    assert len(counted.task_ids) == sent - 2  # all but the two refused
    support.record(
        "message_over_broker_limit",
        refused_in_s=round(refused_in, 2),
        error=str(raised.value)[:200],
        tasks_lost=0,
        duplicate_executions=counted.duplicate_executions,
    )
