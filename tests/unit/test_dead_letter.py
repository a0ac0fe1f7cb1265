"""One dead letter read from its properties, the admin commands' queue reads, and the
dead-letter report's table (pure logic: fakes for the broker's channel)."""

from __future__ import annotations

import datetime

import pika
import pika.exceptions
import pytest

from flaap_mq.admin import queues
from flaap_mq.admin.dead_letter import DeadLetter, read_dead_letter, reason_of
from flaap_mq.admin.dead_letter_queue import DeadLetterGroup, DeadLetterReport, render_dead_letters
from flaap_mq.protocol import topology

NOW = 1_800_000_000.0


def _properties(headers=None, timestamp=None) -> pika.BasicProperties:
    return pika.BasicProperties(headers=headers, timestamp=timestamp)


def test_the_broker_s_most_recent_death_gives_reason_and_queue():
    died = datetime.datetime.fromtimestamp(NOW - 90, datetime.UTC).replace(tzinfo=None)
    properties = _properties(
        {
            "x-death": [
                {"reason": b"expired", "queue": b"flaap.silo.a", "time": died},
                {"reason": "rejected", "queue": "flaap.silo.b"},
            ]
        },
        timestamp=int(NOW - 1000),
    )
    assert reason_of(properties) == "expired"
    assert read_dead_letter(properties, NOW) == DeadLetter("expired", "flaap.silo.a", 90.0)


def test_an_older_worker_s_header_gives_the_reason_before_its_colon():
    properties = _properties({"x-flaap-reason": b"malformed: no request"}, timestamp=int(NOW - 5))
    assert reason_of(properties) == "malformed"
    # No x-death: no source queue; the age counts from the task's publish.
    assert read_dead_letter(properties, NOW) == DeadLetter("malformed", "?", 5.0)


def test_a_dead_letter_saying_nothing():
    assert reason_of(_properties()) == "unknown"
    assert read_dead_letter(_properties(), NOW) == DeadLetter("unknown", "?", None)
    # A time in the future is no negative age.
    assert read_dead_letter(_properties(timestamp=int(NOW + 60)), NOW).age_s == 0.0


def test_a_group_keeps_its_oldest_and_newest_age():
    group = DeadLetterGroup("expired", "flaap.silo.a")
    for age in (30.0, None, 7200.0, 4.0):
        group.add(DeadLetter("expired", "flaap.silo.a", age))
    assert (group.count, group.oldest_s, group.newest_s) == (4, 7200.0, 4.0)


def test_the_report_as_a_table():
    groups = [DeadLetterGroup("rejected", "flaap.silo.a", 3, 2 * 86400.0, 90.0)]
    report = DeadLetterReport("flaap.dead-letter", 5, groups, removed=3, kept=2)
    header = f"  {'reason':<16} {'from queue':<40} {'count':>6} {'oldest':>8} {'newest':>8}"
    row = f"  {'rejected':<16} {'flaap.silo.a':<40} {3:>6} {'2.0d':>8} {'1.5m':>8}"
    assert render_dead_letters(report, purged=False, dry_run=False).split("\n") == [
        "flaap.dead-letter: 5 dead letter(s)",
        header,
        row,
    ]
    assert render_dead_letters(report, purged=True, dry_run=True).split("\n")[0] == (
        "flaap.dead-letter: would remove 3 of 5, kept 2"
    )
    empty = DeadLetterReport("flaap.dead-letter", 0, [])
    assert render_dead_letters(empty, purged=True, dry_run=False) == (
        "flaap.dead-letter: removed 0 of 0, kept 0"
    )


class _Channel:
    """A channel whose queue holds `messages` (delivery tags 1, 2, ...)."""

    def __init__(self, messages: int = 0, refuse: int | None = None) -> None:
        self._left = messages
        self._tag = 0
        self._refuse = refuse
        self.closed = False

    def queue_declare(self, queue, passive):
        assert passive
        if self._refuse is not None:
            raise pika.exceptions.ChannelClosedByBroker(self._refuse, f"no {queue}")
        method = pika.spec.Queue.DeclareOk(queue, message_count=self._left, consumer_count=2)
        return pika.frame.Method(1, method)

    def basic_get(self, queue, auto_ack):
        assert not auto_ack
        if not self._left:
            return None, None, None
        self._left -= 1
        self._tag += 1
        return pika.spec.Basic.GetOk(delivery_tag=self._tag), _properties(), b""

    def close(self):
        self.closed = True


class _Connection:
    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    def channel(self) -> _Channel:
        return self._channel


def test_queue_counts_by_passive_declare():
    channel = _Channel(messages=3)
    assert queues.queue_counts(_Connection(channel), "q") == queues.QueueCounts(3, 2)
    assert channel.closed


def test_a_missing_queue_has_no_counts_and_a_refusal_is_said():
    assert queues.queue_counts(_Connection(_Channel(refuse=404)), "q") is None
    with pytest.raises(ValueError, match="broker refused to show q: no q"):
        queues.queue_counts(_Connection(_Channel(refuse=403)), "q")
    # status reports what it can see: a refused queue is as a missing one.
    refused = _Connection(_Channel(refuse=403))
    assert queues.queue_counts(refused, "q", refused_as_missing=True) is None


def test_get_each_stops_at_the_limit_or_the_queue_s_end():
    assert [m.delivery_tag for m, _ in queues.get_each(_Channel(messages=5), "q", 3)] == [1, 2, 3]
    assert [m.delivery_tag for m, _ in queues.get_each(_Channel(messages=2), "q", 3)] == [1, 2]


def test_the_prefix_flag_is_said_only_when_not_the_default():
    assert queues.prefix_flag(topology.Names()) == ""
    assert queues.prefix_flag(topology.Names("lab")) == " --prefix lab"
