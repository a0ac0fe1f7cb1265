"""The training loop behind `flaap-mq train`: rounds, evaluation, progress, outputs.

Each round runs `SiloFedAvg.round` on the installed context (the silos), then
evaluates the new model on the held-out set with Keras on the coordinator,
and

* logs one `training_round` event (structlog) with the round's duration, the
  executor payload bytes sent to and received from the silos (in all and per
  silo) and the metrics;
* advances a progress bar (train loss, train accuracy, test accuracy, round
  time);
* appends a row to `OUT/metrics.csv` (flushed, so an interrupted run keeps
  its rounds).

At the end it writes `OUT/accuracy.png` and `OUT/weights.npz` (the final
trainable weights). Row 0 of the CSV is the initial model.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import tensorflow_federated as tff
from tqdm import tqdm

from flaap_mq.logs import get_logger, redirect_cli_output
from flaap_mq.training import model as model_lib
from flaap_mq.training.fedavg import SiloFedAvg, flat_weights
from flaap_mq.training.meter import PayloadCounts, PayloadMeter

log = get_logger("flaap_mq.training")

METRICS_FILE = "metrics.csv"
PLOT_FILE = "accuracy.png"
WEIGHTS_FILE = "weights.npz"
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

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def row(self) -> list[Any]:
        def cell(value: Any) -> Any:
            if value is None:
                return ""
            return f"{value:.6g}" if isinstance(value, float) else value

        return [cell(getattr(self, name)) for name in self.fields()]


@dataclasses.dataclass
class TrainingResult:
    records: list[RoundRecord]
    weights: list[np.ndarray]
    out_dir: Path | None
    model_bytes: int

    @property
    def final_accuracy(self) -> float:
        return self.records[-1].test_accuracy

    def first_round_reaching(self, accuracy: float) -> int | None:
        for record in self.records:
            if record.round > 0 and record.test_accuracy >= accuracy:
                return record.round
        return None


class TqdmStream:
    """A text stream whose lines are printed above the progress bars (`tqdm.write`)."""

    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            tqdm.write(line, file=self._file or sys.stderr)
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            tqdm.write(self._buffer, file=self._file or sys.stderr)
            self._buffer = ""


def route_logs_above_progress_bars() -> None:
    """The CLI's log lines are printed with `tqdm.write`, so they do not tear the bar."""
    redirect_cli_output(TqdmStream())


@contextlib.contextmanager
def _maybe_installed(context: Any | None) -> Iterator[None]:
    if context is None:
        yield
    else:
        with tff.framework.get_context_stack().install(context):
            yield


def _meter_for(context: Any | None) -> PayloadMeter | None:
    client = getattr(context, "client", None)
    return PayloadMeter(client) if client is not None else None


