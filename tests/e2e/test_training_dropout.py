"""`flaap-mq train --min-silos`: a silo that never starts, and min_silos not met.

Real broker, real workers each serving its own digits partition, the CLI run
as an operator would. The third silo never gets a worker.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import pytest

from flaap_mq.data import digits
from flaap_mq.testing.cli import run_cli
from tests.faults import support

SILOS = digits.silo_ids(3)  # silo-1, silo-2, silo-3
ONLINE = SILOS[:2]
GRACE_S = 3


def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(digits_split) -> Path:
    return digits_split(3)


@pytest.fixture(scope="module")
def fleet(module_data_workers, data_dir):
    """Workers for silo-1 and silo-2 only."""
    started = module_data_workers({silo: data_dir / silo for silo in ONLINE})
    yield started
    support.assert_nothing_left(started)


def _train(broker_url, prefix, data_dir, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli(
        "train",
        "--broker-url", broker_url,
        "--prefix", prefix,
        *[arg for silo in SILOS for arg in ("--silo", silo)],
        "--rounds", "2",
        "--test-set", str(data_dir / digits.TEST_FILE),
        "--out", str(out),
        "--silo-grace", str(GRACE_S),
        "--task-timeout", "120",
        "--log-format", "json",
        *extra,
        cwd=out.parent,
    )  # fmt: skip


def test_rounds_run_without_a_silo_that_never_starts(
    fleet, broker_url, module_prefix, data_dir, tmp_path
):
    out = tmp_path / "out"
    started = time.monotonic()
    done = _train(
        broker_url, module_prefix, data_dir, out, "--min-silos", "2", "--round-timeout", "120"
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-5000:]
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    taken = [(r["silos"], r["dropped"]) for r in rows]
    print(f"\n{done.stdout.strip()}\n{took:.1f} s; rows: {taken}")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    # From the first invocation on: silo-3 has no consumer, so it is left out at once.
    for row in rows:
        assert row["silos"] == "silo-1;silo-2"
        assert row["dropped"] == "silo-3:no-consumer"
    accuracy = [float(r["test_accuracy"]) for r in rows]
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy  # it learned, on two silos
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    rounds = [e for e in events if e.get("event") == "training_round"]
    assert [e["dropped"] for e in rounds] == ["silo-3:no-consumer"] * 2
    # Nothing was ever sent to silo-3: nothing waits in its queue.
    assert all(set(e["bytes_sent_by_silo"]) == set(ONLINE) for e in rounds)
    assert (support.message_count(broker_url, f"{module_prefix}.silo.silo-3") or 0) == 0


def test_min_silos_not_met_is_a_clear_error_not_a_hang(
    fleet, broker_url, module_prefix, data_dir, tmp_path
):
    out = tmp_path / "out"
    started = time.monotonic()
    done = _train(broker_url, module_prefix, data_dir, out, "--min-silos", "3")
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    (message,) = [x for x in done.stderr.splitlines() if x.startswith("flaap-mq train: ")]
    print(f"\n{message}\n{took:.1f} s")
    assert "silo-3" in message and f"no-consumer-{GRACE_S}s" in message
