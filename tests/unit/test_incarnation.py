"""Executor ids carry the worker incarnation that created them."""

from __future__ import annotations

import pytest
from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.protocol import envelope
from flaap_mq.worker.incarnation import Incarnation, StateLost

KIND = envelope.RequestKind


def _executor_id(incarnation: Incarnation) -> str:
    response = executor_pb2.GetExecutorResponse(executor=executor_pb2.ExecutorId(id="clients=3"))
    tagged = incarnation.tag_response(KIND.GET_EXECUTOR, response.SerializeToString())
    return executor_pb2.GetExecutorResponse.FromString(tagged).executor.id


def test_handed_out_ids_name_the_incarnation():
    incarnation = Incarnation("inc1")
    assert _executor_id(incarnation) == "inc1/clients=3"


def test_own_ids_are_untagged_before_reaching_the_executor():
    incarnation = Incarnation("inc1")
    request = executor_pb2.ComputeRequest(executor=executor_pb2.ExecutorId(id="inc1/clients=3"))
    raw = incarnation.untag_request(KIND.COMPUTE, request)
    assert executor_pb2.ComputeRequest.FromString(raw).executor.id == "clients=3"


@pytest.mark.parametrize("executor_id", ["old/clients=3", "clients=3", ""])
def test_ids_of_another_incarnation_are_state_lost(executor_id):
    request = executor_pb2.CreateCallRequest(executor=executor_pb2.ExecutorId(id=executor_id))
    with pytest.raises(StateLost, match="lost with that worker"):
        Incarnation("new").untag_request(KIND.CREATE_CALL, request)


def test_other_responses_pass_unchanged():
    body = executor_pb2.ComputeResponse().SerializeToString()
    assert Incarnation("x").tag_response(KIND.COMPUTE, body) is body


def test_incarnations_differ():
    assert Incarnation().id != Incarnation().id
