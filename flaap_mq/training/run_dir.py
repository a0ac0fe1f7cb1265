"""The output directory of `flaap-mq train`: training state saved each round, metrics released.

A run's directory (`--out DIR`) holds

* `run.json`: what makes the run this run (`run_identity`: the training
  configuration but its number of rounds, the silos in order, a digest of the
  held-out set), written once when the run starts;
* `state/round_<k>`: the program state after round k, saved with TFF's
  `tff.program.FileProgramStateManager` (a SavedModel per version, written to
  a temporary directory and renamed into place, so a version is whole or
  absent): the server state, the round number and the rows of every round so
  far (for the summary and the plot of a resumed run);
* `metrics.csv`: one row per round, key column `round`, released with
  `tff.program.CSVFileReleaseManager` in write mode (the whole file written
  to a temporary file and renamed: never half a row);
* `tensorboard/`: the same values as TensorBoard scalars
  (`tff.program.TensorBoardReleaseManager`), flushed after every round;
* `weights.npz` and `accuracy.png`, written at the end.

Round k's row is released *before* its state is saved. A coordinator killed
between the two resumes from round k-1's state, runs round k again, and
releasing it again replaces its row: the CSV manager drops every row whose
key is at least the key it releases (a TensorBoard step may then hold two
points, the same values written twice, apart from the round's time and bytes).
A coordinator killed after the save resumes at round k+1, so every completed
round is in `metrics.csv` exactly once.

A directory written by another configuration is refused (`RunMismatch`,
naming each difference); `fresh=True` discards what the directory holds of a
previous run (only the files above) and starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from flaap_mq.logs import get_logger
from flaap_mq.training.config import TrainingConfig

log = get_logger("flaap_mq.training")

RUN_FILE = "run.json"
STATE_DIR = "state"
STATE_PREFIX = "round_"
METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "accuracy.png"
WEIGHTS_FILE = "weights.npz"
KEY_FIELD = "round"
# Program states kept: the latest few (TFF's manager removes older ones).
KEEP_STATES = 3
# Format of run.json and of the saved program state.
FORMAT_VERSION = 1

# Settings that change how a run trains but not what it is: they may differ
# when it is resumed (`rounds`: train further).
RESUMABLE_SETTINGS = frozenset({"rounds"})

R = TypeVar("R")


class RunMismatch(ValueError):
    """The output directory holds a run of another configuration."""


def test_set_digest(test_set: tuple[np.ndarray, np.ndarray]) -> str:
    """A digest of the held-out set's contents (not its path)."""
    x, y = test_set
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)):
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def run_identity(
    config: TrainingConfig,
    silos: Sequence[str] | None,
    test_set: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """What must be equal for a directory's run to be resumed by this command.

    Everything that decides round k's model: the training configuration (but
    `rounds`), the silos in order (None on TFF's local runtime) and the
    held-out set's contents. Nothing in a round is random (`TrainingConfig`),
    so with these equal, round k after a resume is round k of an
    uninterrupted run.
    """
    identity = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_SETTINGS}
    identity["silos"] = list(silos) if silos is not None else None
    identity["test_set_sha256"] = test_set_digest(test_set)
    return identity


def _differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    def shown(values: Mapping[str, Any], name: str) -> str:
        return repr(values[name]) if name in values else "not set"

    names = list(wanted) + [k for k in saved if k not in wanted]
    return [
        f"{name}: {shown(saved, name)} there, {shown(wanted, name)} here"
        for name in names
        if name not in saved or name not in wanted or saved[name] != wanted[name]
    ]


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


@functools.cache
def _flushing_tensorboard_release_manager() -> type:
    """TFF's TensorBoard release manager, flushed after each release.

    TFF's leaves its summary writer's defaults (flushed every 2 minutes or 10
    events), so a coordinator killed mid-run would lose its last rounds' points.
    (A function: TensorFlow is loaded only once the directory is accepted.)
    """
    import tensorflow_federated as tff

    class FlushingTensorBoardReleaseManager(tff.program.TensorBoardReleaseManager):
        async def release(self, value: Any, key: int) -> None:
            await super().release(value, key)
            writer = getattr(self, "_summary_writer", None)  # TFF 0.87's attribute
            if writer is not None:
                writer.flush()

    return FlushingTensorBoardReleaseManager


