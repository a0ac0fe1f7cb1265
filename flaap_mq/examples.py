"""Small federated computations shared by the demo, the tests and the benchmarks.

The federated temperature average is flaap's running example: each client
(a sensor, or a silo's sensors) holds a sequence of readings; each computes
its local average, and the server gets the mean of those averages.
"""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff

READINGS = tff.SequenceType(np.float32)


@tff.tensorflow.computation(READINGS)
def local_average(readings):
    total, count = readings.reduce(
        (np.float32(0.0), np.float32(0.0)), lambda acc, x: (acc[0] + x, acc[1] + 1.0)
    )
    return total / count


@tff.federated_computation(tff.FederatedType(READINGS, tff.CLIENTS))
def temperature_average(readings):
    return tff.federated_mean(tff.federated_map(local_average, readings))
