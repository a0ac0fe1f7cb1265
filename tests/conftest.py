"""Shared fixtures: a real broker, a fresh topology per test, real worker processes.

The broker is, in order: `FLAAP_MQ_BROKER_URL` if set; the local broker at
127.0.0.1:5672 if it answers; a testcontainers broker where Docker works;
a private `rabbitmq-server` node. Each test gets its own topology prefix, so
tests never see each other's queues, and its queues are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psutil
import pytest

from flaap_mq import cli, logs
from flaap_mq.broker import declare
from flaap_mq.broker.credentials import DEFAULT_BROKER_URL
from flaap_mq.data.fleet import SiloDataFleet
from flaap_mq.executor.service import remove_stale_socket_dirs
from flaap_mq.local.broker import throwaway_broker
from flaap_mq.local.workers import WorkerFleet, all_executor_processes
from flaap_mq.protocol import topology
from flaap_mq.training import cli as training_cli

logs.quiet_tensorflow()
logs.configure("console", "warning")


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    preferred = os.environ.get("FLAAP_MQ_BROKER_URL", DEFAULT_BROKER_URL)
    try:
        with throwaway_broker(preferred) as (url, description):
            print(f"\nflaap-mq tests use the {description}")
            yield url
    except Exception as e:  # no broker of any kind: say why, do not fail obscurely
        pytest.skip(f"no RabbitMQ broker could be had: {e}")


# Every process this run starts inherits this marker, so the leak checks below
# find exactly our executors, however they were started and whoever their
# parent is now, and never another run's. Executors start with a minimal
# environment (flaap_mq.executor.environment): FLAAP_MQ_EXECUTOR_ENV lets the
# marker through, as an operator would pass a variable of their own.
# `make test` runs the suite in pytest-xdist workers: the controller (or a run
# without xdist) draws the run's id, each worker inherits it and adds its own
# name, so a worker can check its own executors while the others' still run,
# and the controller checks the whole run once every worker has finished.
_RUN_VARIABLE = "FLAAP_TEST_RUN"
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in xdist's workers only
_STARTED = time.time()  # when this process began (the controller's: the run's start)
if _XDIST_WORKER is None:
    os.environ[_RUN_VARIABLE] = uuid.uuid4().hex
RUN_ID = os.environ[_RUN_VARIABLE].split("/")[0]
PROCESS_MARKER = f"{RUN_ID}/{_XDIST_WORKER or 'main'}"
os.environ[_RUN_VARIABLE] = PROCESS_MARKER
os.environ["FLAAP_MQ_EXECUTOR_ENV"] = _RUN_VARIABLE


def _executors_marked(matches: Callable[[str], bool]) -> list[int]:
    found = []
    for process in all_executor_processes():
        try:
            if matches(process.environ().get(_RUN_VARIABLE, "")):
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def executors_of_this_process() -> list[int]:
    """Executors started by this pytest process (one xdist worker, or the whole run)."""
    return _executors_marked(lambda marker: marker == PROCESS_MARKER)


def executors_of_this_run() -> list[int]:
    """Executors started by any process of this run, every xdist worker included."""
    return _executors_marked(lambda marker: marker.startswith(f"{RUN_ID}/"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run if any test left a TFF `worker_binary` or its sandbox running.

    Checked where the run ends: an xdist worker's exit status does not reach the
    controller, so the controller checks every worker's executors after all of them.
    """
    if _XDIST_WORKER is not None:
        return
    _remove_autograph_files(since=_STARTED)
    deadline = time.monotonic() + 15  # a stopped worker's executor may take a moment
    leaked = executors_of_this_run()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.5)
        leaked = executors_of_this_run()
    if leaked:
        print(f"\nFAILED: executor processes left running by this run: {leaked}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    # The socket directories of sandboxes whose workers the tests killed (a
    # start removes its predecessors' after a minute; nothing starts after this).
    remove_stale_socket_dirs(min_age_s=1.0)


def _remove_autograph_files(since: float) -> None:
    """Deletes the code TensorFlow's autograph wrote to the temporary directory
    since `since`, and its bytecode caches: TensorFlow leaves them behind (a
    process that exits without its atexit handlers, the caches always). Run
    where the run ends, once every process of it is done with them."""
    tmp = Path(tempfile.gettempdir())
    for path in [
        *tmp.glob("__autograph_generated_file*.py"),
        *(tmp / "__pycache__").glob("__autograph_generated_file*.pyc"),
    ]:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime >= since:
                path.unlink()


# The modules that take longest, longest first (about 3.5 to 0.5 minutes
# each here, most of it waiting or training). `make test`'s pytest-xdist
# workers take a module at a time in collection order (with
# --no-loadscope-reorder; by default xdist orders by test count, which put
# these last and left one worker on a training run alone at the end). Other
# modules keep their order after these; a module missing here is only
# scheduled later.
_LONGEST_FIRST = (
    "tests/e2e/test_training_resume.py",
    "tests/e2e/test_training_dropout.py",
    "tests/e2e/test_training.py",
    "tests/integration/test_broker_loss.py",
    "tests/faults/test_deadlines.py",
    "tests/integration/test_data_stays_home.py",
    "tests/e2e/test_round.py",
    "tests/integration/test_worker_protocol.py",
    "tests/integration/test_library_logging.py",
    "tests/faults/test_poison.py",
    "tests/e2e/test_silo_dropout.py",
    "tests/e2e/test_demo.py",
    "tests/e2e/test_worker_shutdown.py",
    "tests/security/test_permissions.py",
    "tests/integration/test_private_broker.py",
    "tests/integration/test_readme_example.py",
    "tests/faults/test_broker_restart.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {module: i for i, module in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Nothing more is written to bytecode caches once the tests are collected.

    `make test` lets the collection write them (the test modules, rewritten,
    and flaap_mq's): that is what spares each pytest process recompiling
    them. What is imported later includes TensorFlow's autograph code, which
    it writes to /tmp, one file per traced function: cached, it left
    thousands of files in /tmp/__pycache__ per run, here and in the
    processes the tests start.
    """
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"


@pytest.fixture(scope="session")
def digits_split(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """`flaap-mq data split-digits --silos N`, once per N.

    The silos' data directories and the test set, shared read-only by every
    test that trains on digits (`split(N) / "silo-1"`, `split(N) / digits.TEST_FILE`).
    The command's own arguments and code, run in this process, which has
    TensorFlow loaded already: a subprocess spent 4 CPU-seconds loading it
    again, in each of the three modules that train.
    """
    made: dict[int, Path] = {}

    def split(silos: int) -> Path:
        if silos not in made:
            out = tmp_path_factory.mktemp(f"digits-{silos}") / "digits"
            args = cli.build_parser().parse_args(
                ["data", "split-digits", "--silos", str(silos), "--out", str(out)]
            )
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert training_cli.run_split_digits(args) == 0
            for i in range(1, silos + 1):
                assert f"--data-dir {out}/silo-{i}" in printed.getvalue(), printed.getvalue()
            made[silos] = out
        return made[silos]

    return split


@pytest.fixture
def prefix(broker_url: str) -> Iterator[str]:
    """A topology prefix of this test's own; its queues are deleted afterwards."""
    value = f"t{uuid.uuid4().hex[:10]}"
    yield value
    delete_topology(broker_url, value)


def delete_topology(broker_url: str, prefix: str) -> None:
    """Every queue of `prefix` on the node, and its exchanges."""
    declare.delete_topology(broker_url, topology.Names(prefix), queues=list_queues(prefix))


def list_queues(prefix: str) -> list[str]:
    """Queue names starting with `prefix.` on the local node (via rabbitmqctl)."""
    import subprocess

    try:
        out = subprocess.run(
            ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []  # a broker elsewhere: its queues expire or stay; nothing to do here
    return [line.strip() for line in out.splitlines() if line.strip().startswith(f"{prefix}.")]


def _fleet_factory(broker_url: str, prefix: str, log_dir: Path):
    fleets: list[WorkerFleet] = []

    def start(silo_ids: list[str], **kwargs: object) -> WorkerFleet:
        fleet = WorkerFleet(broker_url, silo_ids, prefix=prefix, log_dir=log_dir, **kwargs)
        fleets.append(fleet)
        return fleet.start()

    return start, fleets


@pytest.fixture
def workers(broker_url: str, prefix: str, tmp_path: Path) -> Iterator[Callable[..., WorkerFleet]]:
    """Starts real `flaap-mq worker` processes; all are stopped after the test."""
    start, fleets = _fleet_factory(broker_url, prefix, tmp_path)
    yield start
    for fleet in fleets:
        fleet.close()


@pytest.fixture(scope="module")
def module_prefix(broker_url: str) -> Iterator[str]:
    """Like `prefix`, shared by the tests of one module."""
    value = f"m{uuid.uuid4().hex[:10]}"
    yield value
    delete_topology(broker_url, value)


@pytest.fixture(scope="module")
def module_data_workers(
    broker_url: str, module_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[Mapping[str, Path]], SiloDataFleet]]:
    """Starts a worker per silo, each serving its own data directory (`--data-dir`),
    shared by the tests of one module; stopped at the module's end."""
    fleets: list[SiloDataFleet] = []

    def start(data_dirs: Mapping[str, Path]) -> SiloDataFleet:
        fleet = SiloDataFleet(
            broker_url,
            data_dirs,
            prefix=module_prefix,
            log_dir=tmp_path_factory.mktemp("data-workers"),
        )
        fleets.append(fleet)
        return fleet.start()

    yield start
    for fleet in fleets:
        fleet.close()


@pytest.fixture(scope="module")
def module_workers(
    broker_url: str, module_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkerFleet]]:
    """Like `workers`, for workers shared by the tests of one module (they start slowly)."""
    start, fleets = _fleet_factory(broker_url, module_prefix, tmp_path_factory.mktemp("workers"))
    yield start
    for fleet in fleets:
        fleet.close()
