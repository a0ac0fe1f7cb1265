"""Runs last (by name): no executor from this run is still running."""

import time

from tests.conftest import executors_of_this_run


def test_no_worker_binary_left_behind():
    deadline = time.monotonic() + 15
    leaked = executors_of_this_run()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.5)
        leaked = executors_of_this_run()
    assert leaked == [], f"worker_binary processes left running: {leaked}"
