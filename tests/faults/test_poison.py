"""Poison input: 1,000 random and malformed tasks, and messages over the broker's size limit.

Every poison message ends in the dead-letter queue: rejected by the worker
(the broker's `x-death` reason `rejected`; the worker logs the detailed reason
for its message id) or expired on the way (`expired`). The worker never
publishes a dead letter itself, never crashes, and its memory stays bounded.
The bodies, headers and properties come from hypothesis, used directly (its
pytest plugin is disabled here), with a fixed seed so a failure reproduces.
"""

from __future__ import annotations

import contextlib
import datetime
import random
import struct
import time
from unittest import mock

import pika
import pika.data
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.broker.declare import declare_blocking
from flaap_mq.protocol import envelope, topology
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.testing import messages
from tests.faults import support

POISON_COUNT = 1000
SILO = "p"


def _valid_task(task_id: str) -> task_pb2.Task:
    request = executor_pb2.ComputeRequest(
        executor=executor_pb2.ExecutorId(id="nobody/clients=1"),
        value_ref=executor_pb2.ValueRef(id="1"),
    )
    return messages.build_task(
        request=request,
        job_id="poison",
        silo_id=SILO,
        task_id=task_id,
        deadline_unix_ms=envelope.deadline_after(600),
    )


# Each breaks a task so that no worker could run it.
_BREAKS = {
    "protocol_version": st.integers(min_value=envelope.PROTOCOL_VERSION + 1, max_value=2**32 - 1),
    "task_id": st.just(""),
    "job_id": st.just(""),
    "silo_id": st.sampled_from(["", "q", "P", "p ", "../p", "\u00fe"]),
    "kind": st.integers(min_value=9, max_value=2**31 - 1),
    "request": st.binary(min_size=1, max_size=64).map(lambda b: b"\xff\xff\xff\xff" + b),
    "deadline_unix_ms": st.integers(min_value=1, max_value=int(time.time() * 1000) - 60_000),
}


@st.composite
def _broken_envelope(draw: st.DrawFn) -> bytes:
    task = _valid_task(draw(st.text(min_size=1, max_size=40)))
    for field in draw(st.lists(st.sampled_from(sorted(_BREAKS)), min_size=1, max_size=3)):
        setattr(task, field, draw(_BREAKS[field]))
    body = task.SerializeToString()
    if draw(st.booleans()):
        body += draw(st.binary(max_size=32))  # trailing garbage
    return body


@st.composite
def _not_a_task(draw: st.DrawFn) -> bytes:
    """Bytes that do not decode as a Task: a wire type 7 field, then anything."""
    return b"\x0f" + draw(st.binary(max_size=512))


@st.composite
def _big_random(draw: st.DrawFn) -> bytes:
    """16 to 256 KB of noise (from a drawn seed: hypothesis' own buffer is too small)."""
    seed = draw(st.integers(min_value=0, max_value=2**32))
    size = draw(st.integers(min_value=16 * 1024, max_value=256 * 1024))
    return b"\x0f" + random.Random(seed).randbytes(size)


_bodies = st.one_of(
    st.binary(max_size=2048),
    _not_a_task(),
    _broken_envelope(),
    _broken_envelope().map(lambda b: b[: max(0, len(b) // 2)]),  # truncated
    _big_random(),
)
_header_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        # Doubles, which pika decodes but cannot encode (see _doubles_on_the_wire).
        st.floats(allow_nan=False, allow_infinity=False),
        st.decimals(min_value=-1000, max_value=1000, places=2),
        st.datetimes(
            min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2100, 1, 1)
        ).map(lambda d: d.replace(microsecond=0)),
        st.text(max_size=64),
        st.binary(max_size=64),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=16), children, max_size=4),
    ),
    max_leaves=8,
)
# Header names the broker itself interprets (x-death, x-delivery-count, ...)
# are left out: a forged x-death is the broker's to judge, not the worker's.
_header_names = st.text(min_size=1, max_size=32).filter(lambda k: not k.lower().startswith("x-"))
_short = st.text(max_size=60)


@st.composite
def _poison(draw: st.DrawFn) -> tuple[bytes, dict]:
    properties = {
        "headers": draw(st.none() | st.dictionaries(_header_names, _header_values, max_size=6)),
        "content_type": draw(st.none() | _short),
        "content_encoding": draw(st.none() | _short),
        "correlation_id": draw(st.none() | _short),
        # A real reply queue, another one, or none.
        "reply_to": draw(st.sampled_from(["REPLY", None, "nobody-listens"]) | _short),
        "priority": draw(st.none() | st.integers(min_value=0, max_value=255)),
        "delivery_mode": draw(st.sampled_from([1, 2])),
        "type": draw(st.none() | _short),
        "app_id": draw(st.none() | _short),
        "timestamp": draw(st.none() | st.integers(min_value=0, max_value=2**63 - 1)),
        # Some expire on the way: the broker dead-letters those itself.
        "expiration": draw(st.none() | st.integers(min_value=0, max_value=3000).map(str)),
    }
    return draw(_bodies), properties


