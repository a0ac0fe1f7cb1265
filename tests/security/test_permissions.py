"""Per-silo credentials on a broker loaded with a generated definitions document.

Everything here runs over TLS against the package's private node (see
conftest.py), logged in with the credentials `flaap-mq admin definitions`
made: a whole round, then each thing a silo must not be able to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pika
import pika.exceptions
import pytest
import structlog
import structlog.testing
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2

import flaap_mq
from flaap_mq.admin import definitions
from flaap_mq.broker.declare import declare_blocking
from flaap_mq.broker.link import BrokerRefused
from flaap_mq.coordinator.task_client import TaskClient
from flaap_mq.examples import temperature_average
from flaap_mq.local.workers import WorkerProcess
from flaap_mq.protocol import envelope, topology
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.testing import messages
from tests.security.conftest import COORDINATOR, IDLE_SILO, PREFIX, SILOS, VHOST, SecureBroker

pytestmark = pytest.mark.broker_node

NAMES = topology.Names(PREFIX)


# One connection per user for `_refused`, kept for the module: each user may
# hold only a few connections (the generated user limits), and RabbitMQ 3.10
# counts a TLS connection its client closed for 30 s more.
_CONNECTIONS: dict[str, pika.BlockingConnection] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_connections() -> Iterator[None]:
    yield
    for connection in _CONNECTIONS.values():
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()
    _CONNECTIONS.clear()


def _refused(
    broker: SecureBroker, user: str, action: Callable[[pika.adapters.BlockingConnection], object]
) -> pika.exceptions.ChannelClosedByBroker:
    """Runs `action` on a connection of `user`; returns how the broker refused it.

    The broker refuses on the channel (403, 406), which `action` opens; the
    connection stays open for the next.
    """
    connection = _CONNECTIONS.get(user)
    if connection is None or not connection.is_open:
        connection = _CONNECTIONS[user] = broker.connect(broker.url(user))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        action(connection)
    return refused.value


def _consumers(broker: SecureBroker, queue: str) -> int:
    connection = broker.connect(broker.admin_url())
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
    finally:
        connection.close()


@pytest.fixture(scope="module")
def silo_workers(secure_broker: SecureBroker, tmp_path_factory) -> Iterator[dict]:
    """One `flaap-mq worker` per silo, each logged in as its own silo user."""
    log_dir: Path = tmp_path_factory.mktemp("workers")
    workers = {}
    try:
        for silo in SILOS:
            workers[silo] = WorkerProcess(
                # The password in the URL, the CA on the command line.
                secure_broker.url(silo, ca=False),
                silo,
                prefix=PREFIX,
                extra_args=["--ca-file", str(secure_broker.tls.ca)],
                log_path=log_dir / f"worker-{silo}.log",
            )
        deadline = time.monotonic() + 120
        waiting = list(SILOS)
        while waiting:
            for silo in list(waiting):
                worker = workers[silo]
                if worker.process.poll() is not None:
                    raise RuntimeError(f"worker {silo} exited:\n{worker.log_text()[-3000:]}")
                if _consumers(secure_broker, NAMES.silo_queue(silo)) > 0:
                    waiting.remove(silo)
            assert time.monotonic() < deadline, f"workers {waiting} never consumed"
            time.sleep(0.3)
        yield workers
    finally:
        for worker in workers.values():
            worker.stop()


def test_round_over_tls_with_generated_credentials(secure_broker, silo_workers):
    # The coordinator gets the CA from the URL's query, the workers from --ca-file.
    with (
        flaap_mq.create_execution_context(
            secure_broker.url(COORDINATOR),
            SILOS,
            topology_prefix=PREFIX,
            task_timeout=120,
            silo_users={s: s for s in SILOS},
        ) as context,
        tff.framework.get_context_stack().install(context),
    ):
        data = [[float(x) for x in range(n)] for n in (2, 4, 6, 8, 10, 12)]
        expected = np.mean([np.mean(d) for d in data])
        assert temperature_average(data) == pytest.approx(expected)
    for silo, worker in silo_workers.items():
        log = worker.log_text()
        # No configure permission: the worker checked the topology instead.
        assert "topology_declared_passively" in log, log[-2000:]
        assert '"event": "task"' in log, f"silo {silo} ran nothing"


def test_worker_dead_letters_a_malformed_task_without_writing_to_the_dead_letter_exchange(
    secure_broker, silo_workers
):
    """The worker rejects; the broker dead-letters; the sender hears why; the log says why.

    Silo b's user may not publish to the dead-letter exchange (see the next
    test), so the task can only get there through the broker's own
    dead-lettering of a reject.
    """
    message_id = f"garbage-{uuid.uuid4().hex[:8]}"
    job = f"job-{uuid.uuid4().hex[:8]}"
    coordinator = secure_broker.connect(secure_broker.url(COORDINATOR))
    try:
        channel = coordinator.channel()
        declare_blocking(channel, topology.reply_declarations(NAMES, job), passive=True)
        channel.confirm_delivery()
        channel.basic_publish(
            NAMES.tasks_exchange,
            "b",
            b"\xff not a task",
            pika.BasicProperties(
                delivery_mode=2, message_id=message_id, correlation_id=message_id, reply_to=job
            ),
            mandatory=True,
        )
        reply = None
        deadline = time.monotonic() + 30
        while reply is None and time.monotonic() < deadline:
            method, props, body = channel.basic_get(NAMES.reply_queue(job), auto_ack=True)
            if method is None:
                time.sleep(0.2)
            else:
                reply = (props, task_pb2.TaskResult.FromString(body))
        channel.queue_delete(NAMES.reply_queue(job))
    finally:
        coordinator.close()
    assert reply is not None, "the sender of the malformed task was not answered"
    props, result = reply
    assert props.correlation_id == message_id and props.user_id == "b"
    assert result.error.code == envelope.ErrorCode.MALFORMED_TASK
    assert "could not read the task" in result.error.message

    admin = secure_broker.connect(secure_broker.admin_url())
    try:
        channel = admin.channel()
        deadline = time.monotonic() + 30
        found = None
        while found is None and time.monotonic() < deadline:
            method, props, _ = channel.basic_get(NAMES.dead_letter_queue, auto_ack=True)
            if method is not None and props.message_id == message_id:
                found = props
            elif method is None:
                time.sleep(0.2)
    finally:
        admin.close()
    assert found is not None, "the malformed task never reached the dead-letter queue"
    death = found.headers["x-death"][0]
    assert (death["reason"], death["queue"]) == ("rejected", NAMES.silo_queue("b"))
    logged = [
        json.loads(line)
        for line in silo_workers["b"].log_text().splitlines()
        if '"task_dead_lettered"' in line
    ]
    assert [e["reason"].split(":")[0] for e in logged if e["message_id"] == message_id] == [
        "malformed"
    ]
    assert silo_workers["b"].process.poll() is None


def test_silo_cannot_publish_to_the_dead_letter_exchange(secure_broker):
    """A forged dead letter (any headers, any reason) never reaches the dead-letter queue."""

    def forge(connection: pika.BlockingConnection) -> None:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            NAMES.dead_letter_exchange,
            "a",
            b"a forged dead letter",
            pika.BasicProperties(headers={"x-death": [{"reason": "expired"}]}),
            mandatory=True,
        )

    refused = _refused(secure_broker, "a", forge)
    assert refused.reply_code == 403
    assert "ACCESS_REFUSED" in refused.reply_text
    assert f"exchange '{NAMES.dead_letter_exchange}'" in refused.reply_text


def test_silo_cannot_consume_another_silos_queue(secure_broker):
    refused = _refused(
        secure_broker,
        "a",
        lambda c: c.channel().basic_consume(NAMES.silo_queue("b"), lambda *_: None),
    )
    assert refused.reply_code == 403
    assert "flaap.silo.b" in refused.reply_text
    refused = _refused(secure_broker, "a", lambda c: c.channel().basic_get(NAMES.dead_letter_queue))
    assert refused.reply_code == 403


def test_silo_cannot_publish_tasks_or_use_the_default_exchange(secure_broker):
    def publish(exchange: str, key: str) -> Callable[[pika.BlockingConnection], object]:
        def action(connection: pika.BlockingConnection) -> None:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(exchange, key, b"injected", mandatory=True)

        return action

    refused = _refused(secure_broker, "a", publish(NAMES.tasks_exchange, "b"))
    assert refused.reply_code == 403
    assert "flaap.tasks" in refused.reply_text
    # The default exchange would reach any queue by name.
    refused = _refused(secure_broker, "a", publish("", NAMES.silo_queue("b")))
    assert refused.reply_code == 403
    assert "amq.default" in refused.reply_text


def test_silo_cannot_read_a_reply_queue(secure_broker):
    job = f"job-{uuid.uuid4().hex[:8]}"
    coordinator = secure_broker.connect(secure_broker.url(COORDINATOR))
    try:
        declare_blocking(
            coordinator.channel(), topology.reply_declarations(NAMES, job), passive=True
        )
        refused = _refused(
            secure_broker,
            "a",
            lambda c: c.channel().basic_consume(NAMES.reply_queue(job), lambda *_: None),
        )
        assert refused.reply_code == 403
        refused = _refused(
            secure_broker, "a", lambda c: c.channel().basic_get(NAMES.reply_queue(job))
        )
        assert refused.reply_code == 403
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            coordinator.channel().queue_delete(NAMES.reply_queue(job))
        coordinator.close()


@pytest.mark.parametrize("user", [COORDINATOR, "a"])
def test_only_an_administrator_declares_deletes_or_purges(secure_broker, user):
    actions = {
        "declare a queue": lambda c: c.channel().queue_declare(
            NAMES.silo_queue("rogue"), durable=True
        ),
        "declare an exchange": lambda c: c.channel().exchange_declare("flaap.rogue", "fanout"),
        "delete a silo queue": lambda c: c.channel().queue_delete(NAMES.silo_queue("a")),
        "delete the tasks exchange": lambda c: c.channel().exchange_delete(NAMES.tasks_exchange),
        "purge another silo's queue": lambda c: c.channel().queue_purge(NAMES.silo_queue("b")),
        "purge the dead letters": lambda c: c.channel().queue_purge(NAMES.dead_letter_queue),
        "bind a queue": lambda c: c.channel().queue_bind(
            NAMES.dead_letter_queue, NAMES.tasks_exchange, "a"
        ),
    }
    for what, action in actions.items():
        refused = _refused(secure_broker, user, action)
        assert refused.reply_code == 403, f"{user} could {what}"


def test_forged_user_id_is_refused_by_the_broker(secure_broker):
    def forge(connection: pika.BlockingConnection) -> None:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            NAMES.replies_exchange,
            "some-job",
            b"a result from 'b'",
            pika.BasicProperties(user_id="b", correlation_id="t1"),
        )

    refused = _refused(secure_broker, "a", forge)
    assert refused.reply_code == 406
    assert "user_id property set to 'b' but authenticated user was 'a'" in refused.reply_text


def test_reply_from_the_wrong_silo_is_dropped(secure_broker):
    """Silo b answers a task sent to d (honest user_id, forged body): dropped."""
    d = IDLE_SILO  # no worker: the test plays silo d (and the impostor b) with raw pika
    client = TaskClient(
        secure_broker.url(COORDINATOR),
        [d, "b"],
        names=NAMES,
        silo_users={d: d, "b": "b"},
        task_timeout_s=60,
    )
    # Its log, captured (the process's loggers are cached at configuration).
    captured = structlog.testing.LogCapture()
    client._log = structlog.wrap_logger(None, processors=[captured])
    client.start()
    try:

        async def ask_and_answer() -> object:
            call = asyncio.ensure_future(
                client.ask(d, executor_pb2.GetExecutorRequest(), timeout_s=60)
            )
            task, props = await asyncio.to_thread(_take_task, secure_broker, d)
            response = executor_pb2.GetExecutorResponse(
                executor=executor_pb2.ExecutorId(id="from-d")
            ).SerializeToString()
            forged = envelope.result_ok(task, b"", incarnation="x", duration_us=1)
            forged.response = executor_pb2.GetExecutorResponse(
                executor=executor_pb2.ExecutorId(id="from-b")
            ).SerializeToString()
            # b, as itself (the broker checks that), and without a user_id.
            await asyncio.to_thread(_reply_as, secure_broker, "b", props, forged, "b")
            await asyncio.to_thread(_reply_as, secure_broker, "b", props, forged, None)
            await asyncio.sleep(1.0)
            assert not call.done(), "a reply from silo b was accepted for silo d"
            genuine = envelope.result_ok(task, response, incarnation="x", duration_us=1)
            await asyncio.to_thread(_reply_as, secure_broker, d, props, genuine, d)
            return (await asyncio.wait_for(call, 30)).response

        result = asyncio.run(ask_and_answer())
    finally:
        client.close()
    assert result.executor.id == "from-d"
    dropped = [e for e in captured.entries if e["event"] == "reply_from_wrong_user"]
    assert [(e["expected_user"], e["user"]) for e in dropped] == [(d, "b"), (d, None)]


def _take_task(broker: SecureBroker, silo: str) -> tuple[object, pika.BasicProperties]:
    connection = broker.connect(broker.url(silo))
    try:
        channel = connection.channel()
        # A consumer, not basic.get: silo queues are single-active-consumer.
        for method, props, body in channel.consume(
            NAMES.silo_queue(silo), auto_ack=True, inactivity_timeout=30
        ):
            if method is None:
                break
            return messages.parse_task(body), props
        raise TimeoutError(f"no task reached {silo}")
    finally:
        connection.close()


def _reply_as(
    broker: SecureBroker, user: str, task_props: pika.BasicProperties, result, user_id
) -> None:
    connection = broker.connect(broker.url(user))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            NAMES.replies_exchange,
            task_props.reply_to,
            result.SerializeToString(),
            pika.BasicProperties(correlation_id=task_props.correlation_id, user_id=user_id),
            mandatory=True,
        )
    finally:
        connection.close()


def test_missing_silo_queue_is_named(secure_broker):
    client = TaskClient(secure_broker.url(COORDINATOR), ["a", "zz"], names=NAMES)
    with pytest.raises(BrokerRefused) as refused:
        client.start()
    client.close()
    message = str(refused.value)
    assert "no queue 'flaap.silo.zz'" in message
    assert "flaap-mq admin definitions" in message


def test_worker_for_another_silo_exits_with_the_refusal(secure_broker, tmp_path):
    """Silo a's login running as silo b: refused at consume, exit 1, no retry loop."""
    worker = WorkerProcess(secure_broker.url("a"), "b", prefix=PREFIX, log_path=tmp_path / "w.log")
    try:
        assert worker.process.wait(90) == 1
    finally:
        worker.stop()
    log = worker.log_text()
    assert "access to queue 'flaap.silo.b' in vhost 'federation' refused for user 'a'" in log
    assert "Traceback" not in log


