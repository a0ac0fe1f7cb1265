"""The run directory of `flaap-mq train`: identity, state and rows, without a broker.

The rounds themselves are tested end to end (tests/e2e/test_training_resume.py);
here, what the directory does with TFF's program state and release managers.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from flaap_mq.training import run_dir
from flaap_mq.training.config import TrainingConfig

TEST_SET = (np.zeros((4, 64), np.float32), np.arange(4, dtype=np.int32))
SILOS = ["silo-1", "silo-2"]


def _identity(**changes) -> dict:
    silos = changes.pop("silos", SILOS)
    test_set = changes.pop("test_set", TEST_SET)
    return run_dir.run_identity(TrainingConfig(**changes), silos, test_set)


def _rows(path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_state_and_rows_round_trip_and_a_row_released_again_replaces_the_later_ones(tmp_path):
    directory = run_dir.RunDirectory(tmp_path / "out", _identity())
    state = {"weights": [np.arange(3, dtype=np.float32)], "step": np.int32(0)}
    rows = []
    for k in range(3):
        row = {"round": k, "silos": "silo-1;silo-2", "loss": None if k == 0 else 1.0 / k}
        rows.append(row)
        directory.release(k, row)
        state = {"weights": [state["weights"][0] + 1], "step": np.int32(k)}
        directory.save(state, k, rows)
    # The coordinator died after releasing round 3 and before saving it.
    directory.release(3, {"round": 3, "loss": 0.25, "silos": "silo-1;silo-2"})

    again = run_dir.RunDirectory(tmp_path / "out", _identity())
    assert again.latest_round() == 2
    resumed = again.load_latest({"weights": [np.zeros(3, np.float32)], "step": np.int32(0)})
    assert resumed.round == 2 and resumed.rows == rows
    np.testing.assert_array_equal(resumed.state["weights"][0], np.arange(3) + 3)
    # Round 3 again: its row replaces the dead coordinator's, once.
    again.release(3, {"round": 3, "loss": 0.5, "silos": "silo-1"})
    written = _rows(tmp_path / "out" / run_dir.METRICS_FILE)
    assert list(written[0]) == ["round", "silos", "loss"]  # the record's order, not sorted
    assert [int(r["round"]) for r in written] == [0, 1, 2, 3]
    assert written[0]["loss"] == "" and float(written[3]["loss"]) == 0.5
    assert written[3]["silos"] == "silo-1"
    assert any((tmp_path / "out" / run_dir.TENSORBOARD_DIR).iterdir())


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"hidden_units": 64}, "hidden_units: 32 there, 64 here"),
        ({"silos": ["silo-2", "silo-1"]}, "silos: ['silo-1', 'silo-2'] there"),
        ({"data_name": "other"}, "data_name: 'digits' there, 'other' here"),
        ({"seed": 3}, "seed: 0 there, 3 here"),
        ({"test_set": (TEST_SET[0] + 1, TEST_SET[1])}, "test_set_sha256"),
    ],
)
def test_a_directory_of_another_configuration_is_refused_naming_the_difference(
    tmp_path, changes, named
):
    run_dir.RunDirectory(tmp_path, _identity())
    with pytest.raises(run_dir.RunMismatch, match="another configuration") as refused:
        run_dir.RunDirectory(tmp_path, _identity(**changes))
    assert named in str(refused.value) and "--fresh" in str(refused.value)
    # More rounds is the same run, trained further.
    run_dir.RunDirectory(tmp_path, _identity(rounds=99))


def test_fresh_discards_the_previous_run_and_claims_the_directory(tmp_path):
    first = run_dir.RunDirectory(tmp_path, _identity())
    first.release(0, {"round": 0, "loss": 1.0})
    first.save({"w": np.zeros(2, np.float32)}, 0, [{"round": 0}])
    (tmp_path / "notes.txt").write_text("mine")  # not the run's: kept
    other = run_dir.RunDirectory(tmp_path, _identity(hidden_units=8), fresh=True)
    assert other.latest_round() is None
    assert _rows(tmp_path / run_dir.METRICS_FILE) == []
    assert json.loads((tmp_path / run_dir.RUN_FILE).read_text())["hidden_units"] == 8
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_state_without_a_run_description_is_refused(tmp_path):
    (tmp_path / run_dir.STATE_DIR / "round_0").mkdir(parents=True)
    with pytest.raises(run_dir.RunMismatch, match=r"no run\.json"):
        run_dir.RunDirectory(tmp_path, _identity())


def test_what_a_killed_writer_left_is_removed_and_never_loaded(tmp_path):
    directory = run_dir.RunDirectory(tmp_path, _identity())
    directory.save({"w": np.zeros(2, np.float32)}, 0, [{"round": 0}])
    # A save and a CSV write cut short by SIGKILL (TFF's temporary names).
    (tmp_path / run_dir.STATE_DIR / "round_1_temp1234").mkdir()
    (tmp_path / f"{run_dir.METRICS_FILE}_temp5678").write_text("round\n1\n")
    again = run_dir.RunDirectory(tmp_path, _identity())
    assert again.latest_round() == 0
    assert sorted(p.name for p in (tmp_path / run_dir.STATE_DIR).iterdir()) == ["round_0"]
    assert not list(tmp_path.glob("*_temp*"))