def train(
    algorithm: SiloFedAvg,
    test_set: tuple[np.ndarray, np.ndarray],
    *,
    context: Any | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    rounds: int | None = None,
) -> TrainingResult:
    """Runs `rounds` (default: the config's) rounds of `algorithm` and evaluates each.

    Args:
      algorithm: the training, with its `TrainingConfig`.
      test_set: (x, y) held out on the coordinator.
      context: a flaap-mq context (`create_execution_context`), installed for
        the run and metered (payload bytes per round); None runs on whatever
        TFF context is installed (e.g. TFF's local runtime), unmetered.
      out_dir: where metrics.csv, accuracy.png and weights.npz go; None
        writes nothing.
      progress: show a progress bar on stderr.
    """
    config = algorithm.config
    rounds = config.rounds if rounds is None else rounds
    x_test, y_test = test_set
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    meter = _meter_for(context)
    size = model_lib.model_bytes(config)
    records: list[RoundRecord] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_maybe_installed(context))
        writer = None
        if out is not None:
            csv_file = stack.enter_context((out / METRICS_FILE).open("w", newline=""))
            writer = csv.writer(csv_file)
            writer.writerow(RoundRecord.fields())

        def record(rec: RoundRecord) -> None:
            records.append(rec)
            if writer is not None:
                writer.writerow(rec.row())
                csv_file.flush()

        started = time.monotonic()
        before = meter.snapshot() if meter else PayloadCounts()
        state = algorithm.initial_state()
        setup = (meter.snapshot() if meter else PayloadCounts()) - before
        test_loss, test_accuracy = algorithm.evaluate(state, x_test, y_test)
        record(
            RoundRecord(
                round=0,
                train_loss=None,
                train_accuracy=None,
                num_examples=0,
                test_loss=test_loss,
                test_accuracy=test_accuracy,
                round_seconds=time.monotonic() - started,
                bytes_sent=setup.bytes_sent,
                bytes_received=setup.bytes_received,
                requests=setup.requests,
            )
        )
        log.info(
            "training_started",
            rounds=rounds,
            model_bytes=size,
            test_accuracy=round(test_accuracy, 4),
            setup_s=round(time.monotonic() - started, 3),
            bytes_sent=setup.bytes_sent,
            bytes_received=setup.bytes_received,
            config=dataclasses.asdict(config),
        )
        bar = stack.enter_context(
            tqdm(
                total=rounds,
                desc="FedAvg",
                unit="round",
                disable=not progress,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        )
        for round_number in range(1, rounds + 1):
            started = time.monotonic()
            before = meter.snapshot() if meter else PayloadCounts()
            state, metrics = algorithm.round(state)
            seconds = time.monotonic() - started
            counts = (meter.snapshot() if meter else PayloadCounts()) - before
            test_loss, test_accuracy = algorithm.evaluate(state, x_test, y_test)
            rec = RoundRecord(
                round_number,
                metrics.loss,
                metrics.accuracy,
                metrics.num_examples,
                test_loss,
                test_accuracy,
                seconds,
                counts.bytes_sent,
                counts.bytes_received,
                counts.requests,
            )
            record(rec)
            log.info(
                "training_round",
                round=round_number,
                duration_s=round(seconds, 3),
                bytes_sent=counts.bytes_sent,
                bytes_received=counts.bytes_received,
                requests=counts.requests,
                bytes_sent_by_silo=counts.sent_by_silo,
                bytes_received_by_silo=counts.received_by_silo,
                model_bytes=size,
                num_examples=metrics.num_examples,
                train_loss=round(metrics.loss, 5),
                train_accuracy=round(metrics.accuracy, 4),
                test_accuracy=round(test_accuracy, 4),
            )
            bar.set_postfix(
                loss=f"{metrics.loss:.4f}",
                acc=f"{metrics.accuracy:.3f}",
                test_acc=f"{test_accuracy:.3f}",
                round_s=f"{seconds:.1f}",
            )
            bar.update()
        weights = flat_weights(algorithm.model_weights(state))
    result = TrainingResult(records, weights, out, size)
    if out is not None:
        np.savez(out / WEIGHTS_FILE, *weights)
        plot_accuracy(result, out / PLOT_FILE)
    return result


def plot_accuracy(result: TrainingResult, path: Path, *, title: str | None = None) -> Path:
    """Test and train accuracy per round, with the 0.90 target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in result.records]
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        axis.plot(rounds, [r.test_accuracy for r in result.records], "o-", label="test (held out)")
        trained = [r for r in result.records if r.train_accuracy is not None]
        axis.plot(
            [r.round for r in trained],
            [r.train_accuracy for r in trained],
            "s--",
            alpha=0.7,
            label="train (silos, during the round)",
        )
        axis.axhline(TARGET_ACCURACY, color="grey", linestyle=":", label=f"{TARGET_ACCURACY:.2f}")
        axis.set_xlabel("round")
        axis.set_ylabel("accuracy")
        axis.set_ylim(0, 1.0)
        axis.set_xlim(0, max(rounds) if rounds else 1)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
        axis.set_title(
            title
            or f"FedAvg on silo-resident digits: {result.final_accuracy:.3f} after "
            f"{rounds[-1]} rounds"
        )
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path
