"""Values larger than the broker's message limit travel in checked chunks."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.local.private_node import PrivateBrokerNode
from flaap_mq.local.workers import WorkerFleet

pytestmark = pytest.mark.broker_node

LIMIT = 16 * 1024 * 1024
CHUNK = 8 * 1024 * 1024
# A float32 tensor of about 50 MB: three times the broker's limit, so the
# request and the result each travel in seven chunks, the last one partial
# (its size no multiple of CHUNK). Chunking and reassembly do the same at any
# size past the limit; this was 300 MB, 100 s of this suite's time for nothing
# more (no assertion here is about memory).
ELEMENTS = 3 * LIMIT // 4 + 12_345
BIG = tff.TensorType(np.float32, [ELEMENTS])


@tff.tensorflow.computation(BIG)
def scaled(x):
    return x * 2.0


@tff.federated_computation(tff.FederatedType(BIG, tff.SERVER))
def round_trip(x):
    # To the silo's client and back: both the request and the result are
    # far over the broker's 16 MiB limit.
    at_clients = tff.federated_map(scaled, tff.federated_broadcast(x))
    return tff.federated_sum(at_clients)


@pytest.fixture(scope="module")
def small_broker():
    with PrivateBrokerNode(rabbitmq_conf=f"max_message_size = {LIMIT}\n") as node:
        yield node


def test_50_mb_value_to_a_silo_and_back_through_a_16_mib_broker(small_broker, tmp_path):
    value = np.arange(ELEMENTS, dtype=np.float32) % 1000
    with (
        WorkerFleet(small_broker.url, ["a"], prefix="big", log_dir=tmp_path),
        flaap_mq.create_execution_context(
            small_broker.url,
            ["a"],
            topology_prefix="big",
            task_timeout=600,
            max_attempts=1,
            chunk_bytes=CHUNK,
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        result = round_trip(value)
    assert result.shape == (ELEMENTS,)
    np.testing.assert_array_equal(result, value * 2.0)


def test_a_message_over_the_limit_is_refused_before_sending(small_broker, tmp_path):
    # Chunking switched off (one chunk as large as the value): the client
    # refuses it with an error naming the limit, instead of the broker closing
    # the channel under every other message in flight.
    with (
        WorkerFleet(small_broker.url, ["a"], prefix="nochunk", log_dir=tmp_path),
        flaap_mq.create_execution_context(
            small_broker.url,
            ["a"],
            topology_prefix="nochunk",
            task_timeout=60,
            max_attempts=1,
            chunk_bytes=1024**3,
            max_message_bytes=LIMIT,
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        with pytest.raises(flaap_mq.MessageTooLargeError, match="over the broker's limit"):
            round_trip(np.zeros(ELEMENTS, dtype=np.float32))
        # The connection is still good for ordinary work.
        small = tff.federated_computation(
            lambda x: tff.federated_sum(tff.federated_broadcast(x)),
            tff.FederatedType(np.float32, tff.SERVER),
        )
        assert small(2.0) == pytest.approx(2.0)
