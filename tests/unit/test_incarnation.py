from __future__ import annotations

import pytest
from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.testing import messages
from flaap_mq.worker.incarnation import Incarnation, StateLost


def _task(request, incarnation: str = ""):
    return messages.build_task(
        request=request, job_id="j", silo_id="s", task_id="t", incarnation=incarnation
    )


def _compute():
    return executor_pb2.ComputeRequest(
        executor=executor_pb2.ExecutorId(id="clients=1"), value_ref=executor_pb2.ValueRef(id="v")
    )


def test_task_for_this_incarnation_passes():
    Incarnation("inc1").check(_task(_compute(), "inc1"))


def test_task_for_another_incarnation_is_state_lost_naming_both():
    with pytest.raises(StateLost, match=r"'old'.*'new'"):
        Incarnation("new").check(_task(_compute(), "old"))


def test_task_without_incarnation_is_state_lost():
    with pytest.raises(StateLost, match="'unknown'"):
        Incarnation("new").check(_task(_compute()))


def test_get_executor_needs_no_incarnation():
    Incarnation("x").check(_task(executor_pb2.GetExecutorRequest()))


def test_ids_are_random():
    assert Incarnation().id != Incarnation().id
