"""`flaap-mq demo` / `make demo`: three silo workers, two federated computations.

It uses the broker at `--broker-url` if one answers there, else starts a
throwaway one (testcontainers, or a private rabbitmq-server node) and says
which; starts three `flaap-mq worker` processes exactly as an operator would;
runs the federated temperature average and one round of `tff.learning`
weighted FedAvg across them; prints the results and times, and where the
workers' logs are; and stops everything it started.

It is seeded (`DEMO_SEED`): the readings, the clients' data and their order,
the model's initial weights, and Python's, numpy's and TensorFlow's global
seeds, so two runs print the same results (times aside).  The coordinator
merges the silos' partial results in silo order, whichever finishes first
(`flaap_mq.coordinator.partitioning`), so the sums are the same to the bit.
"""

from __future__ import annotations

import collections
import contextlib
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEMO_SEED = 0


@dataclass(frozen=True)
class FedAvgRound:
    """What one round of the demo's FedAvg gives."""

    loss: float
    accuracy: float
    num_examples: int
    weights: list[np.ndarray]  # the new model's trainable weights


def run_demo(broker_url: str, *, num_silos: int = 3, log_format: str = "console") -> int:
    import tensorflow as tf
    import tensorflow_federated as tff

    import flaap_mq
    from flaap_mq.broker.urls import redact_url
    from flaap_mq.examples import temperature_average
    from flaap_mq.local.broker import throwaway_broker
    from flaap_mq.local.workers import WorkerFleet

    tf.keras.utils.set_random_seed(DEMO_SEED)  # Python's, numpy's and TensorFlow's seeds
    silos = [f"silo-{i + 1}" for i in range(num_silos)]
    prefix = f"flaap-demo-{uuid.uuid4().hex[:6]}"
    log_dir = Path(tempfile.mkdtemp(prefix="flaap-demo-"))
    with contextlib.ExitStack() as stack:
        url, description = stack.enter_context(throwaway_broker(broker_url))
        print(f"broker: {description}")
        job_id = f"demo-{uuid.uuid4().hex[:8]}"
        # Registered first so that it runs last, once the workers are gone.
        stack.callback(_delete_topology, url, prefix, silos, job_id)
        started = time.monotonic()
        stack.enter_context(WorkerFleet(url, silos, prefix=prefix, log_dir=log_dir))
        print(
            f"workers: {', '.join(silos)} consuming after {time.monotonic() - started:.1f} s "
            f"(logs in {log_dir})"
        )
        context = stack.enter_context(
            flaap_mq.create_execution_context(
                url,
                silos,
                topology_prefix=prefix,
                task_timeout=300,
                job_id=job_id,
                silo_users="any",  # the demo's workers share its one login
            )
        )
        stack.enter_context(tff.framework.get_context_stack().install(context))

        readings = [
            [
                float(t)
                for t in np.random.default_rng(DEMO_SEED + i).normal(18 + 3 * i, 1.5, size=24)
            ]
            for i in range(num_silos)
        ]
        started = time.monotonic()
        average = temperature_average(readings)
        print(
            f"federated temperature average: {float(average):.3f} "
            f"(local check {np.mean([np.mean(r) for r in readings]):.3f}) "
            f"in {time.monotonic() - started:.2f} s"
        )

        started = time.monotonic()
        result = fed_avg_round(num_silos)
        print(
            f"FedAvg round 1: loss {result.loss:.4f}, "
            f"accuracy {result.accuracy:.3f}, "
            f"{result.num_examples} examples on {num_silos} silos "
            f"in {time.monotonic() - started:.2f} s"
        )
        print(
            f"done; stopping the workers{'' if url == broker_url else ' and the broker'} "
            f"({redact_url(url)}); their logs stay in {log_dir}"
        )
    return 0


def fed_avg_round(num_clients: int, *, seed: int = DEMO_SEED) -> FedAvgRound:
    """One round of weighted FedAvg in the installed TFF context, from seeded weights.

    The same `num_clients` and `seed` give the same result, to the bit: the
    initial weights are built here from `seed` and set into the server state,
    and each client's data and its order are fixed by `seed` (no shuffling).
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    process = _fed_avg(tf, tff, seed)
    state = process.set_model_weights(process.initialize(), _initial_weights(tf, tff, seed))
    output = process.next(state, _client_datasets(tf, num_clients, seed))
    train = output.metrics["client_work"]["train"]
    return FedAvgRound(
        loss=float(train["loss"]),
        accuracy=float(train["sparse_categorical_accuracy"]),
        num_examples=int(train["num_examples"]),
        weights=[np.asarray(w) for w in process.get_model_weights(output.state).trainable],
    )


def _keras_model(tf: Any, seed: int) -> Any:
    """4 features -> Dense(8, relu) -> Dense(2) logits; the same seed, the same weights."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=(4,)),
            tf.keras.layers.Dense(
                8,
                activation="relu",
                kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed),
                bias_initializer="zeros",
            ),
            tf.keras.layers.Dense(
                2,
                kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + 1),
                bias_initializer="zeros",
            ),
        ]
    )


def _initial_weights(tf: Any, tff: Any, seed: int) -> Any:
    model = _keras_model(tf, seed)
    return tff.learning.models.ModelWeights(
        trainable=[np.asarray(v) for v in model.trainable_weights],
        non_trainable=[np.asarray(v) for v in model.non_trainable_weights],
    )


def _fed_avg(tf: Any, tff: Any, seed: int) -> Any:
    spec = collections.OrderedDict(
        x=tf.TensorSpec([None, 4], tf.float32), y=tf.TensorSpec([None, 1], tf.int32)
    )

    def model_fn() -> Any:
        return tff.learning.models.from_keras_model(
            _keras_model(tf, seed),
            input_spec=spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    return tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.05)
    )


def _client_datasets(tf: Any, num_clients: int, seed: int) -> list[Any]:
    """Client `i`'s 64 examples from its own seeded generator, in a fixed order."""
    datasets = []
    for i in range(num_clients):
        x = np.random.default_rng([seed, i]).normal(size=(64, 4)).astype(np.float32)
        y = (x[:, :1] + x[:, 1:2] > 0).astype(np.int32)
        datasets.append(
            tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(16)
        )
    return datasets


def _delete_topology(url: str, prefix: str, silos: list[str], job_id: str) -> None:
    """The demo leaves the broker as it found it (as far as it can: it is done anyway)."""
    from flaap_mq.broker.declare import delete_topology
    from flaap_mq.protocol import topology

    with contextlib.suppress(Exception):
        delete_topology(url, topology.Names(prefix), silos=silos, jobs=[job_id])
