"""3 silos training, one worker SIGKILLed mid-round: the round completes over the other two.

`--min-silos 2` semantics through the library (`min_silos=2`), so that each
round's state can be checked against TFF's local runtime over exactly the
silos that took part: round 1 all three; round 2 silo-3 killed mid-round
(dropped after `silo_grace`); round 3 silo-3 still down (left out at once);
then silo-3 restarted; round 4 all three again.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.data import digits
from flaap_mq.data.fleet import SiloDataFleet
from flaap_mq.data.silo import read_silo_dataset
from flaap_mq.executor import wait_until_gone
from flaap_mq.local.workers import WorkerProcess
from flaap_mq.testing.tff_local import local_cpp_contexts
from flaap_mq.training.config import TrainingConfig
from flaap_mq.training.fedavg import SiloFedAvg
from tests.faults import support

SILOS = digits.silo_ids(3)
GRACE_S = 4.0
SEED = 3
# Enough local work that a round lasts several seconds: the kill lands inside it.
LOCAL_EPOCHS = 40


def _values_made(worker: WorkerProcess) -> int:
    """CreateValue tasks the worker has finished: the round's state is one; the
    CreateCall that trains on it comes next (and is logged only once done)."""
    events = support.read_events([worker.log_path])
    return sum(1 for e in events if e.get("event") == "task" and e.get("kind") == "CreateValue")


@pytest.mark.faults
def test_a_silo_killed_mid_round_is_dropped_and_rejoins_when_restarted(
    broker_url: str, prefix: str, tmp_path: Path, digits_split
) -> None:
    data_dir = digits_split(3)
    config = TrainingConfig(seed=SEED, local_epochs=LOCAL_EPOCHS)
    algorithm = SiloFedAvg(config)
    fleet = SiloDataFleet(
        broker_url,
        {s: data_dir / s for s in SILOS},
        prefix=prefix,
        log_dir=tmp_path / "logs",
    )
    (tmp_path / "logs").mkdir()
    rounds: list[tuple[object, object, tuple[str, ...], dict[str, str]]] = []
    with fleet:
        executors = fleet.workers["silo-3"].executor_pids()
        with (
            flaap_mq.create_execution_context(
                broker_url,
                SILOS,
                topology_prefix=prefix,
                task_timeout=300,
                min_silos=2,
                silo_grace=GRACE_S,
                invocation_timeout=120,
            ) as context,
            tff.framework.get_context_stack().install(context),
        ):

            def run_round(state):
                new_state, _ = algorithm.round(state)
                taken = context.last_participation
                rounds.append((state, new_state, taken.silos, dict(taken.dropped)))
                return new_state

            state = algorithm.initial_state()
            state = run_round(state)  # 1: all three
            victim = fleet.workers["silo-3"]
            before = _values_made(victim)
            killed: list[float] = []

            def kill_once_training() -> None:
                support.wait_until(lambda: _values_made(victim) > before, 120, "silo-3 training")
                victim.kill()
                killed.append(time.monotonic())

            killer = threading.Thread(target=kill_once_training)
            killer.start()
            try:
                state = run_round(state)  # 2: silo-3 killed mid-round
            finally:
                killer.join()
            recovered_s = time.monotonic() - killed[0]
            state = run_round(state)  # 3: silo-3 still down
            fleet.start_worker("silo-3")
            state = run_round(state)  # 4: back
        for pid in executors:
            assert wait_until_gone(pid, 15)
        support.wait_queues_empty(broker_url, [f"{prefix}.silo.{s}" for s in SILOS])
    support.assert_nothing_left(fleet)

    participation = [(silos, dropped) for _, _, silos, dropped in rounds]
    print(f"\nround 2 completed {recovered_s:.1f} s after silo-3 was killed; {participation}")
    assert participation == [
        (tuple(SILOS), {}),
        (("silo-1", "silo-2"), {"silo-3": f"no-consumer-{GRACE_S:g}s"}),
        (("silo-1", "silo-2"), {"silo-3": "no-consumer"}),
        (tuple(SILOS), {}),
    ]
    assert recovered_s < GRACE_S + 20  # a no-hang bound, not a benchmark
    support.record("silo worker SIGKILLed mid-round", silo_grace_s=GRACE_S, recovered_s=recovered_s)

    # Each round's model == TFF's local runtime over exactly the silos that took part.
    datasets = {
        s: read_silo_dataset(data_dir / s, digits.DEFAULT_NAME, digits.ELEMENT_SPEC) for s in SILOS
    }
    with (
        local_cpp_contexts(with_sync=True) as (_, local),
        tff.framework.get_context_stack().install(local),
    ):
        for before_state, after_state, silos, _ in rounds:
            expected, _ = algorithm.round_with_data(before_state, [datasets[s] for s in silos])
            got = algorithm.model_weights(after_state).trainable
            want = algorithm.model_weights(expected).trainable
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
