"""A hostile peer's slices cannot grow a worker's or a coordinator's memory past its bound.

A raw pika client plays a hostile coordinator (crafted slices published to a
real worker's silo queue) or a hostile silo (crafted slices published to a
`TaskClient`'s reply queue) and tries every way it has to make the other side
hold memory: payload fields repeated inside one message, declared totals
over the limit, partial transfers never finished, slices for other tasks.
The receiving process's RSS is sampled throughout; ordinary chunked traffic
must still work afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pika
import psutil
import pytest
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import placements

from flaap_mq.coordinator import errors
from flaap_mq.coordinator.task_client import TaskClient
from flaap_mq.protocol import chunking, collector, envelope, topology, wire
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.testing import messages
from flaap_mq.testing.raw_peer import RawPeer

MiB = 1024 * 1024
# The receiver's stated bound on what chunked transfers may hold
# (`--max-pending-transfer-bytes`, `Limits.max_pending_bytes`), and the
# largest transfer it takes (`--max-transfer-bytes`, `max_transfer_bytes`).
BOUND = 32 * MiB
MAX_TRANSFER = 16 * MiB
# What the process may hold beyond the bound while attacked: the messages
# in flight through pika (each body, and its frames while it is read) and
# the allocator's slack. The worker, correct, grew 63 to 92 MiB here
# (2026-11-30: 63-76 run alone, 84 and 92 after the parallel phase), so 48 MiB
# proved too tight; an unbounded collector would add some 140 MiB (what the
# attacks below try to pin), far over this.
SLACK = 72 * MiB
LIMITS = collector.Limits(max_transfer_bytes=MAX_TRANSFER, max_pending_bytes=BOUND)

# serial: both tests measure a process's resident memory while it is
# attacked; how many messages pika holds in flight at once depends on how
# fast the attacked process reads, and beside other tests it reads slower
# (make test runs serial tests alone, before the rest).
pytestmark = pytest.mark.serial

_TASK_PAYLOAD = task_pb2.Task.DESCRIPTOR.fields_by_name["request"].number
_RESULT_PAYLOAD = task_pb2.TaskResult.DESCRIPTOR.fields_by_name["response"].number


class RssPeak:
    """The peak RSS of a process above its RSS at the start, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def crafted(
    message: task_pb2.Task | task_pb2.TaskResult,
    chunk: task_pb2.Chunk,
    payload_fields: list[bytes],
) -> bytes:
    """`message` as one slice, its payload field written as `payload_fields` (last wins)."""
    piece = type(message)()
    piece.CopyFrom(message)
    piece.chunk.CopyFrom(chunk)
    number = _TASK_PAYLOAD if isinstance(message, task_pb2.Task) else _RESULT_PAYLOAD
    key = wire.varint(number << 3 | 2)
    return b"".join(
        [piece.SerializeToString(), *(key + wire.varint(len(f)) + f for f in payload_fields)]
    )


def declared(count: int, total_size: int, seed: bytes = b"") -> task_pb2.Chunk:
    """The first slice's header of a transfer that claims `count` slices, `total_size` bytes."""
    digest = hashlib.sha256(seed or uuid.uuid4().bytes).digest()
    return task_pb2.Chunk(index=0, count=count, sha256=digest, total_size=total_size)


# The AMQP header flaap-mq labels slices with; receivers go by the envelope,
# but a hostile sender labels its slices too.
SLICE = chunking.headers(0, 2)


def repeated_payload_body(message: task_pb2.Task | task_pb2.TaskResult) -> bytes:
    """An 8 MiB message whose slice is 4 bytes: 8 payload fields of 1 MiB, then the slice."""
    return crafted(message, declared(2, 8), [bytes(MiB)] * 8 + [b"four"])


def _get_executor_request() -> executor_pb2.GetExecutorRequest:
    return executor_pb2.GetExecutorRequest(
        cardinalities=value_serialization.serialize_cardinalities({placements.CLIENTS: 1})
    )


# ------------------------------------------------------------ hostile coordinator


