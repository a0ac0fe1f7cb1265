"""A silo flooding replies cannot raise the broker's memory or disk alarm for everyone.

An alarm blocks every publisher on the node: one silo could stop every
federation on the broker. This boots its own node (the deploy configuration,
TLS, the generated definitions with their policies and limits) with the
alarms close: a memory high watermark 3 GiB above what the idle node uses,
and a free-disk limit 2 GiB below what is free on a 4 GiB tmpfs of its own
(or on /tmp, where no tmpfs can be mounted). Silo `a` then publishes 1 MiB
replies into a coordinator's reply queue that nobody consumes, as fast as
it can, over as many connections as its user limit allows, without waiting
for confirms. Then:

* no alarm fired; the queue holds its policy's bound plus at most one
  burst (a quorum queue learns it is full only once its Raft log has
  applied the bytes over the bound: what the flooder's channels held by
  then gets in, at most 96 messages each under the deploy configuration's
  flow credit), and once full it stays full: a second flood adds nothing,
  and the flooder's confirmed publishes are nacked;
* the coordinator still publishes tasks and consumes its replies, and once
  it has drained the queue, the silo's replies are taken again;
* the same flood into a queue that no policy bounds does raise the alarm
  (the control: the limits are near enough for the flood to matter).

Measured figures are printed (`-s`) as `FLOOD {...}`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import portpicker
import psutil
import pytest

from flaap_mq.admin import definitions
from flaap_mq.broker.address import BrokerAddress
from flaap_mq.broker.declare import declare_blocking
from flaap_mq.local.private_node import PrivateBrokerNode
from flaap_mq.protocol import topology
from tests.security.conftest import (
    COORDINATOR,
    DEPLOY_ADVANCED_CONFIG,
    PREFIX,
    VHOST,
    SecureBroker,
    _make_tls_files,
    _wait_for_login,
    deploy_conf_for,
    generate_definitions,
)

# serial: a flood is measured against a broker node's memory and disk and must
# reach its alarm within seconds; beside other tests it may not (make test runs
# serial tests alone, before the rest).
pytestmark = [pytest.mark.broker_node, pytest.mark.serial]

NAMES = topology.Names(PREFIX)
MIB = 1024 * 1024
FLOOD_MESSAGES = 4000  # 1 MiB each: 31 times the reply queue's bound, more than the headroom
FLOOD_SECONDS = 25.0
MEMORY_HEADROOM = 3072 * MIB  # watermark = idle node + this
# Disk limit = free space - this, on the node's own tmpfs or (where none can
# be mounted) on the shared /tmp. Room for the bounded queue, one burst over
# it and the quorum WAL (64 MiB here): what a broker must have free for a
# flood to pass without an alarm (docs/security.md).
DISK_HEADROOM = 2048 * MIB
FLOODER = "a"
CONTROL_FLOODER = "b"
ALARM_SET = "resource limit alarm set"
# A flooder caught mid-write by the alarm's block gives up after this: it is
# done flooding, and the control test waited 30 s for it when this was 30.
BLOCKED_TIMEOUT_S = 5
# The most a flooding channel gets into a quorum queue past its bound. The
# queue tells its publishers it is full only once its Raft log has applied
# the bytes over the bound. By then a channel may have up to
# QUORUM_PENDING_LIMIT enqueues pending (RabbitMQ's quorum_commands_soft_limit:
# past it the channel stops taking from its connection's reader) plus what
# the reader had already handed it (FLOW_CREDIT, deploy/rabbitmq/
# advanced.config), and, should notices of applied enqueues let it take from
# its reader again before the "full" notice arrives, one more FLOW_CREDIT.
FLOW_CREDIT = 32
QUORUM_PENDING_LIMIT = 32
BURST_PER_CHANNEL = QUORUM_PENDING_LIMIT + 2 * FLOW_CREDIT


@contextlib.contextmanager
def _small_disk() -> Iterator[Path | None]:
    """A 4 GiB tmpfs for the node's data, or None where mounting is not allowed."""
    mountpoint = Path(tempfile.mkdtemp(prefix="flaap-flood-disk-", dir="/tmp"))
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4g,mode=0755", "tmpfs", str(mountpoint)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield mountpoint if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=False)
        mountpoint.rmdir()


