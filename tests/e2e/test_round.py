"""End to end: TFF programs on 3 real silo worker processes through a real broker."""

from __future__ import annotations

import collections
import time

import numpy as np
import pika
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.examples import temperature_average
from flaap_mq.protocol import topology
from flaap_mq.testing.tff_local import local_cpp_contexts

SILOS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def fleet(module_workers):
    """Three silo workers, shared by this module's tests (they start slowly)."""
    return module_workers(SILOS)


@pytest.fixture
def silos(fleet, broker_url, module_prefix):
    """The three workers, and a coordinator context installed as TFF's default."""
    with (
        flaap_mq.create_execution_context(
            broker_url, SILOS, topology_prefix=module_prefix, task_timeout=120
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        yield fleet


@pytest.fixture
def local_tff():
    """Installs TFF's own local C++ runtime on demand; its leaked executor is stopped."""
    with local_cpp_contexts(with_sync=True) as (_, context):
        yield lambda: tff.framework.get_context_stack().install(context)


def test_temperature_average_over_three_silos(silos):
    data = [[float(x) for x in range(n)] for n in (2, 4, 6, 8, 10, 12)]
    expected = np.mean([np.mean(d) for d in data])
    assert temperature_average(data) == pytest.approx(expected)


def test_every_silo_does_work(silos):
    """The clients are really spread: each silo's worker ran tasks."""
    temperature_average([[1.0], [2.0], [3.0]])
    for silo_id, worker in silos.workers.items():
        assert worker.executor_pids(), f"silo {silo_id} has no executor"
    # Each worker logs one event per task; every silo must have handled some.
    for worker in silos.workers.values():
        worker.task_events(at_least=1)


@tff.tensorflow.computation(np.float32)
def add_one(x):
    return x + 1.0


@tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER))
def broadcast_map_sum(x):
    return tff.federated_sum(tff.federated_map(add_one, tff.federated_broadcast(x)))


@tff.federated_computation(
    tff.FederatedType(np.float32, tff.SERVER), tff.FederatedType(np.float32, tff.CLIENTS)
)
def broadcast_map_sum_with_clients(x, values):
    @tff.tensorflow.computation(np.float32, np.float32)
    def add(a, b):
        return a + b

    return tff.federated_sum(
        tff.federated_map(add, tff.federated_zip([tff.federated_broadcast(x), values]))
    )


def test_broadcast_map_sum(silos):
    # No CLIENTS-placed argument: each silo hosts its default of 1 client.
    assert broadcast_map_sum(2.0) == pytest.approx(3 * 3.0)
    # Six clients spread over three silos, SERVER-placed value first.
    assert broadcast_map_sum_with_clients(10.0, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == pytest.approx(
        6 * 10.0 + 21.0
    )


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def summary(values):
    return collections.OrderedDict(
        total=tff.federated_sum(values),
        mean=tff.federated_mean(values),
    )


def test_struct_valued_result(silos):
    result = summary([1.0, 2.0, 3.0, 6.0])
    assert list(result.keys()) == ["total", "mean"]
    assert result["total"] == pytest.approx(12.0)
    assert result["mean"] == pytest.approx(3.0)


@tff.tensorflow.computation(np.float32)
def must_be_positive(x):
    with tf.control_dependencies([tf.debugging.assert_positive(x, message="x must be > 0")]):
        return tf.identity(x)


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def checked_sum(values):
    return tff.federated_sum(tff.federated_map(must_be_positive, values))


def test_tff_error_on_a_silo_names_the_silo_and_request(silos):
    # The negative value lands on the last silo (clients are split in order).
    with pytest.raises(flaap_mq.SiloExecutionError) as raised:
        checked_sum([1.0, 2.0, -3.0])
    message = str(raised.value)
    assert "silo 'c'" in message
    assert "x must be > 0" in message
    assert raised.value.silo_id == "c"
    assert raised.value.request in {"Compute", "CreateCall", "CreateValue"}
    # The silos keep serving after the error.
    assert checked_sum([1.0, 2.0, 3.0]) == pytest.approx(6.0)


def test_malformed_message_is_dead_lettered_and_worker_keeps_serving(
    silos, broker_url, module_prefix
):
    names = topology.Names(module_prefix)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        names.tasks_exchange,
        "b",
        b"\xff\x00 this is not a task",
        pika.BasicProperties(delivery_mode=2, message_id="garbage-1"),
        mandatory=True,
    )
    dead = None
    deadline = time.monotonic() + 30
    while dead is None and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(names.dead_letter_queue, auto_ack=True)
        if method is not None and properties.message_id == "garbage-1":
            dead = (properties, body)
        else:
            time.sleep(0.2)
    connection.close()
    assert dead is not None, "the malformed task never reached the dead-letter queue"
    properties, body = dead
    assert body == b"\xff\x00 this is not a task"
    # Rejected by silo b's worker, dead-lettered by the broker; the reason is in b's log.
    assert properties.headers["x-death"][0]["reason"] == "rejected"
    assert properties.headers["x-death"][0]["queue"] == names.silo_queue("b")
    assert '"reason": "malformed: ' in silos.workers["b"].log_text()
    assert silos.workers["b"].process.poll() is None, "the worker died on a malformed task"
    assert temperature_average([[1.0], [3.0], [5.0]]) == pytest.approx(3.0)


