"""flaap-mq used as a library follows the application's `logging` set-up.

A TFF program that imports flaap_mq and configures `logging` itself must see
flaap-mq's events only as its configuration says: none below WARNING by
default, on the application's handlers (stderr for `basicConfig`), never on
stdout, and none of pika's per-retry lines when the broker cannot be reached.
Each program runs in a subprocess, as a user's would, against the real
broker and one real worker.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from flaap_mq.local.workers import WorkerFleet

REPO = Path(__file__).resolve().parents[2]

# A user's program: its own logging set-up, then three tiny computations.
_PROGRAM = """
import logging

import flaap_mq

logging.basicConfig(level=logging.{level})

import numpy as np
import tensorflow_federated as tff

from flaap_mq import examples


@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def total(values):
    return tff.federated_sum(values)


@tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER))
def broadcast_and_back(value):
    return tff.federated_mean(tff.federated_broadcast(value))


try:
    context = flaap_mq.create_execution_context(
        {url!r}, ["a"], topology_prefix={prefix!r}, task_timeout=120,
        connect_timeout={connect_timeout},
    )
except Exception as e:
    print("NO_CONTEXT", type(e).__name__, flush=True)
    raise SystemExit(3)
with context, tff.framework.get_context_stack().install(context):
    print("RESULT", examples.temperature_average([[1.0, 2.0], [3.0]]), flush=True)
    print("RESULT", total([1, 2, 3]), flush=True)
    print("RESULT", broadcast_and_back(np.float32(2.5)), flush=True)
"""

# Events the coordinator side logs in such a run (INFO and DEBUG); none may
# show at WARNING.
_EVENTS = ("coordinator_connected", "executor_service_started", "task_done", "silo_")
_FROM_US = re.compile(r"flaap_mq|flaap-mq|pika|" + "|".join(_EVENTS))


def _run(level: str, url: str, prefix: str, connect_timeout: float = 30.0) -> tuple[str, str]:
    """Runs the program; returns its stdout and stderr."""
    program = _PROGRAM.format(level=level, url=url, prefix=prefix, connect_timeout=connect_timeout)
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done.stdout, done.stderr


@pytest.fixture(scope="module")
def one_silo(
    module_workers: Callable[..., WorkerFleet], broker_url: str, module_prefix: str
) -> tuple[str, str]:
    """One real worker for silo "a", shared by this module's programs."""
    module_workers(["a"])
    return broker_url, module_prefix


def _results(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    assert all(line.startswith("RESULT ") for line in lines), stdout
    return [line.split(" ", 1)[1] for line in lines]


def test_warning_level_prints_nothing_from_flaap_mq(one_silo: tuple[str, str]) -> None:
    stdout, stderr = _run("WARNING", *one_silo)
    assert _results(stdout) == ["2.25", "6", "2.5"], stderr[-3000:]
    ours = [line for line in stderr.splitlines() if _FROM_US.search(line)]
    assert ours == [], stderr[-3000:]


def test_info_level_shows_the_events_on_stderr_only(one_silo: tuple[str, str]) -> None:
    stdout, stderr = _run("INFO", *one_silo)
    assert _results(stdout) == ["2.25", "6", "2.5"], stderr[-3000:]
    assert "INFO:flaap_mq.coordinator:coordinator_connected " in stderr, stderr[-3000:]
    assert "INFO:flaap_mq.executor:executor_service_started " in stderr, stderr[-3000:]
    # INFO, not DEBUG: the per-task events stay off.
    assert "task_done" not in stderr
    assert not re.search(r"^\w+:pika", stderr, re.M), stderr[-3000:]


def test_unreachable_broker_prints_no_pika_lines() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, closed again
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    stdout, stderr = _run("WARNING", url, "unused", connect_timeout=5)
    assert stdout.startswith("NO_CONTEXT "), (stdout, stderr[-3000:])
    pika_lines = [line for line in (stdout + stderr).splitlines() if "pika" in line]
    assert pika_lines == [], stderr[-3000:]
