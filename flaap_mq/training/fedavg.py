"""Weighted FedAvg (`tff.learning`) where every silo trains on the data it holds.

`SiloFedAvg.round` is one federated computation over the server state only::

    state@SERVER -> (state@SERVER, metrics@SERVER)
      data = federated_eval(silo_dataset(name, spec, transform=preprocess), CLIENTS)
      return fed_avg.next(state, data)

so the only CLIENTS-placed value of the round is created *on* the silos: the
coordinator sends the model out and gets the aggregate back, and the examples
stay where they are. `fed_avg` is `tff.learning.algorithms.build_weighted_fed_avg`
itself, unchanged, so `SiloFedAvg.round_with_data(state, datasets)` (the
same algorithm with the data passed in) is the reference to compare against on
TFF's local runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from flaap_mq.data import digits
from flaap_mq.data.silo import silo_dataset
from flaap_mq.training import model as model_lib
from flaap_mq.training.config import TrainingConfig


@dataclasses.dataclass(frozen=True)
class RoundMetrics:
    """What the silos report about their training in one round (aggregated)."""

    loss: float
    accuracy: float
    num_examples: int

    @classmethod
    def from_tff(cls, metrics: Any) -> RoundMetrics:
        train = metrics["client_work"]["train"]
        return cls(
            loss=float(train["loss"]),
            accuracy=float(train["sparse_categorical_accuracy"]),
            num_examples=int(train["num_examples"]),
        )


class SiloFedAvg:
    """Weighted FedAvg on silo-resident data; run it under a TFF context."""

    def __init__(
        self,
        config: TrainingConfig,
        element_spec: Any = digits.ELEMENT_SPEC,
    ) -> None:
        self.config = config
        self.process = tff.learning.algorithms.build_weighted_fed_avg(
            model_lib.model_fn_for(config),
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(
                learning_rate=config.client_learning_rate
            ),
            server_optimizer_fn=tff.learning.optimizers.build_sgdm(
                learning_rate=config.server_learning_rate,
                momentum=config.server_momentum or None,
            ),
        )
        self.preprocess = model_lib.preprocess_for(config)
        self.load_client_data = silo_dataset(
            config.data_name, element_spec, transform=self.preprocess
        )
        process = self.process
        load_client_data = self.load_client_data

        @tff.federated_computation(process.next.type_signature.parameter[0])
        def round_on_silo_data(state):
            output = process.next(state, tff.federated_eval(load_client_data, tff.CLIENTS))
            return output.state, output.metrics

        self.round_computation = round_on_silo_data

    # ------------------------------------------------------------- the rounds

    def initial_state(self) -> Any:
        """The server state with the seeded Keras weights (`TrainingConfig.seed`)."""
        state = self.process.initialize()
        return self.process.set_model_weights(state, model_lib.initial_weights(self.config))

    def round(self, state: Any) -> tuple[Any, RoundMetrics]:
        """One round on the silos' own data."""
        new_state, metrics = self.round_computation(state)
        return new_state, RoundMetrics.from_tff(metrics)

    def round_with_data(
        self, state: Any, datasets: Sequence[tf.data.Dataset]
    ) -> tuple[Any, RoundMetrics]:
        """The same round with the clients' raw datasets passed in (the reference)."""
        output = self.process.next(state, [self.preprocess(d) for d in datasets])
        return output.state, RoundMetrics.from_tff(output.metrics)

    def model_weights(self, state: Any) -> tff.learning.models.ModelWeights:
        return self.process.get_model_weights(state)

    def evaluate(self, state: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(loss, accuracy) on a held-out set, with Keras on the coordinator."""
        return model_lib.evaluate(self.config, self.model_weights(state), x, y)


def flat_weights(weights: tff.learning.models.ModelWeights) -> list[np.ndarray]:
    return [np.asarray(w) for w in weights.trainable]