@dataclasses.dataclass
class FloodNode:
    broker: SecureBroker
    beam: psutil.Process
    idle_rss: int
    watermark: int
    disk: Path | None  # the node's own tmpfs, if one could be mounted
    disk_limit: int


@pytest.fixture(scope="module")
def flood_node() -> Iterator[FloodNode]:
    if shutil.which("rabbitmq-server", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        pytest.skip("rabbitmq-server (Debian's package) is not installed: no private node")
    tls = _make_tls_files()
    tls_port = portpicker.pick_unused_port()
    secrets_dir = tls.directory / "secrets"
    document = tls.directory / "definitions.json"
    generate_definitions(secrets_dir, document)
    # A small quorum WAL, or its default 512 MiB would fill the small disk.
    conf = deploy_conf_for(tls, tls_port) + "raft.wal_max_size_bytes = 67108864\n"
    with _small_disk() as disk:
        node = PrivateBrokerNode(
            rabbitmq_conf=conf,
            advanced_config=DEPLOY_ADVANCED_CONFIG.read_text(),
            parent_dir=disk or "/tmp",
        )
        try:
            node.start()
            credit = node.rabbitmqctl(
                "eval", "application:get_env(rabbit, credit_flow_default_credit)."
            )
            assert credit.strip() == f"{{ok,{{{FLOW_CREDIT},16}}}}", credit
            node.rabbitmqctl("import_definitions", str(document))
            broker = SecureBroker(node, tls_port, tls, secrets_dir, document)
            _wait_for_login(broker, COORDINATOR)
            node.rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
            beam = next(p for p in node.os_processes() if p.name() == "beam.smp")
            idle_rss = beam.memory_info().rss
            watermark = idle_rss + MEMORY_HEADROOM
            node.rabbitmqctl("set_vm_memory_high_watermark", "absolute", str(watermark))
            free = shutil.disk_usage(node.data_dir).free
            disk_limit = free - DISK_HEADROOM
            node.rabbitmqctl("set_disk_free_limit", str(disk_limit))
            yield FloodNode(broker, beam, idle_rss, watermark, disk, disk_limit)
        finally:
            node.close()
            shutil.rmtree(tls.directory, ignore_errors=True)


def _connect(broker: SecureBroker, user: str) -> pika.BlockingConnection:
    params = BrokerAddress(broker.url(user)).parameters()
    params.blocked_connection_timeout = BLOCKED_TIMEOUT_S  # a flooder blocked by an alarm gives up
    return pika.BlockingConnection(params)


@dataclasses.dataclass
class Flood:
    # Still open: the caller closes them. (RabbitMQ 3.10 counts a TLS
    # connection its client closed for 30 s more, so the user could not
    # open another at once.)
    connections: list[pika.BlockingConnection]
    channels: list  # the flooder's channels, one per connection, still open
    messages: int
    seconds: float
    blocked_after_s: float | None
    peak_rss: int

    @property
    def mib_per_s(self) -> float:
        return self.messages / self.seconds


def _flood(node: FloodNode, silo: str, routing_key: str) -> Flood:
    """`silo` publishes 1 MiB replies to `routing_key` as fast as it can, bounded.

    Over as many connections as its user limit allows, one thread each,
    without confirms: a flooder does not wait.
    """
    connections = [
        _connect(node.broker, silo) for _ in range(definitions.Bounds().silo_max_connections)
    ]
    blocked: list[float] = []
    body = os.urandom(MIB)
    properties = pika.BasicProperties(delivery_mode=2, user_id=silo, correlation_id="flood")
    sent = [0]
    lock = threading.Lock()
    failures: list[BaseException] = []
    started = time.monotonic()

    channels = []

    def publish(connection: pika.BlockingConnection) -> None:
        connection.add_on_connection_blocked_callback(lambda *_: blocked.append(time.monotonic()))
        channel = connection.channel()
        with lock:
            channels.append(channel)
        mine = 0
        try:
            while not blocked and time.monotonic() - started < FLOOD_SECONDS:
                with lock:
                    if sent[0] >= FLOOD_MESSAGES:
                        break
                    sent[0] += 1
                channel.basic_publish(NAMES.replies_exchange, routing_key, body, properties)
                mine += 1
                if mine % 16 == 0:  # this connection's events: Connection.Blocked among them
                    connection.process_data_events(0)
            connection.process_data_events(0.5)
        except pika.exceptions.ConnectionBlockedTimeout:
            # Only a broker that blocked this connection (an alarm) gets here,
            # its Blocked frame not read yet while a publish waited to be written.
            blocked.append(time.monotonic() - BLOCKED_TIMEOUT_S)
        except pika.exceptions.AMQPError as e:
            failures.append(e)

    peak = [node.beam.memory_info().rss]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], node.beam.memory_info().rss)

    threads = [threading.Thread(target=sample, daemon=True)] + [
        threading.Thread(target=publish, args=(c,), daemon=True) for c in connections
    ]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join()
    elapsed = time.monotonic() - started
    sampling.set()
    threads[0].join()
    assert not failures or blocked, f"the flood failed, not because of an alarm: {failures}"
    return Flood(
        connections,
        channels,
        sent[0],
        elapsed,
        min(blocked) - started if blocked else None,
        peak[0],
    )


