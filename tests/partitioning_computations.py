"""Computations of the client-splitting tests, shared by the local and silo suites.

`readings_above` is the computation that TFF 0.87's mergeable context answers
wrongly when its CLIENTS-placed parameter comes first (docs/tff-partitioning-bug.md).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

READINGS = tff.SequenceType(np.float32)
CLIENT_READINGS = tff.FederatedType(READINGS, tff.CLIENTS)
SERVER_FLOAT = tff.FederatedType(np.float32, tff.SERVER)

# Three clients; with limit 10.0 they have 0, 9 and 19 readings above it.
DATA = [[float(x) for x in range(n)] for n in (10, 20, 30)]
EXPECTED_COUNT = 28


@tff.tensorflow.computation(READINGS, np.float32)
def count_above(readings, limit):
    return readings.reduce(np.int32(0), lambda n, x: n + tf.cast(x > limit, tf.int32))


@tff.tensorflow.computation(READINGS, np.float32)
def clipped_mean(readings, limit):
    total, count = readings.reduce(
        (np.float32(0.0), np.float32(0.0)),
        lambda acc, x: (acc[0] + tf.minimum(x, limit), acc[1] + 1.0),
    )
    return total / count


@tff.tensorflow.computation(np.int32, np.float32)
def scale(count, factor):
    return tf.cast(count, tf.float32) * factor


def _count_at_clients(readings, limit):
    return tff.federated_map(
        count_above, tff.federated_zip([readings, tff.federated_broadcast(limit)])
    )


# The shape that triggers TFF's bug: the argument ends in a SERVER value.
@tff.federated_computation(CLIENT_READINGS, SERVER_FLOAT)
def readings_above(readings, limit):
    return tff.federated_sum(_count_at_clients(readings, limit))


# Same computation, parameters swapped: TFF's own splitting happens to be right
# for this one, because the argument ends in the CLIENTS value.
@tff.federated_computation(SERVER_FLOAT, CLIENT_READINGS)
def readings_above_limit_first(limit, readings):
    return tff.federated_sum(_count_at_clients(readings, limit))


@tff.federated_computation(
    CLIENT_READINGS, tff.FederatedType(np.float32, tff.CLIENTS), SERVER_FLOAT
)
def weighted_clipped_mean(readings, weights, limit):
    means = tff.federated_map(
        clipped_mean, tff.federated_zip([readings, tff.federated_broadcast(limit)])
    )
    return tff.federated_mean(means, weights)


NESTED_ARGUMENT = tff.StructType(
    [
        ("limit", SERVER_FLOAT),
        (
            "batch",
            tff.StructType(
                [
                    ("readings", CLIENT_READINGS),
                    ("tag", tff.FederatedType(np.int32, tff.SERVER)),
                ]
            ),
        ),
        ("factor", SERVER_FLOAT),
    ]
)


@tff.federated_computation(NESTED_ARGUMENT)
def nested_readings_above(arg):
    total = tff.federated_sum(_count_at_clients(arg.batch.readings, arg.limit))
    return tff.federated_map(scale, tff.federated_zip([total, arg.factor]))


# Six clients; with limit 10.0 they have these counts of readings above it.
SIX_CLIENTS = [[float(x) for x in range(n)] for n in (10, 20, 30, 15, 25, 12)]
SIX_COUNTS = [0, 9, 19, 4, 14, 1]
