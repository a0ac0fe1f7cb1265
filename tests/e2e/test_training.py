"""End to end: FedAvg on digits that live on 3 silo workers, through a real broker.

The data is laid out by `flaap-mq data split-digits` (3 label-skewed silos),
each worker serves its own directory (`--data-dir`), and `flaap-mq train`
runs as an operator would run it. The coordinator's working directory holds
no data, so every load is the silo's own.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.data import digits
from flaap_mq.data.silo import read_silo_dataset, silo_dataset
from flaap_mq.testing.cli import run_cli
from flaap_mq.testing.tff_local import local_cpp_contexts
from flaap_mq.training.config import TrainingConfig
from flaap_mq.training.fedavg import SiloFedAvg

SILOS = digits.silo_ids(3)
SEED = 7


def _cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(digits_split) -> Path:
    """`flaap-mq data split-digits --silos 3`: the silos' data and the test set."""
    return digits_split(3)


@pytest.fixture(scope="module")
def fleet(module_data_workers, data_dir):
    """One worker per silo, each with its own data directory."""
    return module_data_workers({silo: data_dir / silo for silo in SILOS})


@pytest.fixture
def coordinator_dir(tmp_path, monkeypatch) -> Path:
    """The coordinator runs where no data is, so a load that worked was the silo's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_split_digits_is_label_skewed_and_complete(data_dir):
    manifest = json.loads((data_dir / digits.MANIFEST_FILE).read_text())
    counts = np.array([manifest["silos"][s]["label_counts"] for s in SILOS])
    x_test, y_test = digits.load_test_set(data_dir / digits.TEST_FILE)
    assert counts.sum() + len(y_test) == 1797  # every digit once, no download
    assert x_test.shape == (len(y_test), 64) and x_test.min() >= 0 and x_test.max() <= 1
    shares = counts / counts.sum(axis=0, keepdims=True)
    # Label skew: each silo holds well over or under its even share of some label.
    assert (np.abs(shares - 1 / 3).max(axis=1) > 0.25).all(), shares


@pytest.mark.parametrize("name", ["/etc/passwd", "../other-silo/digits", "a/../../x", "", "~/x"])
def test_silo_dataset_names_stay_inside_the_data_directory(name):
    with pytest.raises(ValueError, match="silo dataset name"):
        silo_dataset(name, digits.ELEMENT_SPEC)


def test_dirichlet_partition_uses_every_example_once_and_is_seeded():
    labels = np.repeat(np.arange(10), 50)
    parts = digits.dirichlet_partition(labels, 3, 0.3, np.random.default_rng(5), min_examples=20)
    again = digits.dirichlet_partition(labels, 3, 0.3, np.random.default_rng(5), min_examples=20)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    assert all(len(p) >= 20 for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    even = digits.dirichlet_partition(labels, 2, 1e4, np.random.default_rng(5))
    assert all(abs(len(p) - 250) < 15 for p in even)


def test_payload_meter_counts_bytes_per_silo():
    from flaap_mq.coordinator.task_client import Exchange
    from flaap_mq.training.meter import PayloadMeter

    class ObservableClient:
        """What PayloadMeter needs of a TaskClient: `observe`."""

        def __init__(self):
            self.observers = []

        def observe(self, observer):
            self.observers.append(observer)

        def exchanged(self, exchange):
            for observer in self.observers:
                observer(exchange)

    client = ObservableClient()
    meter = PayloadMeter(client)
    before = meter.snapshot()
    client.exchanged(Exchange("a", "Compute", 120, 4000))  # an awaited request and its answer
    client.exchanged(Exchange("b", "Dispose", 120, 0))  # a one-way request
    counts = meter.snapshot() - before
    assert counts.requests == 2
    assert counts.sent_by_silo == {"a": 120, "b": 120}
    assert counts.received_by_silo == {"a": 4000, "b": 0}
    assert counts.bytes_total == 2 * 120 + 4000


def test_plain_dataset_load_cannot_be_built_on_the_coordinator(coordinator_dir):
    """Why `silo_dataset` exists: TF 2.14's `Dataset.load` reads the path while tracing."""
    with pytest.raises(tf.errors.NotFoundError, match=r"snapshot\.metadata"):

        @tff.tensorflow.computation
        def load():
            return tf.data.Dataset.load(digits.DEFAULT_NAME, digits.ELEMENT_SPEC)


