"""The silos' examples never cross the broker: every message of a training round is read.

A private broker node with RabbitMQ's firehose tracer on copies every message
published on it (tasks, replies, chunks, disposals) to `amq.rabbitmq.trace`;
a queue bound there with `publish.#` receives them all. Each silo's data is
seeded with a marker (the first 8 pixels of every example are a fixed,
improbable sequence of float32s), training runs on the silos' own data, and
then every traced body is searched for the marker and for whole examples.

A control round passes the same data from the coordinator (TFF's usual way):
there the marker must be found, or the search proves nothing.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np
import pika
import pytest
import tensorflow as tf

import flaap_mq
from flaap_mq.data import digits
from flaap_mq.data.fleet import SiloDataFleet
from flaap_mq.local.private_node import PrivateBrokerNode
from flaap_mq.protocol import amqp, batch, envelope
from flaap_mq.testing import messages
from flaap_mq.training.config import TrainingConfig
from flaap_mq.training.fedavg import SiloFedAvg
from flaap_mq.training.model import model_bytes

pytestmark = pytest.mark.broker_node

SILOS = ["north", "south", "east"]
EXAMPLES_PER_SILO = 8000
MARKER = np.array(
    [0.1234567, 0.7654321, 0.0314159, 0.9271828, 0.5772156, 0.1414213, 0.6931471, 0.3010299],
    dtype=np.float32,
)
PREFIX = "home"
TRACE_QUEUE = "firehose-capture"


@dataclass
class Traced:
    """The traced messages of one phase of the run."""

    bodies: list[tuple[str, bytes]] = field(default_factory=list)  # (exchange, body)
    batched: set[int] = field(default_factory=set)  # which bodies are TaskBatches

    def bytes_to(self, exchange: str) -> int:
        return sum(len(b) for e, b in self.bodies if e == exchange)

    @property
    def total_bytes(self) -> int:
        return sum(len(b) for _, b in self.bodies)

    def containing(self, needle: bytes) -> int:
        return sum(needle in body for _, body in self.bodies)

    def request_value_bytes(self, tasks_exchange: str) -> collections.Counter[str]:
        """Bytes of the values the coordinator sent, by kind (computation, array, sequence)."""
        kinds: collections.Counter[str] = collections.Counter()
        for i, (exchange, body) in enumerate(self.bodies):
            if exchange != tasks_exchange:
                continue
            if i in self.batched:  # a chain's small tasks, in one message
                tasks = [(task, bytes(request)) for task, request in batch.read_batch(body)]
            else:
                task = messages.parse_task(body)
                tasks = [(task, task.request)]
            for task, payload in tasks:
                if task.HasField("chunk") and task.chunk.count > 1:
                    kinds["chunked"] += len(body)
                    continue
                request = envelope.decode_request(task, payload)
                if request.DESCRIPTOR.name == "CreateValueRequest":
                    _value_kinds(request.value, kinds)
        return kinds


def _value_kinds(value, kinds: collections.Counter[str]) -> None:
    kind = value.WhichOneof("value")
    if kind == "struct":
        for element in value.struct.element:
            _value_kinds(element.value, kinds)
    elif kind == "federated":
        for member in value.federated.value:
            _value_kinds(member, kinds)
    else:
        kinds[kind] += value.ByteSize()


class Firehose:
    """RabbitMQ's tracer on a private node, captured into one queue."""

    def __init__(self, node: PrivateBrokerNode) -> None:
        node.rabbitmqctl("trace_on")
        self._connection = pika.BlockingConnection(pika.URLParameters(node.url))
        self._channel = self._connection.channel()
        self._channel.queue_declare(TRACE_QUEUE, durable=False, auto_delete=False)
        self._channel.queue_bind(TRACE_QUEUE, "amq.rabbitmq.trace", routing_key="publish.#")
        self.seen = 0

    def drain(self, quiet_s: float = 2.0) -> Traced:
        """Every traced message so far (waits until none has come for `quiet_s`)."""
        traced = Traced()
        last = time.monotonic()
        while time.monotonic() - last < quiet_s:
            method, properties, body = self._channel.basic_get(TRACE_QUEUE, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            last = time.monotonic()
            original = properties.headers.get("properties") or {}
            if original.get("type") == amqp.BATCH_TYPE:
                traced.batched.add(len(traced.bodies))
            traced.bodies.append((properties.headers["exchange_name"], bytes(body)))
        self.seen += len(traced.bodies)
        return traced

    def close(self) -> None:
        self._connection.close()


@pytest.fixture(scope="module")
def node():
    with PrivateBrokerNode() as broker:
        yield broker


@pytest.fixture(scope="module")
def silo_data(tmp_path_factory):
    """Each silo's examples, every one beginning with MARKER; saved in its data dir."""
    root = tmp_path_factory.mktemp("silos")
    rng = np.random.default_rng(3)
    data = {}
    for silo in SILOS:
        x = rng.uniform(0, 1, size=(EXAMPLES_PER_SILO, digits.NUM_FEATURES)).astype(np.float32)
        x[:, : len(MARKER)] = MARKER
        y = rng.integers(0, digits.NUM_CLASSES, size=EXAMPLES_PER_SILO).astype(np.int32)
        digits.save_examples(root / silo, x, y)
        data[silo] = (x, y)
    return root, data


def test_training_round_sends_no_example_through_the_broker(node, silo_data, tmp_path):
    root, data = silo_data
    marker = MARKER.tobytes()
    rng = np.random.default_rng(0)
    # Whole examples too (marker included), a sample from each silo.
    rows = [x[i].tobytes() for x, _ in data.values() for i in rng.choice(len(x), 20)]
    data_bytes = sum(x.nbytes + y.nbytes for x, y in data.values())
    config = TrainingConfig(rounds=2, local_epochs=1, batch_size=64, seed=1)
    algorithm = SiloFedAvg(config)
    tasks, replies = f"{PREFIX}.tasks", f"{PREFIX}.replies"

    firehose = Firehose(node)
    try:
        with (
            SiloDataFleet(node.url, {s: root / s for s in SILOS}, prefix=PREFIX, log_dir=tmp_path),
            flaap_mq.create_execution_context(
                node.url, SILOS, topology_prefix=PREFIX, task_timeout=300
            ) as context,
        ):
            import tensorflow_federated as tff

            with tff.framework.get_context_stack().install(context):
                firehose.drain()  # the workers' start-up
                state = algorithm.initial_state()
                phases = {"setup": firehose.drain()}
                for r in range(1, config.rounds + 1):
                    started = time.monotonic()
                    state, metrics = algorithm.round(state)
                    seconds = time.monotonic() - started
                    phases[f"round {r}"] = firehose.drain()
                    assert metrics.num_examples == len(SILOS) * EXAMPLES_PER_SILO
                # Control: the same round with the data sent from the coordinator.
                datasets = [
                    tf.data.Dataset.from_tensor_slices(
                        collections.OrderedDict(x=data[s][0], y=data[s][1])
                    )
                    for s in SILOS
                ]
                algorithm.round_with_data(state, datasets)
                control = firehose.drain()
    finally:
        firehose.close()

    model = model_bytes(config)
    print(
        f"\nsilo data: {data_bytes:,} B in {len(SILOS)} silos; model weights: {model:,} B; "
        f"last silo-data round took {seconds:.2f} s"
    )
    print(f"{'phase':<22}{'messages':>9}{'tasks B':>12}{'replies B':>12}"
          f"{'arrays B':>11}{'programs B':>12}{'datasets B':>12}{'marker':>8}")  # fmt: skip
    for name, traced in [*phases.items(), ("control (data sent)", control)]:
        kinds = traced.request_value_bytes(tasks)
        print(
            f"{name:<22}{len(traced.bodies):>9}{traced.bytes_to(tasks):>12,}"
            f"{traced.bytes_to(replies):>12,}{kinds['array']:>11,}{kinds['computation']:>12,}"
            f"{kinds['sequence'] + kinds['chunked']:>12,}{traced.containing(marker):>8}"
        )

    # The search works: where the data is sent, the marker and the rows are found.
    assert control.containing(marker) > 0
    assert all(control.containing(row) > 0 for row in rows[:5])
    assert control.total_bytes > data_bytes / 2

    for name, traced in phases.items():
        assert traced.bodies, f"nothing traced in {name}: the tracer is not on"
        # No marker, no example, no dataset value in any message.
        assert traced.containing(marker) == 0, f"the silos' marker crossed the broker in {name}"
        assert not any(traced.containing(row) for row in rows), name
        kinds = traced.request_value_bytes(tasks)
        assert kinds["sequence"] == 0 and kinds["chunked"] == 0, (name, kinds)

    for name in (n for n in phases if n.startswith("round")):
        traced = phases[name]
        kinds = traced.request_value_bytes(tasks)
        # Bytes per round are of the order of the model (and the program that
        # trains it), not of the data: the tensors sent are the model state
        # for each silo, the replies the silos' aggregates.
        assert kinds["array"] < 10 * model * len(SILOS), (name, kinds)
        assert traced.bytes_to(replies) < 10 * model * len(SILOS), name
        assert traced.total_bytes < data_bytes / 5, name
    assert firehose.seen > 0