def test_silo_that_never_answers_times_out_with_its_name(fleet, broker_url, module_prefix):
    context = flaap_mq.create_execution_context(
        broker_url, ["a", "ghost"], topology_prefix=module_prefix, task_timeout=3, max_attempts=1
    )
    try:
        with tff.framework.get_context_stack().install(context):
            started = time.monotonic()
            with pytest.raises(flaap_mq.SiloTimeoutError) as raised:
                temperature_average([[1.0], [2.0]])
            assert time.monotonic() - started < 60
    finally:
        context.close()
    assert raised.value.silo_id == "ghost"
    assert "silo 'ghost'" in str(raised.value)
    assert "GetExecutor" in str(raised.value)


def _keras_model_fn():
    def build():
        return tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(input_shape=(3,)),
                tf.keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="zeros"),
            ]
        )

    spec = collections.OrderedDict(
        x=tf.TensorSpec([None, 3], tf.float32), y=tf.TensorSpec([None, 1], tf.int32)
    )

    def model_fn():
        return tff.learning.models.from_keras_model(
            build(),
            input_spec=spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

    return model_fn


def _client_data(num_clients):
    rng = np.random.default_rng(7)
    datasets = []
    for i in range(num_clients):
        n = 4 + 2 * i
        x = rng.normal(size=(n, 3)).astype(np.float32)
        y = (x.sum(axis=1, keepdims=True) > 0).astype(np.int32)
        datasets.append(
            tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(2)
        )
    return datasets


def test_fedavg_round_matches_tff_local_runtime(silos, local_tff):
    process = tff.learning.algorithms.build_weighted_fed_avg(
        _keras_model_fn(),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
    )
    data = _client_data(6)
    with local_tff():  # TFF's own runtime, for the reference answer
        state = process.initialize()
        local = process.next(state, data)
    remote = process.next(state, data)  # on the three silo workers
    local_weights = process.get_model_weights(local.state).trainable
    remote_weights = process.get_model_weights(remote.state).trainable
    assert len(local_weights) == len(remote_weights) == 2
    for lw, rw in zip(local_weights, remote_weights, strict=True):
        np.testing.assert_allclose(rw, lw, atol=1e-5)
    # Training moved the weights, so the comparison is not trivially of zeros.
    assert not np.allclose(local_weights[0], np.ones((3, 2)))
    assert remote.metrics["client_work"]["train"]["num_examples"] == sum(
        4 + 2 * i for i in range(6)
    )


@tff.tensorflow.computation(np.float32, np.float32)
def _minus(value, mean):
    return value - mean


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def deviations_from_mean(values):
    """Per-client results, so `after_merge` runs on every silo."""
    mean = tff.federated_broadcast(tff.federated_mean(values))
    return tff.federated_map(_minus, (values, mean))


def test_merge_runs_on_the_coordinator_not_on_a_silo(silos):
    """No silo receives another silo's partial aggregate: `merge` runs locally."""
    merge_context = tff.framework.get_context_stack().current.merge_context
    assert merge_context is not None and merge_context.service.alive()

    merges_before = merge_context.merges_run
    data = [[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]]
    assert temperature_average(data) == pytest.approx(np.mean([np.mean(d) for d in data]))
    # Three partial results, folded pairwise: two merges, on the coordinator.
    assert merge_context.merges_run - merges_before >= 2

    # One client per silo, so a silo's partial aggregate is its client's value.
    # Every silo runs exactly its own up_to_merge and after_merge; a silo that
    # also merged would have handled more requests than the others.
    merges_before = merge_context.merges_run
    sent = _requests_to_each_silo(silos)
    assert deviations_from_mean([1.0, 2.0, 6.0]) == pytest.approx([-2.0, -1.0, 3.0])
    assert merge_context.merges_run - merges_before >= 2
    assert len(set(sent.values())) == 1 and sent["a"] > 0, sent


def _requests_to_each_silo(silos) -> collections.Counter[str]:
    """From now on, how many requests the installed context sends each silo.

    Counted where they are sent, not in the workers' logs: a worker logs a
    task after its reply is on its way, so a log read as soon as the call
    returns can miss the last one. Disposals are left out: they follow the
    garbage collector, not the computation.
    """
    context = tff.framework.get_context_stack().current
    sent = collections.Counter({silo_id: 0 for silo_id in silos.workers})

    def count(exchange) -> None:
        if not exchange.request.startswith("Dispose"):
            sent.update([exchange.silo_id])

    context.client.observe(count)
    return sent


def test_after_merge_without_per_client_results_runs_on_the_coordinator(silos):
    """No silo sees the final aggregate: TFF would run after_merge on one silo."""
    merge_context = tff.framework.get_context_stack().current.merge_context
    temperature_average([[1.0], [2.0], [3.0]])  # warm: executors and programs in place
    runs_before, sent = merge_context.merges_run, _requests_to_each_silo(silos)
    assert temperature_average([[1.0], [2.0], [6.0]]) == pytest.approx(3.0)
    # Two merges and the after_merge, all on the coordinator...
    assert merge_context.merges_run - runs_before == 3
    # ...so every silo ran the same requests: its own up_to_merge, nothing more.
    assert len(set(sent.values())) == 1 and sent["a"] > 0, sent


def test_a_single_part_runs_whole_on_its_silo_in_one_round_trip(silos):
    """One client makes one part: nothing to merge, so up_to_merge and after_merge
    run as one computation on that part's silo (partitioning._whole), one Compute
    in all, instead of a silo round trip and then the merge executor. The other
    silos get nothing; per-client results come back whole."""
    context = tff.framework.get_context_stack().current
    merge_context = context.merge_context
    computes: list[str] = []
    context.client.observe(lambda e: computes.append(e.silo_id) if e.request == "Compute" else None)
    temperature_average([[1.0]])  # warm: the composed computation compiled and sent
    runs_before, sent = merge_context.merges_run, _requests_to_each_silo(silos)
    computes.clear()
    assert temperature_average([[7.0, 9.0]]) == pytest.approx(8.0)
    assert deviations_from_mean([4.0]) == pytest.approx([0.0])
    assert computes == ["a", "a"]
    assert merge_context.merges_run == runs_before
    assert sent["a"] > 0 and sent["b"] == sent["c"] == 0, sent


def test_one_silo_runs_a_computation_whole_and_returns_per_client_results(
    fleet, broker_url, module_prefix
):
    """A federation of one silo: every invocation is one part, run whole there."""
    with (
        flaap_mq.create_execution_context(
            broker_url, ["b"], topology_prefix=module_prefix, task_timeout=120
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        assert deviations_from_mean([1.0, 2.0, 6.0]) == pytest.approx([-2.0, -1.0, 3.0])
        assert temperature_average([[1.0, 3.0], [8.0]]) == pytest.approx(5.0)
        assert broadcast_map_sum(2.0) == pytest.approx(3.0)  # no argument split: one part
        assert context.merge_context.merges_run == 0


def test_each_computation_is_sent_to_a_silo_once(silos):
    """Later invocations reuse the computation's value instead of sending it again."""
    context = tff.framework.get_context_stack().current
    sent: list[str] = []
    context.client.observe(lambda e: sent.append(e.request) if e.silo_id == "a" else None)
    data = [[1.0], [2.0], [3.0]]
    temperature_average(data)
    first = sent.count("CreateValue")
    sent.clear()
    for _ in range(3):
        assert temperature_average(data) == pytest.approx(2.0)
    # Each later invocation sends only its argument: one CreateValue less.
    assert sent.count("CreateValue") == 3 * (first - 1)


def _clients_identity(elements: int) -> tff.Computation:
    model_type = tff.TensorType(np.float32, [elements])

    @tff.tensorflow.computation(model_type)
    def identity(model):
        return tf.identity(model)

    @tff.federated_computation(tff.FederatedType(model_type, tff.CLIENTS))
    def round_trip(models):
        return tff.federated_map(identity, models)

    return round_trip


def test_each_silo_receives_its_part_of_the_argument_once(silos):
    """TFF gives a silo's part to up_to_merge and again to after_merge (a per-client
    result needs it): each invocation ingests it anew, so TFF sends it twice.
    flaap-mq sends it once (coordinator/sent_once.py), and a later invocation
    sends its own new values, never reuses the last one's."""
    context = tff.framework.get_context_stack().current
    sent: collections.Counter[str] = collections.Counter()
    context.client.observe(lambda e: sent.update({e.silo_id: e.bytes_sent}))
    elements = 250_000  # 1 MB per client, one client per silo
    round_trip = _clients_identity(elements)
    round_trip([np.zeros(elements, np.float32)] * 3)  # warm: the computations are sent once
    for shift in (10.0, 20.0):
        sent.clear()
        models = [np.full(elements, client + shift, np.float32) for client in range(3)]
        results = round_trip(models)
        assert [float(r[0]) for r in results] == [shift, shift + 1, shift + 2]
        assert all(np.array_equal(r, m) for r, m in zip(results, models, strict=True))
        part = models[0].nbytes
        assert all(part <= sent[silo] < 1.5 * part for silo in SILOS), dict(sent)
