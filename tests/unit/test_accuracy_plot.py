"""`flaap-mq train`'s plot shows who took part once a round ran without some silo."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from flaap_mq.training.plot import plot_accuracy
from flaap_mq.training.records import RoundRecord, TrainingResult


def _record(round_: int, silos: str, dropped: str = "") -> RoundRecord:
    return RoundRecord(
        round=round_,
        train_loss=None if round_ == 0 else 0.5,
        train_accuracy=None if round_ == 0 else 0.8,
        num_examples=0 if round_ == 0 else 100,
        test_loss=0.4,
        test_accuracy=0.1 + 0.2 * round_,
        round_seconds=1.0,
        bytes_sent=10,
        bytes_received=10,
        requests=3,
        silos=silos,
        dropped=dropped,
    )


def _height(records: list[RoundRecord], path: Path) -> int:
    plot_accuracy(TrainingResult(records, [], None, 0), path)
    with Image.open(path) as image:
        return image.height


def test_a_round_that_dropped_a_silo_adds_a_participation_panel(tmp_path):
    everyone = [_record(0, "a;b;c"), _record(1, "a;b;c"), _record(2, "a;b;c")]
    one_dropped = [_record(0, "a;b;c"), _record(1, "a;b", "c:no-consumer-60s"), _record(2, "a;b;c")]
    plain = _height(everyone, tmp_path / "plain.png")
    with_panel = _height(one_dropped, tmp_path / "panel.png")
    assert with_panel > plain * 1.2, (plain, with_panel)
    assert plain == pytest.approx(4.2 * 110, abs=2)
