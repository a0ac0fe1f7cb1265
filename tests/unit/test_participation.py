"""The soundness rule for completing an invocation without a silo, and how participation reads."""

from __future__ import annotations

import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler

from flaap_mq.coordinator.participation import Participation, ParticipationPolicy, droppable
from flaap_mq.examples import temperature_average


@tff.tensorflow.computation
def _one() -> tf.Tensor:
    return tf.constant(1.0, tf.float32)


@tff.federated_computation
def _count_clients():
    return tff.federated_sum(tff.federated_eval(_one, tff.CLIENTS))


@tff.federated_computation
def _per_client():
    return tff.federated_eval(_one, tff.CLIENTS)


@tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER))
def _broadcast_and_sum(x):
    return tff.federated_sum(tff.federated_broadcast(x))


def _mergeable(comp):
    return mergeable_comp_compiler.compile_to_mergeable_comp_form(comp)


def test_an_aggregate_over_data_the_silos_hold_may_do_without_a_silo():
    assert droppable(_mergeable(_count_clients)) is None
    assert droppable(_mergeable(_broadcast_and_sum)) is None  # SERVER-placed argument


def test_a_per_client_result_may_not():
    why = droppable(_mergeable(_per_client))
    assert why is not None and "its result" in why and "CLIENTS-placed" in why


def test_per_client_values_passed_in_may_not():
    why = droppable(_mergeable(temperature_average))
    assert why is not None and "its argument has a per-client" in why


def test_participation_fields_for_metrics_csv():
    taken = Participation(("a", "b"), {"c": "no-consumer-60s", "d": "deadline-30s"})
    assert taken.silos_field == "a;b"
    assert taken.dropped_field == "c:no-consumer-60s;d:deadline-30s"
    assert Participation(("a",)).dropped_field == ""


@pytest.mark.parametrize("min_silos", [0, 4, -1])
def test_min_silos_must_be_between_one_and_the_silos(min_silos):
    client = types.SimpleNamespace(silo_ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="min_silos must be between 1 and 3"):
        ParticipationPolicy(client, min_silos=min_silos)  # type: ignore[arg-type]


def test_by_default_every_silo_must_answer():
    client = types.SimpleNamespace(silo_ids=["a", "b"])
    assert ParticipationPolicy(client).all_must_answer  # type: ignore[arg-type]
    assert not ParticipationPolicy(client, min_silos=1).all_must_answer  # type: ignore[arg-type]
