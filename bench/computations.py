"""The TFF computations the benchmark runs, identical on both paths.

* `round_fn`: one federated round in which every client's work waits 1 s
  without using CPU (tf.data's test-only `sleep` transformation), so that
  silos running side by side show as a round time close to 1 s.
* `tiny_fn`: a `federated_mean` of one float, to expose per-request cost.
* `clients_identity_fn(n)`: a CLIENTS-placed float32 model of `n` elements
  mapped through an identity: in TFF's mergeable form the model goes to the
  silo and comes back as the per-client result.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.python.data.experimental.ops.testing import sleep

CLIENT_WAIT_S = 1.0


@tff.tensorflow.computation(np.float32)
def client_work(x: tf.Tensor) -> tf.Tensor:
    """Returns `x` after waiting `CLIENT_WAIT_S` without using CPU.

    `sleep` waits before every `GetNext`, the one that reports the end of
    the dataset included; `take(1)` stops before that one, so a client waits
    once, not twice.
    """
    waiting = tf.data.Dataset.from_tensors(x).apply(sleep(int(CLIENT_WAIT_S * 1_000_000))).take(1)
    return waiting.reduce(np.float32(0), lambda total, value: total + value)


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def round_fn(values: object) -> object:
    """Sum over clients of `client_work`: equals the number of clients for all-ones."""
    return tff.federated_sum(tff.federated_map(client_work, values))


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def tiny_fn(values: object) -> object:
    return tff.federated_mean(values)


@functools.cache
def clients_identity_fn(num_elements: int) -> tff.Computation:
    model_type = tff.TensorType(np.float32, [num_elements])

    @tff.tensorflow.computation(model_type)
    def identity(model: tf.Tensor) -> tf.Tensor:
        return tf.identity(model)

    @tff.federated_computation(tff.FederatedType(model_type, tff.CLIENTS))
    def round_trip(models: object) -> object:
        return tff.federated_map(identity, models)

    return round_trip
