"""Publisher-confirm bookkeeping without a broker (`flaap_mq.broker.confirms`).

The broker's answers are fed in as `BrokerLink` feeds them (delivery tag,
`multiple`, ack or nack; a return before its ack), time as a fake clock.
"""

from __future__ import annotations

import concurrent.futures
import time

import pika
import pytest

from flaap_mq.broker.confirms import PUBLISH_ID_HEADER, ConfirmTracker, Outgoing
from flaap_mq.broker.errors import BrokerError, LinkClosed, MessageTooLarge, Unroutable
from flaap_mq.broker.link import confirmed_in_window


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict]] = []

    def warning(self, event: str, **fields: object) -> None:
        self.warnings.append((event, fields))


def _message(routing_key: str = "silo-a", body: bytes = b"x") -> Outgoing:
    return Outgoing(
        "flaap.tasks",
        routing_key,
        body,
        pika.BasicProperties(headers={"keep": 1}),
        True,
        concurrent.futures.Future(),
    )


def _tracker(timeout: float = 30.0) -> tuple[ConfirmTracker, Clock, Log]:
    clock, log = Clock(), Log()
    tracker = ConfirmTracker(timeout, log=log, clock=clock)
    tracker.channel_opened()
    return tracker, clock, log


def _settled(tracker: ConfirmTracker) -> concurrent.futures.Future[None]:
    waiter: concurrent.futures.Future[None] = concurrent.futures.Future()
    tracker.add_settled_waiter(waiter)
    return waiter


def test_an_ack_resolves_its_message_only():
    tracker, _, _ = _tracker()
    first, second = _message(), _message()
    assert [tracker.track(first), tracker.track(second)] == [1, 2]
    # Each carries its own publish id, next to the headers it had.
    ids = [m.properties.headers[PUBLISH_ID_HEADER] for m in (first, second)]
    assert len(set(ids)) == 2 and first.properties.headers["keep"] == 1
    waiter = _settled(tracker)
    tracker.confirmed(2, multiple=False, acked=True)
    assert second.future.result(0) is None
    assert not first.future.done() and not waiter.done()
    tracker.confirmed(1, multiple=False, acked=True)
    assert first.future.result(0) is None
    assert waiter.result(0) is None and not tracker.awaiting_confirm


def test_a_multiple_ack_resolves_every_tag_up_to_it():
    tracker, _, _ = _tracker()
    messages = [_message() for _ in range(4)]
    for out in messages:
        tracker.track(out)
    tracker.confirmed(3, multiple=True, acked=True)
    assert [m.future.done() for m in messages] == [True, True, True, False]
    assert tracker.awaiting_confirm
    # An unknown tag (already settled) changes nothing.
    tracker.confirmed(2, multiple=False, acked=True)
    assert not messages[3].future.done()


def test_a_nack_fails_the_message_saying_why():
    tracker, _, _ = _tracker()
    out = _message()
    tracker.track(out)
    tracker.confirmed(1, multiple=False, acked=False)
    error = out.future.exception(0)
    assert type(error) is BrokerError
    assert "refused (nack)" in str(error) and "flaap.tasks/silo-a" in str(error)


def test_a_returned_message_fails_unroutable_on_its_ack():
    tracker, _, _ = _tracker()
    returned, fine = _message("nobody"), _message()
    tracker.track(returned)
    tracker.track(fine)
    tracker.returned(returned.properties, "NO_ROUTE (exchange 'flaap.tasks', key 'nobody')")
    tracker.confirmed(2, multiple=True, acked=True)
    with pytest.raises(Unroutable, match="NO_ROUTE"):
        returned.future.result(0)
    assert fine.future.result(0) is None
    # A return of a message the tracker no longer knows is ignored.
    tracker.returned(pika.BasicProperties(headers={PUBLISH_ID_HEADER: 999}), "NO_ROUTE")
    tracker.returned(pika.BasicProperties(), "NO_ROUTE")