def test_reply_from_the_wrong_silo_is_dropped_by_default(secure_broker):
    """No `silo_users` given and a login other than guest: each silo must answer as itself.

    As `test_reply_from_the_wrong_silo_is_dropped`, through
    `create_execution_context` with its defaults: silo b, logged in as b,
    answers a task sent to d; the coordinator drops it and waits for d.
    """
    d = IDLE_SILO
    with flaap_mq.create_execution_context(
        secure_broker.url(COORDINATOR), [d, "b"], topology_prefix=PREFIX, task_timeout=60
    ) as context:
        client = context.client
        assert client._silo_users == {d: d, "b": "b"}
        captured = structlog.testing.LogCapture()
        client._log = structlog.wrap_logger(None, processors=[captured])

        async def ask_and_answer() -> object:
            call = asyncio.ensure_future(
                client.ask(d, executor_pb2.GetExecutorRequest(), timeout_s=60)
            )
            task, props = await asyncio.to_thread(_take_task, secure_broker, d)
            forged = envelope.result_ok(
                task,
                executor_pb2.GetExecutorResponse(
                    executor=executor_pb2.ExecutorId(id="from-b")
                ).SerializeToString(),
                incarnation="x",
                duration_us=1,
            )
            await asyncio.to_thread(_reply_as, secure_broker, "b", props, forged, "b")
            await asyncio.sleep(1.0)
            assert not call.done(), "by default, a reply from silo b was accepted for silo d"
            genuine = envelope.result_ok(
                task,
                executor_pb2.GetExecutorResponse(
                    executor=executor_pb2.ExecutorId(id="from-d")
                ).SerializeToString(),
                incarnation="x",
                duration_us=1,
            )
            await asyncio.to_thread(_reply_as, secure_broker, d, props, genuine, d)
            return (await asyncio.wait_for(call, 30)).response

        result = asyncio.run(ask_and_answer())
    assert result.executor.id == "from-d"
    dropped = [e for e in captured.entries if e["event"] == "reply_from_wrong_user"]
    assert [(e["expected_user"], e["user"]) for e in dropped] == [(d, "b")]


