"""The coordinator's outbox: which tasks travel together, in what order, and when (fake link)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any

import pytest

from flaap_mq.coordinator import outbox as outbox_module
from flaap_mq.coordinator import publish
from flaap_mq.coordinator.outbox import Outbox
from flaap_mq.protocol import amqp, batch, envelope
from flaap_mq.protocol.v1 import tff_executor_pb2 as light


class FakeLink:
    """Records each message published; each publish's confirm is settled by the test."""

    max_message_bytes = 128 * 1024 * 1024

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, Any]] = []
        self.confirms: list[concurrent.futures.Future[None]] = []
        self.on_publish: Any = None

    def publish(self, exchange, routing_key, body, properties):
        if self.on_publish is not None:  # before the message is out, as an allocation could
            self.on_publish()
        self.messages.append((routing_key, body, properties))
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.confirms.append(future)
        return future

    def task_ids(self, index: int) -> list[str]:
        """The task ids message `index` carries, in order."""
        _, body, properties = self.messages[index]
        if properties.type == amqp.BATCH_TYPE:
            return [task.task_id for task, _ in batch.read_batch(body)]
        return [envelope.read_task(body)[0].task_id]


@pytest.fixture
def link() -> FakeLink:
    return FakeLink()


@pytest.fixture
def outbox(link: FakeLink) -> Outbox:
    return Outbox(link, "flaap.tasks", chunk_bytes=1024 * 1024)  # type: ignore[arg-type]


def _out(task_id: str, *, reply: bool = False, silo: str = "a", size: int = 10):
    if reply:
        request = light.ComputeRequest(value_ref=light.ValueRef(id="v"))
    else:
        request = light.CreateValueRequest(value=b"\x01" * size)
    return publish.outgoing(
        envelope.serialized(request),
        job_id="job-1",
        silo_id=silo,
        task_id=task_id,
        timeout_s=60,
        incarnation="i1",
        reply=reply,
    )


def test_one_way_tasks_go_with_the_awaited_task_in_one_message_in_order(outbox, link):
    async def chain() -> list[concurrent.futures.Future[None]]:
        first = outbox.send(_out("v1"))
        second = outbox.send(_out("v2"))
        assert link.messages == []  # held
        outbox.send(_out("c1", reply=True))
        return [first, second]

    held = asyncio.run(chain())
    assert len(link.messages) == 1
    assert link.task_ids(0) == ["v1", "v2", "c1"]
    properties = link.messages[0][2]
    assert (properties.type, properties.reply_to, properties.correlation_id) == (
        amqp.BATCH_TYPE,
        "job-1",
        "c1",
    )
    assert not any(f.done() for f in held)
    link.confirms[0].set_result(None)
    assert all(f.done() and f.exception() is None for f in held)


def test_held_tasks_go_by_themselves_after_the_linger(outbox, link):
    async def one_way_only() -> None:
        outbox.send(_out("v1"))
        outbox.send(_out("v2"))
        await asyncio.sleep(outbox_module.LINGER_S * 4)

    asyncio.run(one_way_only())
    assert [link.task_ids(i) for i in range(len(link.messages))] == [["v1", "v2"]]
    assert link.messages[0][2].reply_to is None  # nobody awaits a one-way batch


def test_a_lone_held_task_goes_as_a_plain_task(outbox, link):
    async def one() -> None:
        outbox.send(_out("v1"))
        await asyncio.sleep(outbox_module.LINGER_S * 4)

    asyncio.run(one())
    assert link.messages[0][2].type == "CreateValue"
    assert link.task_ids(0) == ["v1"]


def test_a_send_without_a_running_loop_goes_at_once_after_what_is_held(outbox, link):
    # A value finalizer on the garbage collector's thread, say.
    async def hold() -> None:
        outbox.send(_out("v1"))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(hold())  # held; the loop stops before the linger
        thread = threading.Thread(target=lambda: outbox.send(_out("d1")))
        thread.start()
        thread.join(5)
    finally:
        loop.close()
    assert [link.task_ids(i) for i in range(len(link.messages))] == [["v1", "d1"]]


def test_a_large_task_goes_alone_after_what_is_held(outbox, link):
    big = outbox_module.BATCHED_REQUEST_BYTES + 1

    async def chain() -> None:
        outbox.send(_out("v1"))
        outbox.send(_out("big", size=big))
        outbox.send(_out("c1", reply=True))

    asyncio.run(chain())
    assert [link.task_ids(i) for i in range(len(link.messages))] == [["v1"], ["big"], ["c1"]]