def test_each_silo_loads_its_own_data(fleet, broker_url, module_prefix, data_dir, coordinator_dir):
    assert not (coordinator_dir / digits.DEFAULT_NAME).exists()
    load = silo_dataset(digits.DEFAULT_NAME, digits.ELEMENT_SPEC)

    @tff.tensorflow.computation(load.type_signature.result)
    def label_histogram(dataset):
        return dataset.reduce(
            tf.zeros([digits.NUM_CLASSES], tf.int32),
            lambda counts, e: counts + tf.one_hot(e["y"], digits.NUM_CLASSES, dtype=tf.int32),
        )

    @tff.federated_computation
    def histograms():
        return tff.federated_sum(
            tff.federated_map(label_histogram, tff.federated_eval(load, tff.CLIENTS))
        )

    with (
        flaap_mq.create_execution_context(
            broker_url, SILOS, topology_prefix=module_prefix, task_timeout=300
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        total = histograms()
    manifest = json.loads((data_dir / digits.MANIFEST_FILE).read_text())
    expected = np.sum([manifest["silos"][s]["label_counts"] for s in SILOS], axis=0)
    np.testing.assert_array_equal(total, expected)


ROUNDS = 3


def test_train_matches_tff_local_runtime(fleet, broker_url, module_prefix, data_dir, tmp_path):
    """`flaap-mq train` on the silos == the same FedAvg on TFF's local runtime, same seed."""
    out = tmp_path / "out"
    started = time.monotonic()
    done = _cli(
        "train",
        "--broker-url", broker_url,
        "--prefix", module_prefix,
        *[arg for silo in SILOS for arg in ("--silo", silo)],
        "--rounds", str(ROUNDS),
        "--seed", str(SEED),
        "--test-set", str(data_dir / digits.TEST_FILE),
        "--out", str(out),
        "--log-format", "json",
        cwd=tmp_path,
    )  # fmt: skip
    cli_seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-5000:]
    assert "final test accuracy:" in done.stdout

    # One structured event per round, with its duration and payload sizes.
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    rounds = [e for e in events if e.get("event") == "training_round"]
    assert [e["round"] for e in rounds] == list(range(1, ROUNDS + 1))
    for event in rounds:
        assert event["duration_s"] > 0
        assert event["bytes_sent"] > 0 and event["bytes_received"] > 0
        assert set(event["bytes_sent_by_silo"]) == set(SILOS)

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == list(range(ROUNDS + 1))
    accuracy = [float(r["test_accuracy"]) for r in rows]
    assert accuracy[-1] > accuracy[0] + 0.5, accuracy  # it learned
    assert (out / "accuracy.png").stat().st_size > 10_000
    with np.load(out / "weights.npz") as saved:
        remote = [saved[f"arr_{i}"] for i in range(len(saved.files))]

    # The same training on TFF's own runtime, the silos' data passed in from here.
    algorithm = SiloFedAvg(TrainingConfig(seed=SEED, rounds=ROUNDS))
    datasets = [
        read_silo_dataset(data_dir / s, digits.DEFAULT_NAME, digits.ELEMENT_SPEC) for s in SILOS
    ]
    with (
        local_cpp_contexts(with_sync=True) as (_, local),
        tff.framework.get_context_stack().install(local),
    ):
        state = algorithm.initial_state()
        local_metrics = []
        for _ in range(ROUNDS):
            state, metrics = algorithm.round_with_data(state, datasets)
            local_metrics.append(metrics)
        local_weights = [np.asarray(w) for w in algorithm.model_weights(state).trainable]
    assert len(remote) == len(local_weights) == 4
    for r, lw in zip(remote, local_weights, strict=True):
        np.testing.assert_allclose(r, lw, atol=1e-5)
    for row, metrics in zip(rows[1:], local_metrics, strict=True):
        assert float(row["train_loss"]) == pytest.approx(metrics.loss, rel=1e-4)
        assert int(row["num_examples"]) == metrics.num_examples
    print(
        f"\n{ROUNDS} rounds via `flaap-mq train` in {cli_seconds:.1f} s; test accuracy per "
        f"round {accuracy}; round times {[float(r['round_seconds']) for r in rows[1:]]} s; "
        f"bytes sent/received per round {[(e['bytes_sent'], e['bytes_received']) for e in rounds]}"
    )


def test_fedavg_at_one_silo_matches_tff_local_runtime(fleet, broker_url, module_prefix, data_dir):
    """A federation of one silo runs each round whole on it (`partitioning._whole`):
    FedAvg's rounds there equal TFF's local runtime on that silo's data."""
    silo = SILOS[0]
    algorithm = SiloFedAvg(TrainingConfig(seed=SEED, rounds=2))
    with (
        flaap_mq.create_execution_context(
            broker_url, [silo], topology_prefix=module_prefix, task_timeout=300
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        state = algorithm.initial_state()
        remote_metrics = []
        for _ in range(2):
            state, metrics = algorithm.round(state)
            remote_metrics.append(metrics)
        remote = [np.asarray(w) for w in algorithm.model_weights(state).trainable]
        assert context.merge_context.merges_run == 0  # nothing merged, nothing after
    dataset = read_silo_dataset(data_dir / silo, digits.DEFAULT_NAME, digits.ELEMENT_SPEC)
    with (
        local_cpp_contexts(with_sync=True) as (_, local),
        tff.framework.get_context_stack().install(local),
    ):
        state = algorithm.initial_state()
        local_metrics = []
        for _ in range(2):
            state, metrics = algorithm.round_with_data(state, [dataset])
            local_metrics.append(metrics)
        local_weights = [np.asarray(w) for w in algorithm.model_weights(state).trainable]
    for r, lw in zip(remote, local_weights, strict=True):
        np.testing.assert_allclose(r, lw, atol=1e-5)
    for got, want in zip(remote_metrics, local_metrics, strict=True):
        assert got.loss == pytest.approx(want.loss, rel=1e-4)
        assert got.num_examples == want.num_examples


@pytest.mark.slow
def test_30_rounds_reach_090_on_3_skewed_silos(
    fleet, broker_url, module_prefix, data_dir, tmp_path
):
    """The issue's goal: test accuracy >= 0.90 within 30 rounds (`make test-slow`)."""
    out = tmp_path / "out"
    done = _cli(
        "train",
        "--broker-url", broker_url,
        "--prefix", module_prefix,
        *[arg for silo in SILOS for arg in ("--silo", silo)],
        "--rounds", "30",
        "--test-set", str(data_dir / digits.TEST_FILE),
        "--out", str(out),
        "--no-progress",
        "--log-format", "json",
        cwd=tmp_path,
        timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    accuracy = [float(r["test_accuracy"]) for r in rows]
    print(f"\n{done.stdout.strip()}\ntest accuracy per round: {[round(a, 4) for a in accuracy]}")
    print(f"round times: {[round(float(r['round_seconds']), 2) for r in rows[1:]]} s")
    assert len(rows) == 31
    assert max(accuracy[1:]) >= 0.90
    assert accuracy[-1] >= 0.90