def _alarm_lines(node: FloodNode) -> list[str]:
    log = node.broker.node.log_file.read_text(errors="replace")
    return [line for line in log.splitlines() if ALARM_SET in line]


def _queue_bytes(node: FloodNode, queue: str) -> tuple[int, int]:
    """(messages, bytes of message bodies) in the quorum queue `queue`, as the broker counts them.

    `rabbitmqctl list_queues message_bytes` is empty for quorum queues (3.10):
    the count comes from the queue's own Raft state (`rabbit_fifo:overview/1`).
    """
    expr = (
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"{VHOST}">>, queue, <<"{queue}">>)), '
        "{RaName, _} = amqqueue:get_pid(Q), "
        "{ok, {_, O}, _} = ra:local_query({RaName, node()}, fun rabbit_fifo:overview/1), "
        'io:format("~p ~p~n", [maps:get(num_messages, O), '
        "maps:get(enqueue_message_bytes, O) + maps:get(checkout_message_bytes, O)])."
    )
    out = node.broker.node.rabbitmqctl("eval", expr)
    fields = out.split()
    if len(fields) < 2 or not (fields[0].isdigit() and fields[1].isdigit()):
        raise AssertionError(f"no count for queue {queue} on the node:\n{out}")
    return int(fields[0]), int(fields[1])


