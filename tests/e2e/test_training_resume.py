"""End to end: `flaap-mq train` resumes after its coordinator was SIGKILLed mid-round.

Two silo workers serve their own digits (`flaap-mq data split-digits
--silos 2`); `flaap-mq train` runs as an operator runs it. One coordinator is
killed with SIGKILL while its round k+1 is on the silos (the state of round k
saved); the same command run again resumes at round k+1, `metrics.csv` holds
every round once, and the final weights equal those of an uninterrupted run.
A directory of another configuration is refused, naming the difference;
`--fresh` starts over. What the dead coordinator leaves on the broker is
checked in tests/faults/test_dead_coordinator_training.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flaap_mq.testing.cli import run_cli
from flaap_mq.training import run_dir
from tests import training_resume as tr


@pytest.fixture(scope="module")
def data_dir(digits_split) -> Path:
    return digits_split(2)


@pytest.fixture(scope="module")
def fleet(module_data_workers, data_dir):
    return module_data_workers({silo: data_dir / silo for silo in tr.SILOS})


@pytest.fixture(scope="module")
def uninterrupted(broker_url, module_prefix, data_dir, fleet, tmp_path_factory) -> Path:
    """The same training run once without interruption."""
    root = tmp_path_factory.mktemp("uninterrupted")
    args = tr.train_args(broker_url, module_prefix, data_dir, root / "out")
    done = run_cli(*args, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    assert tr.row_rounds(root / "out") == list(range(tr.ROUNDS + 1))
    return root / "out"


def test_a_killed_coordinator_resumes_where_it_stopped(
    broker_url, module_prefix, data_dir, fleet, uninterrupted, tmp_path
):
    out = tmp_path / "out"
    args = tr.train_args(broker_url, module_prefix, data_dir, out)
    tr.kill_mid_round(args, tmp_path)
    # Killed mid-round: round KILL_AFTER is the last saved, and the last released.
    assert tr.saved_rounds(out)[-1] == tr.KILL_AFTER
    assert tr.row_rounds(out) == list(range(tr.KILL_AFTER + 1))

    resumed = run_cli(*args, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    events = tr.events(resumed.stderr)
    assert [e["round"] for e in events if e.get("event") == "training_round"] == list(
        range(tr.KILL_AFTER + 1, tr.ROUNDS + 1)
    )
    assert f"resumed after round {tr.KILL_AFTER}" in resumed.stdout
    assert tr.row_rounds(out) == list(range(tr.ROUNDS + 1))  # every round, once
    # Round by round and at the end, the same as the uninterrupted run.
    for row, same in zip(tr.rows(out), tr.rows(uninterrupted), strict=True):
        for field in ("test_accuracy", "test_loss", "train_loss", "num_examples"):
            assert (row[field] == "") == (same[field] == "")
            if same[field]:
                assert float(row[field]) == pytest.approx(float(same[field]), rel=1e-5, abs=1e-7)
    for mine, theirs in zip(tr.weights(out), tr.weights(uninterrupted), strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    assert any((out / run_dir.TENSORBOARD_DIR).iterdir())
    assert (out / run_dir.PLOT_FILE).stat().st_size > 10_000


def test_a_directory_of_another_configuration_is_refused_and_fresh_starts_over(
    broker_url, module_prefix, data_dir, fleet, uninterrupted, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    other = tr.train_args(broker_url, module_prefix, data_dir, out, "--hidden-units", "16")
    refused = run_cli(*other, cwd=tmp_path)
    assert refused.returncode != 0
    message = refused.stderr.strip().splitlines()[-1]
    assert message.startswith("flaap-mq train: ") and "another configuration" in message
    assert "hidden_units: 32 there, 16 here" in message and "--fresh" in message
    one_silo = tr.train_args(broker_url, module_prefix, data_dir, out, silos=tr.SILOS[:1])
    refused = run_cli(*one_silo, cwd=tmp_path)
    assert refused.returncode != 0
    assert "silos: ['silo-1', 'silo-2'] there, ['silo-1'] here" in refused.stderr
    fewer = tr.train_args(broker_url, module_prefix, data_dir, out, rounds=tr.ROUNDS - 1)
    refused = run_cli(*fewer, cwd=tmp_path)
    assert refused.returncode != 0
    assert f"holds {tr.ROUNDS} rounds of this run, more than the {tr.ROUNDS - 1}" in refused.stderr
    # Nothing of the run there was touched.
    assert tr.row_rounds(out) == list(range(tr.ROUNDS + 1))
    assert tr.saved_rounds(out)[-1] == tr.ROUNDS

    # --fresh: the other configuration, from round 0 (one local epoch: the
    # round only has to run, not to last long enough to be killed in).
    fresh = run_cli(
        *tr.train_args(
            broker_url,
            module_prefix,
            data_dir,
            out,
            *("--hidden-units", "16", "--local-epochs", "1", "--fresh"),
            rounds=1,
        ),
        cwd=tmp_path,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr[-5000:]
    assert "resumed" not in fresh.stdout
    assert tr.row_rounds(out) == [0, 1]
    assert tr.saved_rounds(out) == [0, 1]
    assert json.loads((out / run_dir.RUN_FILE).read_text())["hidden_units"] == 16
    assert tr.weights(out)[0].shape == (64, 16)
