"""A training coordinator SIGKILLed mid-round leaves nothing on the broker, and resumes.

What the dead coordinator left behind is cleaned up without anyone's help:

* its reply queue expires (`x-expires`, here `--reply-queue-expires 3`),
  and with it the replies to the tasks it sent before dying;
* the workers take the rest of its tasks from the silo queues and run them
  (their deadline, `--task-timeout`, is 10 minutes away); a reply published
  after the queue expired is unroutable, logged and the task acked;
* nothing is dead-lettered: no task expired, none was refused.

Then the same command resumes the run from its last saved round (the
weights against an uninterrupted run: tests/e2e/test_training_resume.py),
and once the workers are stopped every queue is drained with a consumer
(quorum queues' counts can lag) and found empty: the silo queues and the
dead-letter queue, and the reply queues of both coordinators are gone.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flaap_mq.data.fleet import SiloDataFleet
from flaap_mq.protocol import topology
from flaap_mq.testing.cli import run_cli
from tests import training_resume as tr
from tests.conftest import list_queues
from tests.faults import support

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def data_dir(digits_split) -> Path:
    return digits_split(2)


def test_a_dead_training_coordinator_leaves_every_queue_empty(
    broker_url, prefix, data_dir, tmp_path
):
    names = topology.Names(prefix)
    out = tmp_path / "out"
    args = tr.train_args(broker_url, prefix, data_dir, out)
    started = time.monotonic()
    fleet = SiloDataFleet(
        broker_url, {silo: data_dir / silo for silo in tr.SILOS}, prefix=prefix, log_dir=tmp_path
    ).start()
    worker_logs = [w.log_path for w in fleet.workers.values()]
    executors = [pid for w in fleet.workers.values() for pid in w.executor_pids()]
    try:
        dead_job = tr.kill_mid_round(args, tmp_path)
        killed_at = time.monotonic()
        # Asked with rabbitmqctl: a passive declare would count as a use and
        # keep the queue from expiring.
        support.wait_until(
            lambda: names.reply_queue(dead_job) not in list_queues(prefix),
            tr.REPLY_QUEUE_EXPIRES_S + 30,
            "the dead coordinator's reply queue expired",
        )
        expired_after = time.monotonic() - killed_at
        # The workers took every task the dead coordinator had sent.
        support.wait_queues_empty(broker_url, [names.silo_queue(s) for s in tr.SILOS])

        resumed = run_cli(*args, cwd=tmp_path, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-5000:]
        assert f"resumed after round {tr.KILL_AFTER}" in resumed.stdout
        assert tr.row_rounds(out) == list(range(tr.ROUNDS + 1))
        resumed_job = next(
            e["job"] for e in tr.events(resumed.stderr) if e.get("event") == "coordinator_connected"
        )
        support.wait_queues_empty(broker_url, [names.silo_queue(s) for s in tr.SILOS])
    finally:
        support.assert_nothing_left(fleet, executors)

    # Drained with a consumer (the workers are stopped, so it is the active one).
    for silo in tr.SILOS:
        assert support.drain(broker_url, names.silo_queue(silo)) == []
    dead_letters = support.drain(broker_url, names.dead_letter_queue)
    assert dead_letters == [], [support.dead_letter_reason(p) for p, _ in dead_letters]
    support.wait_until(
        lambda: names.reply_queue(resumed_job) not in list_queues(prefix),
        tr.REPLY_QUEUE_EXPIRES_S + 30,
        "the resumed coordinator's reply queue gone",
    )
    assert sorted(list_queues(prefix)) == sorted(
        [names.dead_letter_queue, *(names.silo_queue(s) for s in tr.SILOS)]
    )
    events = support.read_events(worker_logs)
    counted = support.tally(events)
    assert counted.duplicate_executions == 0, counted.duplicated_ids
    dead_tasks = {e.get("task_id") for e in events if e.get("job") == dead_job}
    unroutable = [e for e in events if str(e.get("event", "")).endswith("_unroutable")]
    support.record(
        "dead_training_coordinator",
        reply_queue_expired_s=round(expired_after, 1),
        dead_job_tasks_run=len(dead_tasks),
        unroutable_replies=len(unroutable),
        dead_lettered=0,
        duplicate_executions=0,
        seconds=round(time.monotonic() - started),
    )
