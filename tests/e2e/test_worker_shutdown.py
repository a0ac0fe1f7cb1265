"""SIGTERM: the worker stops consuming, finishes what is in flight, exits 0."""

from __future__ import annotations

import threading
import time

import tensorflow_federated as tff

import flaap_mq
from flaap_mq.testing.workers import WorkerProcess
from tests.e2e.test_standby import _events, _timestamp, slow_total


def test_sigterm_finishes_the_task_in_flight_then_exits_0(broker_url, prefix, tmp_path):
    worker = WorkerProcess(broker_url, "s", prefix=prefix, log_path=tmp_path / "w.log")
    try:
        deadline = time.monotonic() + 120
        while not _events(worker, "worker_standby"):
            assert worker.process.poll() is None, worker.log_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with flaap_mq.create_execution_context(
            broker_url, ["s"], topology_prefix=prefix, task_timeout=30, max_attempts=1
        ) as context:
            errors: list[BaseException] = []

            def run_round() -> None:
                with tff.framework.get_context_stack().install(context):
                    try:
                        slow_total([[1.0] * 6, [2.0] * 6])  # 6 x 0.3 s per client
                    except BaseException as e:
                        errors.append(e)  # expected: nobody serves the rest

            thread = threading.Thread(target=run_round, daemon=True)
            thread.start()
            # GetExecutor and CreateValues are quick; the slow CreateCall
            # comes next: SIGTERM while it runs.
            while len(_events(worker, "task")) < 3:
                assert time.monotonic() < deadline, "the round did not start"
                time.sleep(0.05)
            time.sleep(0.3)
            signalled_at = time.time()
            code = worker.stop(grace_s=60)
            thread.join(60)
    finally:
        worker.stop()
    assert code == 0, worker.log_text()[-3000:]
    stopped = _events(worker, "worker_stopped")
    assert stopped, "the worker did not log its orderly stop"
    tasks = _events(worker, "task")
    assert all(t["outcome"] != "error" for t in tasks), tasks
    assert "drain_timed_out" not in worker.log_text()
    # Every task it took was answered before it left, including the one
    # running when the signal came.
    assert stopped[0]["tasks_handled"] == len(tasks)
    finished_after_signal = [t for t in tasks if _timestamp(t) > signalled_at]
    assert finished_after_signal, "no task was in flight at SIGTERM: the test did not test it"
    assert all(t["outcome"] == "ok" for t in finished_after_signal)
