"""What a training run yields: one row per round (`RoundRecord`) and the run's result.

A `RoundRecord` is what `train` logs, releases to `OUT/metrics.csv` and saves
with the run's state (`run_dir`), so its fields are the CSV's columns; a
`TrainingResult` is every row, the final weights and where they were written.
Plain data, no TensorFlow: the plot and the tests build them by hand.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

# The accuracy a run aims at: the plot's target line, and the round the CLI
# says first reached it.
TARGET_ACCURACY = 0.90


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    round: int
    train_loss: float | None
    train_accuracy: float | None
    num_examples: int
    test_loss: float
    test_accuracy: float
    round_seconds: float
    bytes_sent: int
    bytes_received: int
    requests: int
    # Who took part (`FederatedSilosContext.last_participation`): the silos
    # that answered, "a;b", and those dropped with the reason,
    # "c:no-consumer-60s" ("" on TFF's local runtime, and when none was dropped).
    silos: str = ""
    dropped: str = ""

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def values(self) -> dict[str, Any]:
        """Every field by name: what is released (a metrics.csv row) and saved."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainingResult:
    records: list[RoundRecord]
    weights: list[np.ndarray]
    out_dir: Path | None
    model_bytes: int
    # The last round the run's directory held when this command started
    # (None: it started from the initial model).
    resumed_after: int | None = None

    @property
    def final_accuracy(self) -> float:
        return self.records[-1].test_accuracy

    def first_round_reaching(self, accuracy: float) -> int | None:
        for record in self.records:
            if record.round > 0 and record.test_accuracy >= accuracy:
                return record.round
        return None