def test_a_silo_cannot_open_more_connections_or_channels_than_its_limits(secure_broker):
    """The generated user limits hold on the broker (silo d: no worker holds its login)."""
    bounds = definitions.Bounds()
    url = secure_broker.url(IDLE_SILO)
    opened: list[pika.BlockingConnection] = []
    # RabbitMQ 3.10 counts a TLS connection its client closed for 30 s more:
    # wait until those of earlier tests are gone.
    deadline = time.monotonic() + 60
    while IDLE_SILO in secure_broker.node.rabbitmqctl("list_connections", "-q", "user").split():
        assert time.monotonic() < deadline, "silo d's earlier connections still count"
        time.sleep(1)
    try:
        opened = [secure_broker.connect(url) for _ in range(bounds.silo_max_connections)]
        with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
            opened.append(secure_broker.connect(url))
        assert f"user connection limit ({bounds.silo_max_connections}) is reached" in str(
            refused.value
        )
        channels = [opened[i % len(opened)].channel() for i in range(bounds.silo_max_channels)]
        assert all(c.is_open for c in channels)
        with pytest.raises(pika.exceptions.AMQPError) as refused_channel:
            opened[0].channel()
        assert refused_channel.value.args[0] == 530
        assert f"maximum allowed user limit of ({bounds.silo_max_channels})" in str(
            refused_channel.value
        )
    finally:
        for connection in opened:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()


