"""Row 6: a silo's worker killed mid-round; how long until the round completes without it.

Two silos, `min_silos=1`, a small `silo_grace` (3 s): each client of a round
waits 2 s without using CPU (silo data made on the silo: the computation may
do without a silo). Once silo s1 has started its part, its worker is killed
(SIGKILL); the round completes over s0. Measured: kill -> round completed,
against `silo_grace`. The worker is restarted between repeats, and the next
round must have both silos again. Every process started here is stopped.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.python.data.experimental.ops.testing import sleep

import flaap_mq
from flaap_mq.broker.declare import delete_topology
from flaap_mq.local.workers import WorkerFleet, WorkerProcess
from flaap_mq.protocol import topology

SILO_GRACE_S = 3.0
GOAL_SLACK_S = 3.0  # the round completes within silo_grace + this after the kill
CLIENT_WAIT_S = 2.0


@tff.tensorflow.computation(np.float32)
def _waiting(x: tf.Tensor) -> tf.Tensor:
    """`x`, after `CLIENT_WAIT_S` without using CPU."""
    value = tf.data.Dataset.from_tensors(x)
    return value.apply(sleep(int(CLIENT_WAIT_S * 1_000_000))).reduce(
        np.float32(0.0), lambda a, v: a + v
    )


@tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER))
def _count_clients(x: object) -> object:
    """x times the clients: no per-client part in argument or result, so a silo may
    be dropped; its SERVER argument is a new value on every silo each round."""
    return tff.federated_sum(tff.federated_map(_waiting, tff.federated_broadcast(x)))


def _values_made(log_path: Path) -> int:
    """CreateValue tasks done: the round's argument is one; the CreateCall that
    runs the clients' work comes next (and is logged only once done)."""
    if not log_path.exists():
        return 0
    text = log_path.read_text(errors="replace")
    return text.count('"kind": "CreateValue"')


def _kill_once_running(victim: WorkerProcess, before: int, killed: list[float]) -> None:
    """SIGKILLs `victim` once it has the round's argument (its part is starting)."""
    deadline = time.monotonic() + 60
    while _values_made(victim.log_path) <= before and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker's log is all there is to watch
    victim.kill()
    killed.append(time.monotonic())


def _delete_topology(broker_url: str, prefix: str, silo_ids: list[str]) -> None:
    delete_topology(broker_url, topology.Names(prefix), silos=silo_ids)


def measure_dropout(broker_url: str, log_dir: Path, repeats: int) -> dict[str, Any]:
    prefix = f"flaapbench-drop-{uuid.uuid4().hex[:6]}"
    silo_ids = ["s0", "s1"]
    fleet = WorkerFleet(broker_url, silo_ids, prefix=prefix, log_dir=log_dir)
    samples: list[float] = []
    try:
        fleet.start()
        with (
            flaap_mq.create_execution_context(
                broker_url,
                silo_ids,
                topology_prefix=prefix,
                min_silos=1,
                silo_grace=SILO_GRACE_S,
                task_timeout=120,
            ) as context,
            tff.framework.get_context_stack().install(context),
        ):
            if _count_clients(1.0) != 2.0:  # warm: both silos
                raise RuntimeError("the warm-up round did not count both silos")
            for _ in range(repeats):
                victim = fleet.workers["s1"]
                before = _values_made(victim.log_path)
                killed: list[float] = []

                killer = threading.Thread(target=_kill_once_running, args=(victim, before, killed))
                killer.start()
                try:
                    result = _count_clients(1.0)
                finally:
                    killer.join()
                samples.append(time.monotonic() - killed[0])
                taken = context.last_participation
                if result != 1.0 or taken is None or taken.silos != ("s0",):
                    raise RuntimeError(f"round without s1 went wrong: {result}, {taken}")
                fleet.start_worker("s1")
                if _count_clients(1.0) != 2.0:
                    raise RuntimeError("s1 did not rejoin after its restart")
    finally:
        fleet.close()
        _delete_topology(broker_url, prefix, silo_ids)
    return {
        "silo_grace_s": SILO_GRACE_S,
        "client_wait_s": CLIENT_WAIT_S,
        "repeats": repeats,
        "kill_to_round_done_s": [round(s, 3) for s in samples],
        "median_s": statistics.median(samples),
        "worker_processes_left": [s for s, w in fleet.workers.items() if w.process.poll() is None],
    }


def format_dropout(row: dict[str, Any]) -> str:
    return "\n".join(
        [
            "Row 6: a silo's worker SIGKILLed mid-round, 2 silos, min_silos=1, "
            f"silo_grace {row['silo_grace_s']:g} s",
            f"  kill -> round completed without it: median {row['median_s']:.2f} s "
            f"(each: {row['kill_to_round_done_s']} s); the restarted worker took part "
            "in the next round",
        ]
    )


def dropout_verdict(row: dict[str, Any]):  # -> report.Verdict
    from bench.report import Verdict

    goal = row["silo_grace_s"] + GOAL_SLACK_S
    return Verdict(
        row="6. silo killed: round done without it",
        measured=f"{row['median_s']:.2f} s after the kill (silo_grace {row['silo_grace_s']:g} s)",
        goal=f"<= {goal:g} s",
        met=row["median_s"] <= goal,
    )
