"""The local worker fleet (flaap_mq.local) used by the demo, benchmarks and tests: it
never leaves a worker running that nothing will stop."""

from __future__ import annotations

import pytest

from flaap_mq.local.workers import WorkerFleet


def test_a_fleet_started_then_entered_starts_its_workers_once(broker_url, prefix, tmp_path):
    fleet = WorkerFleet(broker_url, ["a"], prefix=prefix, log_dir=tmp_path).start()
    first = fleet.workers["a"]
    with fleet as entered:  # as `with WorkerFleet(...).start() as fleet:` reads
        assert entered.workers["a"] is first
        with pytest.raises(RuntimeError, match="already has a running worker"):
            fleet.start_worker("a")
        assert fleet.workers["a"] is first
    assert first.process.poll() is not None  # stopped by the `with`
    restarted = fleet.start_worker("a")  # a stopped worker may be started again
    try:
        assert restarted is not first
    finally:
        fleet.close()
    assert restarted.process.poll() is not None
