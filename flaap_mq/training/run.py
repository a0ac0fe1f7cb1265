"""The training loop behind `flaap-mq train`: rounds, evaluation, progress, outputs.

Each round runs `SiloFedAvg.round` on the installed context (the silos), then
evaluates the new model on the held-out set with Keras on the coordinator,
and

* logs one `training_round` event (structlog) with the round's duration, the
  executor payload bytes sent to and received from the silos (in all and per
  silo) and the metrics;
* advances a progress bar (train loss, train accuracy, test accuracy, round
  time);
* releases the round's row to `OUT/metrics.csv` and `OUT/tensorboard/`,
  then saves the training state in `OUT/state/` (TFF's program state and
  release managers, `flaap_mq.training.run_dir`), so that the same command
  run again after the coordinator died resumes after the last saved round.

At the end it writes `OUT/accuracy.png` and `OUT/weights.npz` (the final
trainable weights). Row 0 of the CSV is the initial model.
"""

from __future__ import annotations

import contextlib
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
from flaap_mq.training import run_dir as run_dir_lib
from flaap_mq.training.fedavg import SiloFedAvg, flat_weights
from flaap_mq.training.meter import PayloadCounts, PayloadMeter

log = get_logger("flaap_mq.training")

METRICS_FILE = run_dir_lib.METRICS_FILE
PLOT_FILE = run_dir_lib.PLOT_FILE
WEIGHTS_FILE = run_dir_lib.WEIGHTS_FILE
TENSORBOARD_DIR = run_dir_lib.TENSORBOARD_DIR
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


def _participation(context: Any | None) -> tuple[str, str, int, int]:
    """Who answered the last invocation on `context`, who was dropped: as
    `RoundRecord.silos`/`dropped`, and how many of each."""
    taken = getattr(context, "last_participation", None)
    if taken is None:
        return "", "", 0, 0
    return taken.silos_field, taken.dropped_field, len(taken.silos), len(taken.dropped)


def _meter_for(context: Any | None) -> PayloadMeter | None:
    client = getattr(context, "client", None)
    return PayloadMeter(client) if client is not None else None


def train(
    algorithm: SiloFedAvg,
    test_set: tuple[np.ndarray, np.ndarray],
    *,
    context: Any | None = None,
    out_dir: str | Path | run_dir_lib.RunDirectory | None = None,
    progress: bool = True,
    rounds: int | None = None,
    fresh: bool = False,
) -> TrainingResult:
    """Runs `rounds` (default: the config's) rounds of `algorithm` and evaluates each.

    Args:
      algorithm: the training, with its `TrainingConfig`.
      test_set: (x, y) held out on the coordinator.
      context: a flaap-mq context (`create_execution_context`), installed for
        the run and metered (payload bytes per round); None runs on whatever
        TFF context is installed (e.g. TFF's local runtime), unmetered.
      out_dir: the run's directory (`run_dir.RunDirectory`, or its path):
        state saved and metrics released after every round, accuracy.png
        and weights.npz at the end; a directory holding this run's state
        resumes it after its last saved round, one of another configuration
        is refused (`run_dir.RunMismatch`). None writes nothing.
      progress: show a progress bar on stderr.
      fresh: discard what `out_dir` holds of a previous run and start over.
    """
    config = algorithm.config
    rounds = config.rounds if rounds is None else rounds
    x_test, y_test = test_set
    out = _run_directory(out_dir, algorithm, context, test_set, fresh=fresh)
    completed = out.check_rounds(rounds) if out is not None else None
    meter = _meter_for(context)
    size = model_lib.model_bytes(config)
    records: list[RoundRecord] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_maybe_installed(context))

        def record(rec: RoundRecord, state: Any) -> None:
            """The round's row released, then its state saved: see `run_dir`."""
            records.append(rec)
            if out is not None:
                out.release(rec.round, rec.values())
                out.save(state, rec.round, [r.values() for r in records])

        started = time.monotonic()
        before = meter.snapshot() if meter else PayloadCounts()
        state = algorithm.initial_state()
        setup = (meter.snapshot() if meter else PayloadCounts()) - before
        silos, dropped, _, _ = _participation(context)
        # The initial state is this run's round 0 (seeded), and the shape a
        # saved state is loaded into.
        resumed = out.load_latest(state) if completed is not None else None
        if resumed is not None:
            state = resumed.state
            records.extend(run_dir_lib.rows_to(RoundRecord, resumed.rows))
            log.info(
                "training_resumed",
                out=str(out.path),
                completed_rounds=resumed.round,
                next_round=resumed.round + 1,
                rounds=rounds,
            )
        else:
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
                    silos=silos,
                    dropped=dropped,
                ),
                state,
            )
        first_round = records[-1].round + 1
        log.info(
            "training_started",
            rounds=rounds,
            first_round=first_round,
            model_bytes=size,
            test_accuracy=round(records[0].test_accuracy, 4),
            setup_s=round(time.monotonic() - started, 3),
            bytes_sent=setup.bytes_sent,
            bytes_received=setup.bytes_received,
            config=dataclasses.asdict(config),
        )
        bar = stack.enter_context(
            tqdm(
                total=rounds,
                initial=first_round - 1,
                desc="FedAvg",
                unit="round",
                disable=not progress,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        )
        for round_number in range(first_round, rounds + 1):
            started = time.monotonic()
            before = meter.snapshot() if meter else PayloadCounts()
            state, metrics = algorithm.round(state)
            seconds = time.monotonic() - started
            # Each round runs on the silos online at its start and completes
            # over those that answer (`min_silos`); who did goes in the row.
            silos, dropped, answered, lost = _participation(context)
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
                silos,
                dropped,
            )
            record(rec, state)
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
                silos=silos,
                dropped=dropped,
            )
            postfix = dict(
                loss=f"{metrics.loss:.4f}",
                acc=f"{metrics.accuracy:.3f}",
                test_acc=f"{test_accuracy:.3f}",
                round_s=f"{seconds:.1f}",
            )
            if answered:
                postfix["silos"] = f"{answered}/{answered + lost}"
            if dropped:
                postfix["dropped"] = dropped
            bar.set_postfix(**postfix)
            bar.update()
        weights = flat_weights(algorithm.model_weights(state))
    result = TrainingResult(
        records,
        weights,
        out.path if out is not None else None,
        size,
        resumed_after=resumed.round if resumed is not None else None,
    )
    if out is not None:
        out.write_weights(weights)
        plot_accuracy(result, out.plot_path)
    return result