class HostileCoordinator(RawPeer):
    """Publishes crafted tasks to silo a's queue; reads the worker's answers."""

    job_label = "hostile"

    def task(self, task_id: str, kind: int, **fields: object) -> task_pb2.Task:
        fields.setdefault("deadline_unix_ms", envelope.deadline_after(60))
        return envelope.task_envelope(
            kind=kind,
            job_id=self.job_id,
            silo_id="a",
            task_id=task_id,
            **fields,  # type: ignore[arg-type]
        )

    def send(
        self,
        body: bytes,
        task: task_pb2.Task,
        *,
        reply: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.channel.basic_publish(
            self.names.tasks_exchange,
            "a",
            body,
            pika.BasicProperties(
                delivery_mode=2,
                correlation_id=task.task_id,
                message_id=task.task_id,
                reply_to=self.job_id if reply else None,
                type=envelope.kind_name(task.kind),
                headers=headers,
            ),
            mandatory=True,
        )

    def replies(self, count: int, timeout_s: float = 60.0) -> dict[str, task_pb2.TaskResult]:
        """The next `count` replies, by task id."""
        found: dict[str, task_pb2.TaskResult] = {}
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            method, _, body = self.channel.basic_get(
                self.names.reply_queue(self.job_id), auto_ack=True
            )
            if method is None:
                time.sleep(0.05)
                continue
            result = messages.parse_result(body)
            found[result.task_id] = result
        assert len(found) == count, f"{len(found)} of {count} replies: {found}"
        return found

    def get_executor(self) -> tuple[executor_pb2.ExecutorId, str]:
        task = self.task(uuid.uuid4().hex, envelope.RequestKind.GET_EXECUTOR)
        [body] = envelope.encode_task(task, _get_executor_request().SerializeToString(), MiB)
        self.send(body, task)
        [result] = self.replies(1).values()
        assert result.WhichOneof("outcome") == "response", result.error.message
        response = executor_pb2.GetExecutorResponse.FromString(result.response)
        return response.executor, result.worker_incarnation

    def round_trip(self, value: np.ndarray) -> np.ndarray:
        """`value` to the silo as a chunked CreateValue (1 MiB slices), and back by Compute."""
        executor, incarnation = self.get_executor()
        name = uuid.uuid4().hex
        proto, _ = value_serialization.serialize_value(
            value, tff.TensorType(value.dtype, value.shape)
        )
        request = executor_pb2.CreateValueRequest(executor=executor, value=proto)
        task = self.task(name, envelope.RequestKind.CREATE_VALUE, incarnation=incarnation)
        messages = envelope.encode_task(task, request.SerializeToString(), MiB)
        assert len(messages) > 1
        for i, message in enumerate(messages):
            self.send(message, task, reply=False, headers=chunking.headers(i, len(messages)))
        compute = self.task(uuid.uuid4().hex, envelope.RequestKind.COMPUTE, incarnation=incarnation)
        ask = executor_pb2.ComputeRequest(
            executor=executor, value_ref=executor_pb2.ValueRef(id=name)
        )
        [body] = envelope.encode_task(compute, ask.SerializeToString(), 64 * MiB)
        self.send(body, compute)
        [result] = self.replies(1).values()
        assert result.WhichOneof("outcome") == "response", result.error.message
        response = executor_pb2.ComputeResponse.FromString(result.response)
        back, _ = value_serialization.deserialize_value(response.value)
        return back


@pytest.fixture
def hostile_coordinator(broker_url, prefix, workers):
    fleet = workers(
        ["a"],
        extra_args=[
            "--max-pending-transfer-bytes",
            str(BOUND),
            "--max-transfer-bytes",
            str(MAX_TRANSFER),
        ],
    )
    peer = HostileCoordinator(broker_url, prefix)
    yield peer, fleet.workers["a"]
    peer.close()


def test_a_hostile_coordinator_cannot_grow_a_worker_past_its_bound(hostile_coordinator):
    peer, worker = hostile_coordinator
    value = np.arange(1024 * 1024, dtype=np.float32)  # a 4 MiB request, in 5 slices
    np.testing.assert_array_equal(peer.round_trip(value), value)  # warms the worker up
    refused: dict[str, str] = {}  # task id -> what its CHUNK_INVALID answer must say
    create = envelope.RequestKind.CREATE_VALUE
    deadline = envelope.deadline_after(6)  # of the partial transfers left behind
    with RssPeak(worker.pid) as rss:
        # 1. Payload field repeated: 8 messages of 8 MiB, each for a 4-byte slice
        #    (64 MiB pinned, 32 bytes counted, before).
        for _ in range(8):
            task = peer.task(uuid.uuid4().hex, create)
            peer.send(repeated_payload_body(task), task, headers=SLICE)
            refused[task.task_id] = "payload written more than once"
        # 2. Declared totals over the limits.
        for chunk, says in (
            (declared(2, 2**40), "declares a payload of 1099511627776 bytes"),
            (declared(10**6, MiB), "declares 1000000 chunks"),
        ):
            task = peer.task(uuid.uuid4().hex, create)
            peer.send(crafted(task, chunk, [bytes(MiB)]), task, headers=SLICE)
            refused[task.task_id] = says
        # 3. Partial transfers never finished: two of 15 MiB, 14 slices sent
        #    each, interleaved (30 MiB charged, 28 MiB written, until their
        #    deadline); a third does not fit beside them.
        partials = [
            (peer.task(uuid.uuid4().hex, create, deadline_unix_ms=deadline), declared(16, 15 * MiB))
            for _ in range(3)
        ]
        for index in range(14):
            for task, chunk in partials[:2]:
                chunk.index = index
                peer.send(crafted(task, chunk, [bytes(MiB)]), task, headers=SLICE)
        task, chunk = partials[2]
        peer.send(crafted(task, chunk, [bytes(MiB)]), task, headers=SLICE)
        refused[task.task_id] = "does not fit in what this receiver holds"
        # 4. Middle slices of transfers that never began: 32 MiB, all ignored.
        for _ in range(32):
            task = peer.task(uuid.uuid4().hex, create)
            chunk = declared(4, 4 * MiB)
            chunk.index = 1
            peer.send(crafted(task, chunk, [bytes(MiB)]), task, headers=SLICE)
        answers = peer.replies(len(refused))
    for task_id, says in refused.items():
        error = answers[task_id].error
        assert error.code == envelope.ErrorCode.CHUNK_INVALID, error
        assert error.retryable
        assert says in error.message
    print(f"\nworker RSS while attacked: +{rss.growth / MiB:.1f} MiB at most")
    assert rss.growth < BOUND + SLACK
    # The partials are charged 30 MiB: a 4 MiB transfer fits again only once
    # they have expired at their task's deadline.
    time.sleep(max(0.0, deadline / 1000 - time.time()) + 0.5)
    np.testing.assert_array_equal(peer.round_trip(value), value)


# ------------------------------------------------------------------ hostile silo


# How a hostile silo answers a task: the reply messages, made one at a time
# (so that the attacker's own buffers do not count as the coordinator's).
Answer = Callable[[task_pb2.Task], Iterator[bytes]]


class HostileSilo:
    """Serves silo "evil" from a thread: answers each task with the next of `answers`."""

    def __init__(self, broker_url: str, names: topology.Names) -> None:
        self.names = names
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._tasks: Iterator | None = None

    def serve(self, answers: list[Answer]) -> None:
        """Answers the next `len(answers)` tasks, in arrival order, on a thread."""

        def run() -> None:
            try:
                for answer in answers:
                    task, reply_to = self._next_task()
                    for body in answer(task):
                        self.publish(body, reply_to, task.task_id)
            except BaseException as e:  # surfaced by the test
                self.errors.append(e)

        self.wait()  # one thread at a time on the connection
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join(60)

    def _next_task(self) -> tuple[task_pb2.Task, str]:
        # A consumer, as a worker is: a single-active-consumer queue refuses basic.get.
        if self._tasks is None:
            self._tasks = self.channel.consume(
                self.names.silo_queue("evil"), auto_ack=True, inactivity_timeout=30
            )
        method, properties, body = next(self._tasks)
        if method is None:
            raise TimeoutError("no task for silo evil")
        return messages.parse_task(body), properties.reply_to

    def publish(self, body: bytes, reply_to: str, correlation_id: str) -> None:
        self.channel.basic_publish(
            self.names.replies_exchange,
            reply_to,
            body,
            pika.BasicProperties(correlation_id=correlation_id),
            mandatory=True,
        )

    def close(self) -> None:
        self.wait()
        self.connection.close()


def _result(task: task_pb2.Task, task_id: str | None = None) -> task_pb2.TaskResult:
    result = envelope.result_ok(task, None, incarnation="evil", duration_us=1)
    if task_id is not None:
        result.task_id = task_id
    return result


def honest(response_bytes: int) -> Answer:
    """A GetExecutor answer whose executor id is `response_bytes` long, in 1 MiB slices."""

    def answer(task: task_pb2.Task) -> Iterator[bytes]:
        response = executor_pb2.GetExecutorResponse(
            executor=executor_pb2.ExecutorId(id="x" * response_bytes)
        )
        yield from envelope.encode_result(_result(task), response.SerializeToString(), MiB)

    return answer


def mismatched(task: task_pb2.Task) -> Iterator[bytes]:
    """First slices (1.75 MiB messages) under the call's correlation id for 16 other
    task ids, which would each start a transfer if a body's task id were believed;
    then the honest answer."""
    for _ in range(16):
        other = _result(task, uuid.uuid4().hex)
        yield crafted(other, declared(2, 2 * MiB), [bytes(256 * 1024)] * 3 + [bytes(MiB)])
    yield from honest(100)(task)


def repeated(task: task_pb2.Task) -> Iterator[bytes]:
    yield repeated_payload_body(_result(task))


def oversized(task: task_pb2.Task) -> Iterator[bytes]:
    yield crafted(_result(task), declared(2, 2**40), [bytes(MiB)])


def unfinished(slices: int) -> Answer:
    """The first `slices` of a 16 MiB transfer, never the rest."""

    def answer(task: task_pb2.Task) -> Iterator[bytes]:
        chunk = declared(16, 16 * MiB)
        for index in range(slices):
            chunk.index = index
            yield crafted(_result(task), chunk, [bytes(MiB)])

    return answer


@pytest.fixture
def hostile_silo(broker_url, prefix):
    names = topology.Names(prefix)
    client = TaskClient(broker_url, ["evil"], names=names, chunk_limits=LIMITS)
    client.start()
    silo = HostileSilo(broker_url, names)
    yield client, silo
    silo.close()
    client.close()


def test_a_hostile_silo_cannot_grow_the_coordinator_past_its_bound(hostile_silo):
    client, silo = hostile_silo
    request = _get_executor_request()

    async def ask(timeout_s: float = 30.0) -> executor_pb2.GetExecutorResponse:
        answer = await client.ask("evil", request, timeout_s=timeout_s)
        return answer.response

    async def attack() -> None:
        # Slices whose body names another task never reach the call: it gets
        # the honest answer sent after them.
        silo.serve([mismatched])
        assert (await ask()).executor.id == "x" * 100
        silo.serve([repeated, oversized])
        with pytest.raises(errors.SiloRetryableError, match="payload written more than once"):
            await ask()
        with pytest.raises(errors.SiloRetryableError, match="declares a payload of 1099511627776"):
            await ask()
        # Three calls at once, 15 MiB of a 16 MiB transfer each: one transfer
        # per call, the three together refused past the bound; each dropped
        # when its call times out.
        silo.serve([unfinished(15)] * 3)
        outcomes = await asyncio.gather(
            *(ask(timeout_s=4) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, errors.SiloError) for o in outcomes), outcomes
        assert any("does not fit" in str(o) for o in outcomes), outcomes
        assert any(isinstance(o, errors.SiloTimeoutError) for o in outcomes), outcomes

    with RssPeak(os.getpid()) as rss:
        asyncio.run(attack())
    silo.wait()
    assert not silo.errors, silo.errors
    assert client.transfer_bytes == 0  # every call's transfer went with it
    print(f"\ncoordinator RSS while attacked: +{rss.growth / MiB:.1f} MiB at most")
    assert rss.growth < BOUND + SLACK
    # Ordinary chunked traffic still works.
    silo.serve([honest(12 * MiB)])
    response = asyncio.run(client.ask("evil", request, timeout_s=30)).response
    assert len(response.executor.id) == 12 * MiB
    assert client.transfer_bytes == 0
