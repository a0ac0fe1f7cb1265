"""A silo worker and its executor SIGKILLed mid-round, then restarted as systemd would.

Tasks the dead worker held go back to the silo queue; the new worker (a new
incarnation) must answer those that refer to the dead executor's state with a
retryable STATE_LOST, never run them, and TFF's context re-runs the
invocation on a fresh executor: the round ends with the right answer.
"""

from __future__ import annotations

import random
import time

import pytest

import flaap_mq
from flaap_mq.executor import wait_until_gone
from flaap_mq.protocol import topology
from tests.faults import comps, support
from tests.faults.rounds import BackgroundRound, pending_requests, wait_for_pending

SILOS = ["a", "b"]
# 4 clients, 2 per silo, 6 readings each: about 1.5 s of CreateCall per silo.
DATA = [[float(i + 1)] * 6 for i in range(4)]
EXPECTED = sum(sum(d) for d in DATA)


def _crash_and_restart(fleet, silo_id: str, executor_pids: set[int]) -> None:
    worker = fleet.workers[silo_id]
    executors = worker.executor_pids()
    worker.kill()  # SIGKILL: no drain, no goodbye to the broker
    for pid in executors:
        # PR_SET_PDEATHSIG: the kernel kills the executor with its worker.
        assert wait_until_gone(pid, 10), f"worker_binary {pid} outlived its SIGKILLed worker"
    restarted = fleet.start_worker(silo_id)  # as systemd's Restart=always would
    executor_pids.update(restarted.executor_pids())


def _check_afterwards(fleet, broker_url, prefix, context, executor_pids) -> support.Tally:
    names = topology.Names(prefix)
    sent = context.client.requests_sent
    context.close()
    support.wait_queues_empty(broker_url, [names.silo_queue(s) for s in SILOS])
    support.assert_nothing_left(fleet, executor_pids)
    for silo in SILOS:
        assert support.drain(broker_url, names.silo_queue(silo)) == [], f"silo {silo} clogged"
    dead = support.drain(broker_url, names.dead_letter_queue)
    assert dead == [], [support.dead_letter_reason(p) for p, _ in dead]
    counted = support.tally(support.fleet_events(fleet))
    assert counted.duplicate_executions == 0, counted.duplicated_ids
    # Every task the coordinator sent was handled by some incarnation (the
    # disposals the closing context sends included): none was lost.
    assert len(counted.task_ids) == sent, (len(counted.task_ids), sent)
    return counted


def test_worker_killed_mid_call_is_restarted_and_the_round_completes(workers, broker_url, prefix):
    fleet = workers(SILOS)
    executor_pids = {p for w in fleet.workers.values() for p in w.executor_pids()}
    context = flaap_mq.create_execution_context(
        broker_url, SILOS, topology_prefix=prefix, task_timeout=90, max_attempts=4
    )
    assert context.silo_ids == SILOS
    round_ = BackgroundRound(context, comps.slow_total, DATA)
    # Kill silo a's worker while it runs the slow CreateCall for this round.
    wait_for_pending(context, "a", "Compute")
    time.sleep(0.3)
    _crash_and_restart(fleet, "a", executor_pids)
    assert round_.wait(240) == pytest.approx(EXPECTED)
    # The next round on the same context: right answer too.
    second = BackgroundRound(context, comps.slow_total, DATA)
    assert second.wait(240) == pytest.approx(EXPECTED)

    counted = _check_afterwards(fleet, broker_url, prefix, context, executor_pids)
    # The new incarnation refused the dead one's tasks rather than run them.
    assert counted.outcomes["state_lost"] >= 1, counted.outcomes
    assert len(counted.incarnations) == 3  # a, b, and a's second life
    support.record(
        "worker_crash",
        rounds=2,
        survived=2,
        kills=1,
        tasks=len(counted.task_ids),
        tasks_lost=0,
        duplicate_executions=counted.duplicate_executions,
        state_lost=counted.outcomes["state_lost"],
        redelivered=counted.redelivered,
    )


@pytest.mark.faults
def test_worker_killed_at_random_points_ten_times(workers, broker_url, prefix):
    rng = random.Random(20261127)
    fleet = workers(SILOS)
    executor_pids = {p for w in fleet.workers.values() for p in w.executor_pids()}
    context = flaap_mq.create_execution_context(
        broker_url, SILOS, topology_prefix=prefix, task_timeout=90, max_attempts=6
    )
    survived = 0
    kill_points = []
    for _ in range(10):
        round_ = BackgroundRound(context, comps.slow_total, DATA)
        time.sleep(rng.uniform(0.0, 4.0))  # anywhere in the round, or just after it
        silo = rng.choice(SILOS)
        kill_points.append(sorted(pending_requests(context)))
        _crash_and_restart(fleet, silo, executor_pids)
        assert round_.wait(300) == pytest.approx(EXPECTED)
        survived += 1
    counted = _check_afterwards(fleet, broker_url, prefix, context, executor_pids)
    support.record(
        "worker_crash_random_x10",
        rounds=10,
        survived=survived,
        kills=10,
        tasks=len(counted.task_ids),
        tasks_lost=0,
        duplicate_executions=counted.duplicate_executions,
        state_lost=counted.outcomes["state_lost"],
        redelivered=counted.redelivered,
        waiting_on_at_kill=kill_points,
    )