def test_the_generated_policies_bound_every_queue_of_the_topology(secure_broker):
    """Loaded with the definitions, each silo queue and the dead-letter queue has its bound."""
    bounds = definitions.Bounds()
    ctl = secure_broker.node.rabbitmqctl
    applied = dict(
        line.split("\t")
        for line in ctl("list_queues", "-p", VHOST, "name", "policy", "-q").splitlines()[1:]
    )
    loaded = {
        # The definition comes as JSON text inside the JSON listing.
        p["name"]: json.loads(p["definition"])
        for p in json.loads(ctl("list_policies", "-p", VHOST, "--formatter", "json", "-q"))
    }
    expected = {NAMES.silo_queue(s): f"{PREFIX}-silo-queues" for s in [*SILOS, IDLE_SILO]}
    expected[NAMES.dead_letter_queue] = f"{PREFIX}-dead-letter"
    assert {q: applied[q] for q in expected} == expected
    assert loaded[f"{PREFIX}-silo-queues"] == {
        "max-length-bytes": bounds.silo_queue_max_bytes,
        "overflow": "reject-publish",
    }
    assert loaded[f"{PREFIX}-dead-letter"] == {
        "max-length-bytes": bounds.dead_letter_max_bytes,
        "overflow": "drop-head",
    }
    assert loaded[f"{PREFIX}-reply-queues"] == {
        "max-length-bytes": bounds.reply_queue_max_bytes,
        "overflow": "reject-publish",
    }
