"""`flaap-mq topology` declares the topology and shows what exists."""

from __future__ import annotations

import time

import pika

from flaap_mq.broker.declare import declare_blocking
from flaap_mq.protocol import topology
from flaap_mq.testing.cli import run_cli


def test_topology_command_declares_and_lists_queues(broker_url, prefix):
    done = run_cli(
        "topology", "--broker-url", broker_url, "--prefix", prefix, "--silo", "a", "--silo", "b"
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for name in (
        f"{prefix}.silo.a",
        f"{prefix}.silo.b",
        f"{prefix}.dead-letter",
        f"{prefix}.tasks",
        f"{prefix}.replies",
    ):
        assert name in out
    assert "guest:guest" not in out + done.stderr
    # Declared as the code declares them: an identical declaration is accepted.
    names = topology.Names(prefix)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        declare_blocking(
            connection.channel(),
            topology.shared_declarations(names) + topology.silo_declarations(names, ["a", "b"]),
        )
        channel = connection.channel()
        channel.confirm_delivery()
        # A task for a silo whose worker never started waits in its queue.
        channel.basic_publish(names.tasks_exchange, "a", b"x", mandatory=True)
        # A quorum queue's reported depth can lag the publish: poll briefly.
        deadline = time.monotonic() + 10
        depth = 0
        while depth != 1 and time.monotonic() < deadline:
            depth = channel.queue_declare(names.silo_queue("a"), passive=True).method.message_count
            time.sleep(0.1)
        assert depth == 1
    finally:
        connection.close()


def test_topology_command_rejects_a_bad_silo_id_in_one_line(broker_url):
    done = run_cli("topology", "--broker-url", broker_url, "--silo", "a b")
    assert done.returncode != 0
    assert "silo id 'a b'" in done.stderr
    assert "Traceback" not in done.stderr