def test_a_batch_never_outgrows_its_task_count_or_bytes(outbox, link):
    async def many() -> None:
        for i in range(batch.MAX_BATCH_TASKS + 2):
            outbox.send(_out(f"v{i}"))
        outbox.send(_out("c1", reply=True))

    asyncio.run(many())
    counts = [len(link.task_ids(i)) for i in range(len(link.messages))]
    assert counts == [batch.MAX_BATCH_TASKS, 3]
    link.messages.clear()

    size = outbox_module.BATCHED_REQUEST_BYTES - 200
    per_batch = outbox.max_bytes // _out("x", size=size).size

    async def large() -> None:
        for i in range(per_batch + 1):
            outbox.send(_out(f"w{i}", size=size))
        outbox.flush()

    asyncio.run(large())
    assert [len(link.task_ids(i)) for i in range(len(link.messages))] == [per_batch, 1]
    assert all(len(body) <= outbox.max_bytes for _, body, _ in link.messages)


def test_a_batch_the_broker_refused_fails_each_held_task(outbox, link):
    async def chain() -> list[concurrent.futures.Future[None]]:
        held = outbox.send(_out("v1"))
        asked = outbox.send(_out("c1", reply=True))
        return [held, asked]

    held, asked = asyncio.run(chain())
    link.confirms[0].set_exception(RuntimeError("nacked"))
    assert isinstance(held.exception(), RuntimeError)
    assert asked.exception() is held.exception()


@pytest.mark.parametrize("on_a_loop", [True, False])
def test_a_disposal_sent_while_publishing_never_overtakes_it(outbox, link, on_a_loop):
    """A finalizer runs on whatever thread drops the last reference: here, mid-publish.

    Published at once, the disposal would overtake the Create* task being
    published, and leave its value behind in the silo's executor. It waits
    for the linger (on a loop) or the next message (on a thread without one).
    """
    fired = []

    def finalizer() -> None:
        if not fired:
            fired.append(True)
            outbox.send(_out("d1"))

    def chain() -> None:
        link.on_publish = finalizer
        outbox.send(_out("v1"))  # no loop: goes at once
        link.on_publish = None

    async def chain_on_a_loop() -> None:
        outbox.send(_out("v0"))
        link.on_publish = finalizer
        outbox.send(_out("c1", reply=True))
        link.on_publish = None
        await asyncio.sleep(outbox_module.LINGER_S * 4)

    if on_a_loop:
        asyncio.run(chain_on_a_loop())
        expected = [["v0", "c1"], ["d1"]]
    else:
        chain()
        assert [link.task_ids(i) for i in range(len(link.messages))] == [["v1"]]
        outbox.flush()  # the next message takes it
        expected = [["v1"], ["d1"]]
    assert [link.task_ids(i) for i in range(len(link.messages))] == expected


def test_silos_are_held_apart_and_close_sends_what_is_left(outbox, link):
    async def both() -> None:
        outbox.send(_out("a1", silo="a"))
        outbox.send(_out("b1", silo="b"))
        outbox.send(_out("a2", silo="a"))
        outbox.close()

    asyncio.run(both())
    sent = {link.messages[i][0]: link.task_ids(i) for i in range(len(link.messages))}
    assert sent == {"a": ["a1", "a2"], "b": ["b1"]}


async def _send_on_loop(outbox: Outbox, out: Any) -> concurrent.futures.Future[None]:
    return outbox.send(out)


def test_a_disposal_from_a_thread_without_a_loop_joins_a_chain_held_on_a_loop(outbox, link):
    """The garbage collector's thread disposes of a value while a chain is held on
    a running loop. Sent at once, the disposal would take the chain's Create*
    tasks with it and leave its Compute to go alone; it joins them instead, and
    goes with the Compute, or at the loop's linger if no awaited task comes."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(out: Any) -> None:
        asyncio.run_coroutine_threadsafe(_send_on_loop(outbox, out), loop).result(5)

    try:
        on_loop(_out("v0"))
        outbox.send(_out("d1"))  # this thread has no loop
        assert link.messages == []
        on_loop(_out("c1", reply=True))
        assert [link.task_ids(i) for i in range(len(link.messages))] == [["v0", "d1", "c1"]]

        on_loop(_out("v2"))
        outbox.send(_out("d2"))
        assert len(link.messages) == 1
        deadline = time.monotonic() + 5
        while len(link.messages) < 2 and time.monotonic() < deadline:
            time.sleep(outbox_module.LINGER_S)
        assert [link.task_ids(i) for i in range(len(link.messages))][1:] == [["v2", "d2"]]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
