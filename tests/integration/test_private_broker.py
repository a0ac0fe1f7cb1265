"""A private rabbitmq-server node really boots, keeps persistent messages across a restart,
and leaves no Erlang VM behind, on success and when its boot fails."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pika
import psutil
import pytest

from flaap_mq.local.broker import broker_answers
from flaap_mq.local.private_node import PrivateBrokerNode

_REPOSITORY = Path(__file__).resolve().parents[2]
QUEUE = "flaap-durability-check"
BODY = b"survives a broker restart"


def _beam_processes_for(node_name: str) -> list[psutil.Process]:
    """beam.smp processes belonging to ``node_name``, found independently of the module.

    RabbitMQ 3.10 does not put the node name on beam.smp's command line, so look in the
    environment too (that is where the node was told its name).
    """
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.name() != "beam.smp":
                continue
            if proc.environ().get("RABBITMQ_NODENAME") == node_name or node_name in " ".join(
                proc.cmdline()
            ):
                found.append(proc)
        except psutil.Error:  # exited meanwhile, or a zombie
            continue
    return found


def _connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.socket_timeout = params.stack_timeout = 10
    params.blocked_connection_timeout = 10
    return pika.BlockingConnection(params)


@pytest.mark.broker_node
def test_persistent_message_survives_restart_and_stop_leaves_no_vm() -> None:
    with PrivateBrokerNode() as node:
        assert node.url == f"amqp://guest:guest@localhost:{node.port}/"
        assert node.port != 5672
        assert _beam_processes_for(node.node_name)
        assert broker_answers(node.url)

        with _connect(node.url) as connection:
            channel = connection.channel()
            channel.confirm_delivery()  # the publish returns once the broker has it on disk
            channel.queue_declare(QUEUE, durable=True)
            channel.basic_publish(
                exchange="",
                routing_key=QUEUE,
                body=BODY,
                properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
                mandatory=True,
            )

        port, data_dir = node.port, node.data_dir
        node.restart()
        assert (node.port, node.data_dir) == (port, data_dir)
        print(
            f"private node: start {node.last_start_seconds:.1f} s after a stop of "
            f"{node.last_stop_seconds:.1f} s"
        )

        with _connect(node.url) as connection:
            method, properties, body = connection.channel().basic_get(QUEUE, auto_ack=True)
        assert method is not None, "the persistent message did not survive the restart"
        assert body == BODY
        assert properties.delivery_mode == pika.DeliveryMode.Persistent.value

        node.stop()
        assert not _beam_processes_for(node.node_name)
        assert not broker_answers(node.url)
    assert not data_dir.exists()


@pytest.mark.broker_node
def test_failed_boot_raises_with_log_and_leaves_no_vm() -> None:
    # Hold a port and ask the node to listen on it too: the node crashes while booting.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        node = PrivateBrokerNode(rabbitmq_conf=f"listeners.tcp.other = 127.0.0.1:{busy_port}\n")
        began = time.monotonic()
        with pytest.raises(RuntimeError, match="could_not_start_listener") as excinfo, node:
            pytest.fail("the node should not have started")
    # It noticed the crash instead of waiting out the whole start timeout.
    assert time.monotonic() - began < 45
    assert node.node_name in str(excinfo.value)
    assert not _beam_processes_for(node.node_name)


def test_a_distribution_port_taken_after_it_was_picked_is_picked_again(monkeypatch) -> None:
    """Another process binds the node's distribution port between its pick and the
    boot (xdist workers pick ports at once): the VM dies before it logs anything,
    and the node starts again on another port, once; twice, and the error says why."""
    import flaap_mq.local.private_node as private_node

    real_pick = private_node.portpicker.pick_unused_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        picks = iter([real_pick(), busy_port])  # the AMQP port, then the distribution port
        monkeypatch.setattr(
            private_node.portpicker, "pick_unused_port", lambda: next(picks, None) or real_pick()
        )
        with PrivateBrokerNode() as node:
            assert node.dist_port != busy_port
            assert broker_answers(node.url)

        picks = iter([real_pick(), busy_port, busy_port])  # taken again on the second try
        node = PrivateBrokerNode()
        with pytest.raises(RuntimeError) as excinfo, node:
            pytest.fail("the node should not have started")
    message = str(excinfo.value)
    assert "exited while booting" in message
    assert f"distribution port {busy_port}: taken by another process" in message
    assert not _beam_processes_for(node.node_name)


_OWNER = """
import sys, time
from flaap_mq.local.private_node import PrivateBrokerNode
node = PrivateBrokerNode()
node.start()
print(node.node_name, node.data_dir, flush=True)
time.sleep(600)
"""


def test_a_node_whose_owner_is_killed_is_stopped_with_its_data() -> None:
    """The node runs detached: without its reaper it outlived a killed test process."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True, cwd=_REPOSITORY
    )
    try:
        node_name, data_dir = owner.stdout.readline().split()
        assert _beam_processes_for(node_name), "the node did not start"
    finally:
        owner.kill()  # as an out-of-memory kill or a crashed xdist worker would
        owner.wait(10)
        owner.stdout.close()
    deadline = time.monotonic() + 30
    while _beam_processes_for(node_name) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _beam_processes_for(node_name), "the node outlived its owner"
    while Path(data_dir).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(data_dir).exists()
