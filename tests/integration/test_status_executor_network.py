"""`flaap-mq status` shows a worker whose executor listens on the network (management API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import portpicker
import pytest

from flaap_mq.testing.broker import PrivateBrokerNode
from flaap_mq.testing.workers import WorkerProcess

pytestmark = pytest.mark.broker_node


def _status(node: PrivateBrokerNode, management_url: str, silo: str) -> dict:
    args = [sys.executable, "-m", "flaap_mq.cli", "status", "--broker-url", node.url]
    args += ["--prefix", "en", "--management-url", management_url, "--silo", silo, "--json"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: the silo is offline
    return json.loads(done.stdout)


def test_status_marks_a_worker_run_with_executor_network_host(tmp_path):
    port = portpicker.pick_unused_port()
    with PrivateBrokerNode(
        plugins=["rabbitmq_management"],
        rabbitmq_conf=f"management.tcp.port = {port}\nmanagement.tcp.ip = 127.0.0.1\n",
    ) as node:
        management_url = f"http://127.0.0.1:{port}"
        sealed = WorkerProcess(node.url, "s", prefix="en", log_path=tmp_path / "sealed.log")
        exposed = WorkerProcess(
            node.url,
            "s",
            prefix="en",
            extra_args=["--executor-network", "host"],
            log_path=tmp_path / "exposed.log",
        )
        try:
            deadline = time.monotonic() + 90
            workers: list[dict] = []
            while len(workers) < 2:  # the management API's statistics lag a few seconds
                assert time.monotonic() < deadline, f"workers never listed: {workers}"
                time.sleep(0.5)
                workers = _status(node, management_url, "s")["silos"][0]["workers"]
            assert sorted(w["executor_network"] for w in workers) == ["host", "sandbox"]
            text = subprocess.run(
                [
                    *(sys.executable, "-m", "flaap_mq.cli", "status", "--broker-url", node.url),
                    *("--prefix", "en", "--management-url", management_url, "--silo", "s"),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env=os.environ,
            ).stdout
            assert "INSECURE: its executor listens on the network" in text
            assert text.count("INSECURE") == 1
        finally:
            sealed.stop()
            exposed.stop()
