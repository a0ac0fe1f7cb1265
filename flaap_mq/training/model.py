"""The small Keras model trained on the digits, and what the silos do to their data.

Everything random is seeded here, on the coordinator: the initial weights are
built in Python from `seed` and set into the server state, and the silos'
preprocessing has no randomness (the examples were shuffled when they were
split), so the same seed gives the same weights on any runtime.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from flaap_mq.data import digits
from flaap_mq.training.config import TrainingConfig

# What the clients train on: batches of `digits.ELEMENT_SPEC`.
BATCH_SPEC = collections.OrderedDict(
    x=tf.TensorSpec([None, digits.NUM_FEATURES], tf.float32),
    y=tf.TensorSpec([None], tf.int32),
)


def build_keras_model(config: TrainingConfig, *, seed: int | None = None) -> tf.keras.Model:
    """64 pixels -> Dense(hidden, relu) -> Dense(10) logits. Seeded: same seed, same weights."""
    seed = config.seed if seed is None else seed
    return tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=(digits.NUM_FEATURES,)),
            tf.keras.layers.Dense(
                config.hidden_units,
                activation="relu",
                kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed),
                bias_initializer="zeros",
            ),
            tf.keras.layers.Dense(
                digits.NUM_CLASSES,
                kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + 1),
                bias_initializer="zeros",
            ),
        ]
    )


def initial_weights(config: TrainingConfig) -> tff.learning.models.ModelWeights:
    model = build_keras_model(config)
    return tff.learning.models.ModelWeights(
        trainable=[np.asarray(v) for v in model.trainable_weights],
        non_trainable=[np.asarray(v) for v in model.non_trainable_weights],
    )


def model_bytes(config: TrainingConfig) -> int:
    """Size of the model's weights, as float32."""
    return sum(int(np.asarray(w).nbytes) for w in initial_weights(config).trainable)


def model_fn_for(config: TrainingConfig):
    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            build_keras_model(config),
            input_spec=BATCH_SPEC,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    return model_fn


def preprocess_for(config: TrainingConfig):
    """Runs on the silo: its examples, `local_epochs` times over, in batches."""

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.repeat(config.local_epochs).batch(config.batch_size)

    return preprocess


def evaluate(
    config: TrainingConfig,
    weights: tff.learning.models.ModelWeights,
    x: np.ndarray,
    y: np.ndarray,
) -> tuple[float, float]:
    """(loss, accuracy) of `weights` on (x, y), with Keras, here on the coordinator."""
    model = build_keras_model(config)
    weights.assign_weights_to(model)
    logits = model(x, training=False)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    accuracy = np.mean(np.argmax(logits.numpy(), axis=1) == y)
    return float(loss), float(accuracy)