def claim(
    path: str | os.PathLike[str], identity: Mapping[str, Any], *, fresh: bool = False
) -> Path:
    """Checks `path` holds this run or none (`RunMismatch` otherwise), and marks it this run's.

    Needs no TensorFlow, so that a command given the wrong directory fails at
    once. `fresh` first discards what `path` holds of a previous run.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    if fresh:
        discard(directory)
    run_file = directory / RUN_FILE
    wanted = {"format": FORMAT_VERSION, **identity}
    if run_file.exists():
        try:
            saved = json.loads(run_file.read_text())
        except ValueError as e:
            raise RunMismatch(
                f"{run_file} is not a run description ({e}): give another --out, or --fresh "
                "to discard what is there"
            ) from None
        differences = _differences(saved, wanted)
        if differences:
            raise RunMismatch(
                f"{directory} holds a run of another configuration ("
                + "; ".join(differences)
                + "): give another --out to keep it, the same settings to resume it, "
                "or --fresh to discard it and start over"
            )
        return directory
    if (directory / STATE_DIR).exists():
        raise RunMismatch(
            f"{directory} holds training state ({STATE_DIR}/) but no {RUN_FILE}, so it cannot "
            "be told whether it is this run: give another --out, or --fresh to discard it"
        )
    _write_atomically(run_file, json.dumps(wanted, indent=2, sort_keys=True) + "\n")
    return directory


def discard(directory: Path) -> None:
    """Removes what a previous run left in `directory` (only the files a run writes)."""
    for name in (STATE_DIR, TENSORBOARD_DIR):
        shutil.rmtree(directory / name, ignore_errors=True)
    for name in (RUN_FILE, METRICS_FILE, WEIGHTS_FILE, PLOT_FILE):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    log.info("training_out_discarded", out=str(directory))


@dataclasses.dataclass
class Resumed:
    """What a directory held of its run: the state after round `round`, and the rows so far."""

    state: Any
    round: int
    rows: list[dict[str, Any]]


class RunDirectory:
    """One run's directory: checked against this run, state saved and metrics released.

    Args:
      path: the directory (created if missing).
      identity: `run_identity(...)` of this run.
      fresh: discard what the directory holds of a previous run.
    """

    def __init__(
        self, path: str | os.PathLike[str], identity: Mapping[str, Any], *, fresh: bool = False
    ) -> None:
        import tensorflow_federated as tff

        self.identity = dict(identity)
        self.path = claim(path, self.identity, fresh=fresh)
        self.state_manager = tff.program.FileProgramStateManager(
            str(self.path / STATE_DIR), prefix=STATE_PREFIX, keep_total=KEEP_STATES
        )
        self._remove_partial_states()
        self.csv_manager = tff.program.CSVFileReleaseManager(
            str(self.path / METRICS_FILE),
            save_mode=tff.program.CSVSaveMode.WRITE,
            key_fieldname=KEY_FIELD,
        )
        self.tensorboard_manager = _flushing_tensorboard_release_manager()(
            str(self.path / TENSORBOARD_DIR)
        )
        self.release_manager = tff.program.GroupingReleaseManager(
            [self.csv_manager, self.tensorboard_manager]
        )

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def plot_path(self) -> Path:
        return self.path / PLOT_FILE

    def _remove_partial_states(self) -> None:
        """What a coordinator killed while writing left: TFF's temporary directory of a
        state (never loaded) or file of metrics.csv (never read), and ours of weights."""
        for entry in (self.path / STATE_DIR).glob(f"{STATE_PREFIX}*_temp*"):
            shutil.rmtree(entry, ignore_errors=True)
        for entry in [
            *self.path.glob(f"{METRICS_FILE}_temp*"),
            self.path / f".{WEIGHTS_FILE}.partial",
        ]:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()

    # -------------------------------------------------------------- state

    def latest_round(self) -> int | None:
        """The last round whose state is saved here, or None."""
        versions = _run(self.state_manager.get_versions())
        return max(versions) if versions else None

    def check_rounds(self, rounds: int) -> int | None:
        """The last round saved here, refused (`RunMismatch`) if beyond `rounds`."""
        completed = self.latest_round()
        if completed is not None and completed > rounds:
            raise RunMismatch(
                f"{self.path} holds {completed} rounds of this run, more than the {rounds} "
                f"asked for: give --rounds {completed} or more to continue it, or --fresh to "
                "start over"
            )
        return completed

    def load_latest(self, structure: Any) -> Resumed | None:
        """The latest saved state (shaped as `structure`, the server state), or None."""
        program_state, version = _run(
            self.state_manager.load_latest(self._program_state(structure, 0, []))
        )
        if program_state is None:
            return None
        rows = json.loads(_text(program_state["rows"]))
        return Resumed(program_state["server_state"], int(version), rows)

    def save(self, server_state: Any, round_number: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Saves the state after `round_number` (its row already released)."""
        _run(
            self.state_manager.save(
                self._program_state(server_state, round_number, rows), round_number
            )
        )

    @staticmethod
    def _program_state(
        server_state: Any, round_number: int, rows: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return {
            "server_state": server_state,
            "round": np.int64(round_number),
            "rows": json.dumps(list(rows)),
        }

    def write_weights(self, weights: Sequence[np.ndarray]) -> Path:
        """`weights.npz` (arr_0, arr_1, ...), whole or not at all."""
        temporary = self.path / f".{WEIGHTS_FILE}.partial"
        with temporary.open("wb") as f:
            np.savez(f, *weights)
        os.replace(temporary, self.weights_path)
        return self.weights_path

    # ------------------------------------------------------------ release

    def release(self, round_number: int, values: Mapping[str, Any]) -> None:
        """Releases one round's values (`metrics.csv` row and TensorBoard scalars)."""
        value = {k: v for k, v in values.items() if k != KEY_FIELD}
        self._order_columns(list(value))
        _run(self.release_manager.release(value, round_number))

    def _order_columns(self, columns: list[str]) -> None:
        """Columns in the record's order: TFF's CSV manager keeps a file's header and
        appends new names to it, but adds them sorted (it flattens the value with
        dm-tree); a file with no row yet gets the record's order first."""
        with self.metrics_path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if header != [KEY_FIELD] or next(reader, None) is not None:
                return
        _write_atomically(self.metrics_path, ",".join([KEY_FIELD, *columns]) + "\r\n")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return _text(value.item())
    return str(value)


def _run(awaitable: Any) -> Any:
    """Runs one of TFF's async program calls from this (synchronous) loop."""

    async def call() -> Any:
        return await awaitable

    return asyncio.run(call())


def rows_to(factory: Callable[..., R], rows: Sequence[Mapping[str, Any]]) -> list[R]:
    """Rows back into records; fields the factory does not know are left out."""
    known = {f.name for f in dataclasses.fields(factory)}  # type: ignore[arg-type]
    return [factory(**{k: v for k, v in row.items() if k in known}) for row in rows]
