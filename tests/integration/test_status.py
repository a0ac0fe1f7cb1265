"""`flaap-mq status` against a private broker node with the management API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pika
import portpicker
import pytest

from flaap_mq.broker.declare import declare_blocking
from flaap_mq.local.private_node import PrivateBrokerNode
from flaap_mq.local.workers import WorkerProcess
from flaap_mq.protocol import topology

pytestmark = pytest.mark.broker_node


@pytest.fixture(scope="module")
def node():
    port = portpicker.pick_unused_port()
    with PrivateBrokerNode(
        plugins=["rabbitmq_management"],
        rabbitmq_conf=f"management.tcp.port = {port}\nmanagement.tcp.ip = 127.0.0.1\n",
    ) as broker:
        broker.management_url = f"http://127.0.0.1:{port}"
        yield broker


def _status(node, *silos: str, json_output: bool = True, prefix: str = "st") -> tuple[int, str]:
    args = [
        sys.executable,
        "-m",
        "flaap_mq.cli",
        "status",
        "--broker-url",
        node.url,
        "--prefix",
        prefix,
        "--management-url",
        node.management_url,
    ]
    for silo in silos:
        args += ["--silo", silo]
    if json_output:
        args.append("--json")
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=os.environ)
    return done.returncode, done.stdout + done.stderr


def _wait_for(predicate, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_status_shows_active_and_standby_workers_offline_silos_and_dead_letters(node, tmp_path):
    workers = [
        WorkerProcess(node.url, "a", prefix="st", log_path=tmp_path / f"a{i}.log") for i in range(2)
    ]
    try:
        _wait_for(lambda: all('"worker_standby"' in w.log_text() for w in workers))
        # A dead letter: a malformed task, which the worker rejects (reason in its log).
        connection = pika.BlockingConnection(pika.URLParameters(node.url))
        channel = connection.channel()
        declare_blocking(channel, topology.silo_declarations(topology.Names("st"), ["offline"]))
        channel.basic_publish("st.tasks", "a", b"garbage", pika.BasicProperties(delivery_mode=2))
        connection.close()
        _wait_for(lambda: '"task_dead_lettered"' in "".join(w.log_text() for w in workers))
        logged = [
            line
            for w in workers
            for line in w.log_text().splitlines()
            if "task_dead_lettered" in line
        ]
        assert len(logged) == 1 and '"reason": "malformed: ' in logged[0], logged

        def consumers_listed() -> bool:
            code, out = _status(node, "a")
            return code == 0 and len(json.loads(out)["silos"][0]["workers"]) == 2

        _wait_for(consumers_listed, 30)  # the management API's statistics lag a few seconds
        code, out = _status(node, "a", "offline")
        assert code == 1, out  # a named silo is offline
        report = json.loads(out)
        a, offline = report["silos"]
        assert a["online"] and not offline["online"]
        assert report["offline"] == ["offline"]
        assert sorted(w["active"] for w in a["workers"]) == [False, True]
        assert report["dead_letter_depth"] == 1
        # The broker's reason (x-death): the worker rejected it.
        assert report["dead_letter_reasons"] == [["rejected", 1]]
        code, text = _status(node, "a", json_output=False)
        assert code == 0
        assert "active" in text and "standby" in text and "rejected x1" in text
        # Sampling the reasons did not take the dead letter away.
        assert json.loads(_status(node, "a")[1])["dead_letter_depth"] == 1
    finally:
        for worker in workers:
            worker.stop()


def test_status_with_no_silo_named_lists_every_silo_queue_under_the_prefix(node):
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    names = topology.Names("listed")
    declare_blocking(
        connection.channel(),
        topology.shared_declarations(names) + topology.silo_declarations(names, ["x", "y-2"]),
    )
    connection.close()
    code, out = _status(node, prefix="listed")
    report = json.loads(out)
    # Only this prefix's silo queues (not "st"'s, not the dead-letter queue).
    assert [s["silo_id"] for s in report["silos"]] == ["x", "y-2"]
    assert report["offline"] == ["x", "y-2"] and code == 1
    assert report["notes"] == []


def test_status_marks_a_worker_run_with_executor_network_host(node, tmp_path):
    sealed = WorkerProcess(node.url, "s", prefix="en", log_path=tmp_path / "sealed.log")
    exposed = WorkerProcess(
        node.url,
        "s",
        prefix="en",
        extra_args=["--executor-network", "host"],
        log_path=tmp_path / "exposed.log",
    )
    try:

        def workers_listed() -> list[dict]:
            _, out = _status(node, "s", prefix="en")  # exit 1 while the silo is offline
            return json.loads(out)["silos"][0]["workers"]

        _wait_for(lambda: len(workers_listed()) == 2)  # the API's statistics lag
        assert sorted(w["executor_network"] for w in workers_listed()) == ["host", "sandbox"]
        code, text = _status(node, "s", prefix="en", json_output=False)
        assert code == 0, text
        assert "INSECURE: its executor listens on the network" in text
        assert text.count("INSECURE") == 1
    finally:
        sealed.stop()
        exposed.stop()