@contextlib.contextmanager
def _doubles_on_the_wire():
    """Lets this test's publisher send float header values as AMQP doubles ('d').

    Other clients (Java, Go, .NET) send them; pika decodes them to float but has
    no encoder for them, so a worker that copies such headers into a dead letter
    must not trip over them.
    """
    encode_value = pika.data.encode_value

    def encode(pieces: list, value: object) -> int:
        if isinstance(value, float):
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        return encode_value(pieces, value)

    with mock.patch.object(pika.data, "encode_value", encode):
        yield


def test_a_thousand_poison_tasks_end_in_the_dead_letter_queue(workers, broker_url, prefix):
    names = topology.Names(prefix)
    fleet = workers([SILO])
    worker = fleet.workers[SILO]
    executors = worker.executor_pids()
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    reply_job = "poison-replies"
    declare_blocking(channel, topology.reply_declarations(names, reply_job))
    channel.confirm_delivery()
    rss_before = support.rss_bytes(worker.pid)
    sent: dict[str, int] = {}
    rss_peak = rss_before

    @settings(
        max_examples=POISON_COUNT,
        database=None,
        deadline=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(_poison())
    def publish(poison: tuple[bytes, dict]) -> None:
        nonlocal rss_peak
        body, props = poison
        message_id = f"poison-{len(sent)}"
        if props["reply_to"] == "REPLY":
            props["reply_to"] = reply_job
        channel.basic_publish(
            names.tasks_exchange,
            SILO,
            body,
            pika.BasicProperties(message_id=message_id, **props),
            mandatory=True,
        )
        sent[message_id] = len(body)
        if len(sent) % 100 == 0:
            rss_peak = max(rss_peak, support.rss_bytes(worker.pid))

    with _doubles_on_the_wire():
        publish()
    assert len(sent) == POISON_COUNT

    dead: dict[str, str | None] = {}
    deadline = time.monotonic() + 180
    while len(dead) < POISON_COUNT and time.monotonic() < deadline:
        method, properties, _ = channel.basic_get(names.dead_letter_queue, auto_ack=True)
        if method is None:
            rss_peak = max(rss_peak, support.rss_bytes(worker.pid))
            assert worker.process.poll() is None, "the worker died on poison input"
            time.sleep(0.2)
            continue
        dead[properties.message_id] = support.dead_letter_reason(properties)
    connection.close()
    rss_after = support.rss_bytes(worker.pid)
    assert worker.process.poll() is None, "the worker died on poison input"
    support.assert_nothing_left(fleet, executors)
    assert fleet.exit_codes[SILO] == 0

    assert set(dead) == set(sent), f"{len(set(sent) - set(dead))} poison messages not dead-lettered"
    # Only the broker's reasons: rejected by the worker, or expired while queued.
    assert set(dead.values()) <= {"rejected", "expired"}, set(dead.values())
    assert support.drain(broker_url, names.silo_queue(SILO)) == []
    assert support.drain(broker_url, names.dead_letter_queue) == []
    events = support.fleet_events(fleet)
    logged = support.logged_dead_letters(events)
    unexplained = [m for m, r in dead.items() if r == "rejected" and m not in logged]
    assert not unexplained, f"rejected without a logged reason: {unexplained[:10]}"
    reasons: dict[str, int] = {}
    for message_id, r in dead.items():
        key = logged[message_id].split(":")[0] if r == "rejected" else "expired in the queue"
        reasons[key] = reasons.get(key, 0) + 1
    counted = support.tally(events)
    assert sum(counted.executions.values()) == 0, counted.outcomes
    growth_mb = (max(rss_peak, rss_after) - rss_before) / 2**20
    # Bounded: nothing of a poison task is kept once it is dead-lettered.
    # (The bodies sent add up to far more than this.)
    assert growth_mb < 64, growth_mb
    support.record(
        "poison_input",
        messages=POISON_COUNT,
        bytes_sent=sum(sent.values()),
        dead_lettered=len(dead),
        reasons=reasons,
        worker_crashed=False,
        rss_before_mb=round(rss_before / 2**20, 1),
        rss_growth_mb=round(growth_mb, 1),
    )