def open_run_directory(
    out_dir: str | Path,
    config: Any,
    silos: list[str] | None,
    test_set: tuple[np.ndarray, np.ndarray],
    *,
    fresh: bool = False,
) -> run_dir_lib.RunDirectory:
    """The run's directory, checked against this run (`run_dir.RunMismatch` if another's)."""
    directory = run_dir_lib.RunDirectory(
        out_dir, run_dir_lib.run_identity(config, silos, test_set), fresh=fresh
    )
    directory.check_rounds(config.rounds)
    return directory


def _run_directory(
    out_dir: str | Path | run_dir_lib.RunDirectory | None,
    algorithm: SiloFedAvg,
    context: Any | None,
    test_set: tuple[np.ndarray, np.ndarray],
    *,
    fresh: bool,
) -> run_dir_lib.RunDirectory | None:
    if out_dir is None or isinstance(out_dir, run_dir_lib.RunDirectory):
        return out_dir
    client = getattr(context, "client", None)
    silos = list(client.silo_ids) if client is not None else None
    return open_run_directory(out_dir, algorithm.config, silos, test_set, fresh=fresh)


def _count(field: str) -> int:
    return len(field.split(";")) if field else 0


def plot_accuracy(result: TrainingResult, path: Path, *, title: str | None = None) -> Path:
    """Test and train accuracy per round, with the 0.90 target.

    When a round ran without some silo (`--min-silos`), a second panel below
    shows, per round, how many silos took part and how many were dropped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in result.records]
    trained_rounds = [r for r in result.records if r.round > 0]
    show_participation = any(r.dropped for r in trained_rounds)
    if show_participation:
        figure, (axis, lower) = plt.subplots(
            2, 1, figsize=(7, 5.6), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    else:
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
        bottom = axis
        if show_participation:
            took = [_count(r.silos) for r in trained_rounds]
            lost = [_count(r.dropped) for r in trained_rounds]
            x = [r.round for r in trained_rounds]
            lower.bar(x, took, color="tab:green", label="took part")
            lower.bar(x, lost, bottom=took, color="tab:red", label="dropped")
            lower.set_ylabel("silos")
            lower.yaxis.set_major_locator(MaxNLocator(integer=True))
            lower.legend(loc="lower right", fontsize="small")
            lower.grid(alpha=0.3, axis="y")
            bottom = lower
        bottom.set_xlabel("round")
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path