def test_a_silo_flooding_replies_raises_no_alarm_and_the_coordinator_carries_on(flood_node):
    node = flood_node
    bound = definitions.Bounds().reply_queue_max_bytes
    job = "job-flooded"
    reply_queue = NAMES.reply_queue(job)
    coordinator = node.broker.connect(node.broker.url(COORDINATOR))
    flood = None
    try:
        channel = coordinator.channel()
        declare_blocking(channel, topology.reply_declarations(NAMES, job), passive=True)

        flood = _flood(node, FLOODER, job)

        assert flood.blocked_after_s is None, "the broker blocked publishers: an alarm fired"
        assert _alarm_lines(node) == []
        alarms = subprocess.run(
            ["rabbitmq-diagnostics", "-n", node.broker.node.node_name, "-q", "alarms"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
        assert "no alarms" in alarms, alarms
        messages, queued = _queue_bytes(node, reply_queue)
        # A quorum reply queue (what survives a node's loss) tells its
        # publishers it is full only once its Raft log has applied the
        # bytes over the bound: what the flooder's channels held by then gets
        # in, and the broker's flow credit bounds that (docs/security.md)...
        burst = len(flood.channels) * BURST_PER_CHANNEL * MIB
        assert bound <= queued <= bound + burst, (queued, bound, burst)
        assert flood.messages * MIB > 10 * bound, "the flood was too small to tell anything"
        # ... and comes once: a full queue stays full. A second flood, on
        # the flooder's channels (told the queue is full) and on a silo_channel
        # one (which asks the queue first), adds nothing.
        body = os.urandom(MIB)
        silo_channel = flood.connections[-1].channel()
        for flooder in [*flood.channels, silo_channel]:
            for _ in range(32):
                flooder.basic_publish(
                    NAMES.replies_exchange, job, body, pika.BasicProperties(user_id=FLOODER)
                )
        for connection in flood.connections:
            connection.process_data_events(0.5)
        # A confirmed publish is refused (nack), not stored; its nack comes
        # after the channel has handled the flood sent on it before.
        silo_channel.confirm_delivery()
        with pytest.raises(pika.exceptions.NackError):
            silo_channel.basic_publish(
                NAMES.replies_exchange,
                job,
                b"one more",
                pika.BasicProperties(user_id=FLOODER),
                mandatory=True,
            )
        assert _queue_bytes(node, reply_queue) == (messages, queued)

        # The coordinator publishes a task (confirmed) and consumes its replies.
        channel.confirm_delivery()
        started = time.monotonic()
        channel.basic_publish(
            NAMES.tasks_exchange,
            "d",
            b"a task",
            pika.BasicProperties(delivery_mode=2, reply_to=job),
            mandatory=True,
        )
        publish_ms = (time.monotonic() - started) * 1000
        consumed = 0
        for method, _props, _body in channel.consume(
            reply_queue, auto_ack=True, inactivity_timeout=5
        ):
            if method is None:
                break
            consumed += 1
        channel.cancel()
        assert consumed == messages
        # Once drained, the queue takes the silo's replies again.
        silo_channel.basic_publish(
            NAMES.replies_exchange,
            job,
            b"an answer",
            pika.BasicProperties(user_id=FLOODER),
            mandatory=True,
        )
        with contextlib.suppress(pika.exceptions.AMQPError):
            channel.queue_delete(reply_queue)
    finally:
        coordinator.close()
        for connection in flood.connections if flood else []:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()
    print(
        "\nFLOOD",
        json.dumps(
            {
                "connections": len(flood.connections),
                "sent_mib": flood.messages,
                "seconds": round(flood.seconds, 1),
                "mib_per_s": round(flood.mib_per_s),
                "reply_queue_messages": messages,
                "reply_queue_bytes": queued,
                "bound_bytes": bound,
                "over_bound": round(queued / bound, 2),
                "idle_rss_mb": round(node.idle_rss / MIB),
                "peak_rss_mb": round(flood.peak_rss / MIB),
                "watermark_mb": round(node.watermark / MIB),
                "disk_limit_mb": round(node.disk_limit / MIB),
                "own_tmpfs": node.disk is not None,
                "alarm": False,
                "coordinator_publish_ms": round(publish_ms, 1),
            }
        ),
    )


def test_control_the_same_flood_into_an_unbounded_queue_raises_the_alarm(flood_node):
    """Without the policy's bound the same silo, same flood, blocks every publisher."""
    node = flood_node
    admin = node.broker.connect(node.broker.admin_url())
    try:
        channel = admin.channel()
        # Not matched by any policy, bound where silo a may publish.
        channel.queue_declare("unbounded", durable=True, arguments={"x-queue-type": "classic"})
        channel.queue_bind("unbounded", NAMES.replies_exchange, "control-job")
        # Another silo (same limits): silo a's connections still count a while.
        flood = _flood(node, CONTROL_FLOODER, "control-job")
        channel.queue_delete("unbounded")
    finally:
        admin.close()
    for connection in flood.connections:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()
    assert flood.blocked_after_s is not None, "the unbounded flood never raised an alarm"
    assert _alarm_lines(node), "the flooder was blocked, but the node logged no alarm"
    print(
        "\nFLOOD",
        json.dumps(
            {
                "control_sent_mib": flood.messages,
                "control_blocked_after_s": round(flood.blocked_after_s, 1),
                "control_peak_rss_mb": round(flood.peak_rss / MIB),
                "alarms": [line.split("] ", 1)[-1] for line in _alarm_lines(node)],
            }
        ),
    )
