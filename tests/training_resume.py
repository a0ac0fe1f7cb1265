"""`flaap-mq train` killed mid-round and run again: shared by the e2e and fault suites.

`kill_mid_round` starts the coordinator as an operator does (at debug
level), follows its JSON events as they come, and SIGKILLs it once round k's
state is saved (its `training_round` event is logged after the save) and a
silo has answered round k+1's first task (the coordinator's own `task_done`
event): the round is then on the silos, and far from its end. Watching the
workers' log files instead (polled every 0.2 s) once let the coordinator
finish round k+1 before the kill.
"""

from __future__ import annotations

import csv
import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flaap_mq.data import digits
from flaap_mq.training import run_dir

SILOS = digits.silo_ids(2)
SEED = 3
ROUNDS = 4
KILL_AFTER = 2  # the coordinator dies while round KILL_AFTER + 1 runs on the silos
# Enough local work that a round lasts long enough to be killed in (about 1 s here).
LOCAL_EPOCHS = 15
# A dead coordinator's reply queue expires this long after it died.
REPLY_QUEUE_EXPIRES_S = 3


def train_args(
    broker_url: str,
    prefix: str,
    data_dir: Path,
    out: Path,
    *extra: str,
    silos: Sequence[str] = SILOS,
    rounds: int = ROUNDS,
) -> list[str]:
    return [
        "train",
        "--broker-url", broker_url,
        "--prefix", prefix,
        *[arg for silo in silos for arg in ("--silo", silo)],
        "--rounds", str(rounds),
        "--seed", str(SEED),
        "--local-epochs", str(LOCAL_EPOCHS),
        "--test-set", str(data_dir / digits.TEST_FILE),
        "--out", str(out),
        "--reply-queue-expires", str(REPLY_QUEUE_EXPIRES_S),
        "--no-progress",
        "--log-format", "json",
        *extra,
    ]  # fmt: skip


def events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def rows(out: Path) -> list[dict[str, str]]:
    with (out / run_dir.METRICS_FILE).open() as f:
        return list(csv.DictReader(f))


def row_rounds(out: Path) -> list[int]:
    return [int(r["round"]) for r in rows(out)]


def weights(out: Path) -> list[np.ndarray]:
    with np.load(out / run_dir.WEIGHTS_FILE) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def saved_rounds(out: Path) -> list[int]:
    """The rounds whose program state is in `out` (TFF's `round_<k>` directories)."""
    names = [p.name.removeprefix(run_dir.STATE_PREFIX) for p in (out / run_dir.STATE_DIR).iterdir()]
    return sorted(int(n) for n in names if n.isdigit())


def kill_mid_round(args: Sequence[str], cwd: Path) -> str:
    """Runs `flaap-mq ARGS`, SIGKILLs it during round KILL_AFTER + 1; returns its job id."""
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "flaap_mq.cli", *args, "--log-level", "debug"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Its events as they come, read to the end so that it never blocks on a full pipe.
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in coordinator.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        job = None
        saved = False
        while (line := lines.get(timeout=300)) is not None:
            seen.append(line)
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "coordinator_connected":
                job = event["job"]
            if event.get("event") == "training_round" and event["round"] == KILL_AFTER:
                saved = True  # logged once round KILL_AFTER's state is saved
            elif saved and event.get("event") == "task_done":
                break  # a silo answered round KILL_AFTER + 1's first task
        else:
            raise AssertionError(
                f"the coordinator ended with {coordinator.wait()} before round {KILL_AFTER}:\n"
                + "".join(seen)[-5000:]
            )
        coordinator.send_signal(signal.SIGKILL)
        assert job, "no coordinator_connected event"
        assert coordinator.wait(10) == -signal.SIGKILL
        return job
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait(10)
        reader.join(10)
        coordinator.stderr.close()
