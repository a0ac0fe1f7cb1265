"""`make demo` is seeded: its FedAvg round gives the same loss and model every time.

Before it was, the initial weights were Keras' unseeded defaults and the
silos' partial results were merged in the order the silos finished, so two
runs printed different losses.
"""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.demo import fed_avg_round

SILOS = ["silo-1", "silo-2", "silo-3"]


def test_demo_fed_avg_round_is_the_same_twice(workers, broker_url: str, prefix: str) -> None:
    workers(SILOS)
    with (
        flaap_mq.create_execution_context(
            broker_url, SILOS, topology_prefix=prefix, task_timeout=120, silo_users="any"
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        first = fed_avg_round(len(SILOS))
        second = fed_avg_round(len(SILOS))
    assert first.num_examples == second.num_examples == 64 * len(SILOS)
    assert np.isfinite(first.loss)
    assert (first.loss, first.accuracy) == (second.loss, second.accuracy)
    for before, after in zip(first.weights, second.weights, strict=True):
        np.testing.assert_array_equal(before, after)
