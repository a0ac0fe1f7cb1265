"""Two coordinators (jobs) running different computations on the same silos at the same time.

Each gets its own answers, every round; the workers' logs show every task a
job sent handled exactly once, under that job's id, and nothing else.
"""

from __future__ import annotations

import threading

import pytest
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.protocol import topology
from tests.faults import comps, support

SILOS = ["a", "b", "c"]
ROUNDS = 4


def test_two_jobs_on_the_same_silos_each_get_their_own_answers(workers, broker_url, prefix):
    names = topology.Names(prefix)
    fleet = workers(SILOS)
    executors = {p for w in fleet.workers.values() for p in w.executor_pids()}
    contexts = [
        flaap_mq.create_execution_context(
            broker_url, SILOS, topology_prefix=prefix, task_timeout=120
        )
        for _ in range(2)
    ]
    answers: dict[str, list[tuple[float, float]]] = {c.job_id: [] for c in contexts}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def job_means(context):
        with tff.framework.get_context_stack().install(context):
            start.wait()
            for i in range(ROUNDS):
                values = [float(i + k) for k in range(6)]
                answers[context.job_id].append((comps.mean(values), sum(values) / 6))

    def job_scaled_sums(context):
        with tff.framework.get_context_stack().install(context):
            start.wait()
            for i in range(ROUNDS):
                values = [float(10 * i + k) for k in range(5)]
                got = comps.scaled_sum(float(i + 2), values)
                answers[context.job_id].append((got, (i + 2) * sum(values)))

    def run(fn, context):
        try:
            fn(context)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(job_means, contexts[0])),
        threading.Thread(target=run, args=(job_scaled_sums, contexts[1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a job hangs"
    assert not errors, errors
    for job, pairs in answers.items():
        assert len(pairs) == ROUNDS, job
        for got, want in pairs:
            assert got == pytest.approx(want), job

    sent = {c.job_id: c.client.requests_sent for c in contexts}
    for c in contexts:
        c.close()
    support.wait_queues_empty(broker_url, [names.silo_queue(s) for s in SILOS])
    support.assert_nothing_left(fleet, executors)
    for silo in SILOS:
        assert support.drain(broker_url, names.silo_queue(silo)) == []
    assert support.drain(broker_url, names.dead_letter_queue) == []
    events = [e for e in support.fleet_events(fleet) if e.get("event") == "task"]
    for job, count in sent.items():
        mine = {e["task_id"] for e in events if e.get("job") == job}
        assert len(mine) == count, (job, len(mine), count)
    assert {e.get("job") for e in events} == set(sent), "a task of another job reached the silos"
    counted = support.tally(events)
    assert counted.duplicate_executions == 0
    support.record(
        "jobs_apart",
        jobs=2,
        rounds=2 * ROUNDS,
        survived=sum(len(p) for p in answers.values()),
        tasks=sum(sent.values()),
        tasks_lost=0,
        duplicate_executions=0,
        crossed_replies=0,
    )
