"""`flaap-mq admin remove-silo` and `flaap-mq dead-letters show|purge` against a real broker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pika.exceptions
import pytest

from flaap_mq.broker.declare import declare_blocking
from flaap_mq.protocol import topology
from flaap_mq.testing.cli import run_cli


@pytest.fixture
def channel(
    broker_url: str, prefix: str
) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on the broker, with the test prefix's topology for silos idle, busy and held."""
    names = topology.Names(prefix)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    declare_blocking(
        channel,
        topology.shared_declarations(names)
        + topology.silo_declarations(names, ["idle", "busy", "held"]),
    )
    channel.confirm_delivery()
    yield channel
    if connection.is_open:
        connection.close()


def _cli(broker_url: str, prefix: str, *args: str) -> tuple[int, str, str]:
    done = run_cli(*args, "--broker-url", broker_url, "--prefix", prefix, timeout=60)
    return done.returncode, done.stdout, done.stderr


def _exists(broker_url: str, queue: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        connection.close()


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _depth(channel, queue: str) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


def test_remove_silo_deletes_only_an_empty_unused_queue_unless_forced(
    broker_url: str, prefix: str, channel
) -> None:
    names = topology.Names(prefix)
    channel.basic_publish(names.tasks_exchange, "busy", b"task", mandatory=True)
    _wait_for(lambda: _depth(channel, names.silo_queue("busy")) == 1)
    worker = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        worker.channel().basic_consume(names.silo_queue("held"), lambda *_: None)

        code, out, err = _cli(broker_url, prefix, "admin", "remove-silo", "idle")
        assert code == 0, err
        assert f"deleted {prefix}.silo.idle" in out
        assert not _exists(broker_url, names.silo_queue("idle"))

        code, out, err = _cli(broker_url, prefix, "admin", "remove-silo", "busy")
        assert code == 1
        assert err.strip().splitlines() == [err.strip()], err  # one line
        assert f"not removing {prefix}.silo.busy: 1 task(s) wait in it" in err and "--force" in err
        # Still there, still bound: tasks for the silo are still routed to it.
        channel.basic_publish(names.tasks_exchange, "busy", b"task 2", mandatory=True)
        _wait_for(lambda: _depth(channel, names.silo_queue("busy")) == 2)

        code, out, err = _cli(broker_url, prefix, "admin", "remove-silo", "held")
        assert code == 1
        assert "1 worker(s) consume it" in err and "systemctl stop flaap-mq-worker@held" in err
        assert _exists(broker_url, names.silo_queue("held"))

        code, out, err = _cli(broker_url, prefix, "admin", "remove-silo", "busy", "--force")
        assert code == 0, err
        assert f"deleted {prefix}.silo.busy and the 2 task(s) in it" in out
        assert not _exists(broker_url, names.silo_queue("busy"))
        # Unroutable now: a coordinator's mandatory task would be returned, not lost.
        with pytest.raises(pika.exceptions.UnroutableError):
            channel.basic_publish(names.tasks_exchange, "busy", b"task 3", mandatory=True)

        code, out, err = _cli(broker_url, prefix, "admin", "remove-silo", "never-was")
        assert code == 1
        assert f"the broker has no queue {prefix}.silo.never-was" in err
    finally:
        worker.close()


def _dead_letter(channel, names: topology.Names, kind: str) -> str:
    """Makes one dead letter the way the broker does (or an old worker did); its message id."""
    message_id = f"{kind}-{uuid.uuid4().hex[:6]}"
    queue = names.silo_queue("idle")
    before = _depth(channel, names.dead_letter_queue)
    if kind == "expired":
        properties = pika.BasicProperties(message_id=message_id, expiration="1")
        channel.basic_publish(names.tasks_exchange, "idle", b"task", properties, mandatory=True)
    elif kind == "rejected":
        properties = pika.BasicProperties(message_id=message_id)
        channel.basic_publish(names.tasks_exchange, "idle", b"task", properties, mandatory=True)
        # A worker's refusal (silo queues have a single active consumer: no basic.get).
        method, _, _ = next(channel.consume(queue, inactivity_timeout=15))
        assert method is not None, "the task never arrived"
        channel.basic_reject(method.delivery_tag, requeue=False)
        channel.cancel()
    else:  # published by a worker before 2026-12, an hour ago
        properties = pika.BasicProperties(
            message_id=message_id,
            headers={"x-flaap-reason": "malformed: not a task"},
            timestamp=int(time.time()) - 3600,
        )
        channel.basic_publish(names.dead_letter_exchange, "", b"task", properties)
    _wait_for(lambda: _depth(channel, names.dead_letter_queue) == before + 1)
    return message_id


def _queued_ids(channel, queue: str) -> list[str]:
    """The message ids in `queue`, in order; every message is put back."""
    ids, last = [], None
    while True:
        method, properties, _ = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        ids.append(properties.message_id)
        last = method.delivery_tag
    if last is not None:
        channel.basic_nack(last, multiple=True, requeue=True)
    return ids


def test_dead_letters_show_counts_by_reason_and_purge_removes_only_the_matching(
    broker_url: str, prefix: str, channel
) -> None:
    names = topology.Names(prefix)
    made = [
        _dead_letter(channel, names, kind)
        for kind in ("expired", "rejected", "old", "expired", "rejected")
    ]

    code, out, err = _cli(broker_url, prefix, "dead-letters", "show", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["depth"] == 5
    by_reason = {(g["reason"], g["queue"]): g for g in report["groups"]}
    assert by_reason[("expired", names.silo_queue("idle"))]["count"] == 2
    assert by_reason[("rejected", names.silo_queue("idle"))]["count"] == 2
    old = by_reason[("malformed", "?")]
    assert old["count"] == 1 and 3500 < old["oldest_s"] < 3700
    code, text, _ = _cli(broker_url, prefix, "dead-letters", "show")
    assert "expired" in text and "rejected" in text and "malformed" in text
    assert _queued_ids(channel, names.dead_letter_queue) == made  # show took nothing

    code, _, err = _cli(broker_url, prefix, "dead-letters", "purge")
    assert code == 1 and "--all" in err  # no filter: says how, removes nothing

    code, out, err = _cli(
        broker_url, prefix, "dead-letters", "purge", "--reason", "expired", "--dry-run"
    )
    assert code == 0, err
    assert "would remove 2 of 5" in out
    assert _queued_ids(channel, names.dead_letter_queue) == made

    code, out, err = _cli(broker_url, prefix, "dead-letters", "purge", "--reason", "expired")
    assert code == 0, err
    assert "removed 2 of 5, kept 3" in out
    kept = [m for m in made if not m.startswith("expired")]
    assert _queued_ids(channel, names.dead_letter_queue) == kept  # the others, in their order

    code, out, err = _cli(broker_url, prefix, "dead-letters", "purge", "--older-than", "1800")
    assert code == 0, err
    assert "removed 1 of 3" in out
    kept = [m for m in kept if not m.startswith("old")]
    assert _queued_ids(channel, names.dead_letter_queue) == kept

    code, out, err = _cli(broker_url, prefix, "dead-letters", "purge", "--all")
    assert code == 0, err
    assert "removed 2 of 2" in out
    assert _depth(channel, names.dead_letter_queue) == 0
