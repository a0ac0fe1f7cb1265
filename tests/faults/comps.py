"""TFF computations for the fault tests: cheap, exact answers, and ones that take a while.

`slow_total` sums each client's readings while sleeping `SLEEP_MS` per
reading without using CPU (TF's test-only `SleepDataset`), so a silo is busy
on one request for a predictable time: long enough to kill something under it.
"""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff
from tensorflow.python.data.experimental.ops import testing as tf_data_testing

SLEEP_MS = 250
READINGS = tff.SequenceType(np.float32)


@tff.tensorflow.computation(READINGS)
def _slow_sum(readings):
    readings = readings.apply(tf_data_testing.sleep(SLEEP_MS * 1000))
    return readings.reduce(np.float32(0.0), lambda acc, x: acc + x)


@tff.federated_computation(tff.FederatedType(READINGS, tff.CLIENTS))
def slow_total(readings):
    """Sum of every client's readings; each reading costs SLEEP_MS on its silo."""
    return tff.federated_sum(tff.federated_map(_slow_sum, readings))


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def mean(values):
    return tff.federated_mean(values)


@tff.tensorflow.computation(np.float32, np.float32)
def _scaled(x, factor):
    return x * factor


@tff.federated_computation(
    tff.FederatedType(np.float32, tff.SERVER), tff.FederatedType(np.float32, tff.CLIENTS)
)
def scaled_sum(factor, values):
    """sum(factor * v): another computation, with a broadcast, for a second job."""
    return tff.federated_sum(
        tff.federated_map(_scaled, tff.federated_zip([values, tff.federated_broadcast(factor)]))
    )
