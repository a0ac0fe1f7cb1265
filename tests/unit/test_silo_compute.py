"""A Compute waits for its answer and its chain's sends together (fakes, no broker).

The sends of a chain settle when the broker confirms them, or when the link
gives the broker up (30 s of outage). A Compute must not wait for that
beyond its own task timeout, and must report a send the broker refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np
import pytest
from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.coordinator import errors
from flaap_mq.coordinator.silo_executor import ExecutorHandle, SiloExecutor, SiloValue
from flaap_mq.tff_internals import computation_types, placements


class _FailingClient:
    """A task client whose `ask` fails with `error` after `delay_s`."""

    def __init__(self, error: Exception, delay_s: float) -> None:
        self.error = error
        self.delay_s = delay_s

    async def ask(self, silo_id: str, request: object, *, incarnation: str = "") -> object:
        await asyncio.sleep(self.delay_s)
        raise self.error


def _compute(client: _FailingClient, sent: concurrent.futures.Future[None]) -> None:
    executor = SiloExecutor(client, "a", {placements.CLIENTS: 1})  # type: ignore[arg-type]
    remote = ExecutorHandle(executor_pb2.ExecutorId(id="e"), "incarnation")
    value = SiloValue("v", computation_types.TensorType(np.float32), executor, remote, sent)
    # Bounded here: a Compute that waited for the sends first would hang.
    asyncio.run(asyncio.wait_for(value.compute(), 10))


def test_a_compute_fails_at_its_answers_timeout_while_its_sends_are_unsettled():
    sent: concurrent.futures.Future[None] = concurrent.futures.Future()  # the broker is gone
    timeout = errors.SiloTimeoutError("a", "Compute", "no answer within the task timeout of 0.2 s")
    with pytest.raises(errors.SiloTimeoutError, match="task timeout"):
        _compute(_FailingClient(timeout, 0.2), sent)
    # The publish's future is the link's to settle, not the Compute's to cancel.
    assert not sent.done()


def test_a_send_the_broker_refused_is_the_error_reported():
    sent: concurrent.futures.Future[None] = concurrent.futures.Future()
    sent.set_exception(
        errors.SiloRetryableError("a", "CreateValue", "task not delivered to the broker: refused")
    )
    answer_error = errors.SiloExecutionError("a", "Compute", "uses a value that could not be made")
    with pytest.raises(errors.SiloRetryableError, match="not delivered"):
        _compute(_FailingClient(answer_error, 0.5), sent)