def test_the_sweep_fails_a_message_only_while_the_broker_confirms_nothing():
    tracker, clock, log = _tracker(timeout=30.0)
    slow, later = _message("silo-a"), _message("silo-b")
    tracker.track(slow)
    # The broker works through a backlog: it confirmed something 10 s ago.
    clock.now += 35
    tracker.track(_message("silo-c"))
    tracker.confirmed(2, multiple=False, acked=True)
    clock.now += 10
    tracker.sweep()
    assert not slow.future.done() and log.warnings == []
    assert tracker.trouble() is None
    tracker.track(later)
    # Then nothing for longer than the timeout: what waited that long fails.
    clock.now += 25
    waiter = _settled(tracker)
    tracker.sweep()
    with pytest.raises(BrokerError, match=r"not confirmed a message for flaap\.tasks/silo-a"):
        slow.future.result(0)
    assert not later.future.done(), "sent 25 s after: not overdue yet"
    assert log.warnings == [("publish_not_confirmed", {"messages": 1, "timeout_s": 30.0})]
    assert "confirmed nothing for 30 s" in tracker.trouble("silo-a")
    assert tracker.trouble("silo-b") is None
    assert tracker.trouble() == tracker.trouble("silo-a")
    assert not waiter.done()
    # A late ack of the failed message settles nothing twice; an ack of a
    # message to that key clears the trouble.
    tracker.confirmed(1, multiple=False, acked=True)
    tracker.track(retry := _message("silo-a"))
    tracker.confirmed(4, multiple=False, acked=True)
    assert retry.future.result(0) is None
    assert tracker.trouble("silo-a") is None
    tracker.confirmed(3, multiple=False, acked=True)
    assert later.future.result(0) is None
    assert waiter.result(0) is None


def test_a_trouble_is_forgotten_on_a_new_channel():
    tracker, clock, _ = _tracker(timeout=1.0)
    tracker.track(_message())
    clock.now += 2
    tracker.sweep()
    assert tracker.trouble("silo-a")
    tracker.channel_opened()
    assert tracker.trouble() is None
    assert tracker.track(_message()) == 1, "delivery tags start again at 1"


def test_a_lost_channel_sends_the_unconfirmed_again_first_and_in_order():
    tracker, _, _ = _tracker()
    queued = _message("queued")
    tracker.queue(queued)
    assert tracker.next_queued() is queued and tracker.next_queued() is None
    tracker.queue(queued)
    sent = [_message(str(i)) for i in range(3)]
    for out in sent:
        tracker.track(out)
    tracker.returned(sent[0].properties, "NO_ROUTE")
    waiter = _settled(tracker)
    tracker.requeue_unconfirmed(max_message_bytes=100)
    assert not tracker.awaiting_confirm and not waiter.done()
    assert [tracker.next_queued() for _ in range(4)] == [*sent, queued]
    assert sent[0].returned is None, "a return on the lost channel is forgotten"
    tracker.channel_opened()
    assert [tracker.track(out) for out in sent] == [1, 2, 3]


def test_a_lost_channel_fails_what_is_over_the_size_limit():
    tracker, _, _ = _tracker()
    small, large = _message(body=b"x"), _message(body=b"x" * 50)
    tracker.track(small)
    tracker.track(large)
    tracker.requeue_unconfirmed(max_message_bytes=10)
    with pytest.raises(MessageTooLarge, match="over its limit of 10 bytes"):
        large.future.result(0)
    assert tracker.next_queued() is small and tracker.next_queued() is None


def test_a_message_that_never_went_out_gives_its_tag_back():
    tracker, _, _ = _tracker()
    first, unsendable, next_one = _message(), _message(), _message()
    tracker.track(first)
    tag = tracker.track(unsendable)
    tracker.untrack(tag)
    assert tracker.track(next_one) == tag
    tracker.confirmed(tag, multiple=True, acked=True)
    assert first.future.done() and next_one.future.done() and not unsendable.future.done()


def test_a_lost_link_fails_everything_and_wakes_the_settled_waiters():
    tracker, _, _ = _tracker()
    queued, sent, done = _message(), _message(), _message()
    done.future.set_result(None)
    tracker.queue(queued)
    tracker.track(sent)
    tracker.track(done)
    waiter = _settled(tracker)
    assert not waiter.done()
    tracker.fail_all(LinkClosed("closed"))
    for out in (queued, sent):
        with pytest.raises(LinkClosed):
            out.future.result(0)
    assert done.future.result(0) is None
    assert waiter.result(0) is None
    assert tracker.next_queued() is None and not tracker.awaiting_confirm
    # Nothing pending: a new waiter resolves at once.
    assert _settled(tracker).result(0) is None


def test_a_window_hands_messages_on_in_order_while_confirms_race_the_caller():
    """A confirm arriving (on another thread) while the caller still makes message i
    must not send message i + 1 first: the receiver puts slices together in order."""
    handed_on: list[int] = []
    confirmer = concurrent.futures.ThreadPoolExecutor(1)  # the link's I/O thread

    def publish(index: int) -> concurrent.futures.Future[None]:
        if index == 2:
            time.sleep(0.2)  # making a large slice; message 0's confirm arrives meanwhile
        handed_on.append(index)
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        confirmer.submit(future.set_result, None)
        return future

    try:
        confirmed_in_window(publish, 10, 4).result(timeout=10)
    finally:
        confirmer.shutdown()
    assert handed_on == list(range(10))
