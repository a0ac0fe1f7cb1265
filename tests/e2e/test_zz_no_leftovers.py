"""After the end-to-end tests before it (by name): none left an executor running.

It checks the executors its own pytest process started: under pytest-xdist
the other workers may still be running theirs. The whole run is checked
once it ends, every worker included (`pytest_sessionfinish`, tests/conftest.py).
"""

import time

from tests.conftest import executors_of_this_process


def test_no_worker_binary_left_behind():
    deadline = time.monotonic() + 15
    leaked = executors_of_this_process()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.5)
        leaked = executors_of_this_process()
    assert leaked == [], f"worker_binary processes left running: {leaked}"
