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

At the end it writes `OUT/accuracy.png` (`plot.py`) and `OUT/weights.npz`
(the final trainable weights). Row 0 of the CSV is the initial model.

A round's row and the run's result are `records.py`; the log lines kept above
the progress bar, `progress.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_federated as tff
from tqdm import tqdm

from flaap_mq.logs import get_logger
from flaap_mq.training import model as model_lib
from flaap_mq.training import run_dir as run_dir_lib
from flaap_mq.training.fedavg import SiloFedAvg, flat_weights
from flaap_mq.training.meter import PayloadCounts, PayloadMeter
from flaap_mq.training.plot import plot_accuracy

# Re-exported: `training/cli.py` and users read them here, as before they
# had modules of their own.
from flaap_mq.training.progress import (
    route_logs_above_progress_bars as route_logs_above_progress_bars,
)
from flaap_mq.training.records import TARGET_ACCURACY as TARGET_ACCURACY
from flaap_mq.training.records import RoundRecord as RoundRecord
from flaap_mq.training.records import TrainingResult as TrainingResult

log = get_logger("flaap_mq.training")

METRICS_FILE = run_dir_lib.METRICS_FILE
PLOT_FILE = run_dir_lib.PLOT_FILE
WEIGHTS_FILE = run_dir_lib.WEIGHTS_FILE
TENSORBOARD_DIR = run_dir_lib.TENSORBOARD_DIR


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
