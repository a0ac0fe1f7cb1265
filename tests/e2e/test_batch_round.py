"""End to end: an invocation's chain of requests reaches each silo in one message.

Protocol version 3 (`TaskBatch`): the one-way Create* tasks of a chain wait in
the coordinator's outbox and travel with the Compute that needs them, so a
silo gets one persistent, confirmed message per invocation, and answers with
one (docs/design.md, "One broker round trip per chain").
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow_federated as tff

import flaap_mq

SILOS = ["a", "b", "c"]


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def mean(values):
    return tff.federated_mean(values)


def test_each_silo_gets_one_message_per_invocation_and_answers_once(
    module_workers, broker_url, module_prefix
):
    fleet = module_workers(SILOS)
    calls = 12
    with (
        flaap_mq.create_execution_context(
            broker_url, SILOS, topology_prefix=module_prefix, task_timeout=120
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        # Each worker logs a task after replying: wait for as many as were sent.
        sent = collections.Counter()
        context.client.observe(lambda exchange: sent.update([exchange.silo_id]))
        assert mean([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # executors made, computation sent
        seen = {s: len(w.task_events(at_least=sent[s])) for s, w in fleet.workers.items()}
        messages, requests = context.client.messages_published, context.client.requests_sent
        for i in range(calls):
            assert mean([float(i), 2.0 * i, 3.0 * i]) == pytest.approx(2.0 * i)
        messages = context.client.messages_published - messages
        requests = context.client.requests_sent - requests

    # Three or more requests per silo and invocation; close to one message each.
    assert requests >= 3 * calls * len(SILOS)
    assert messages <= requests / 2, (messages, requests)
    for silo_id, worker in fleet.workers.items():
        tasks = worker.task_events(at_least=sent[silo_id])[seen[silo_id] :]
        awaited = [t for t in tasks if not t["one_way"]]
        assert len(awaited) == calls, (silo_id, awaited)  # one answer per invocation
        # Every Compute came with the tasks of its chain, in one batch.
        assert all(t["kind"] == "Compute" and t["batched"] for t in awaited), awaited
        assert all(t["outcome"] == "ok" and not t["cached"] for t in tasks)
