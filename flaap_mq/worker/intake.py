"""Intake: what the worker does with a delivery on the link's I/O thread.

Each delivery becomes a `TaskRequest`. Its envelope is read here (the
request stays a view of the body), so that a slice of a large task is told
by its `Chunk`, as the coordinator tells its replies, and written here, in
delivery order, into its task's one buffer (hashed on the way; the message
is not kept); only a whole task goes on to the pool, which makes the
`bytes` the executor's gRPC call needs from that buffer. A Create* task's
value is announced here, in delivery order, before any later task can name
it, and each task gets its place in delivery order (`InFlight`), which a
disposal waits on. All of it is quick: the I/O thread
must hand the work off and return.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import structlog

from flaap_mq.broker.link import Delivery
from flaap_mq.protocol import amqp, batch, chunking, collector, envelope
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.worker.pipeline import Payload
from flaap_mq.worker.request import Replies, TaskRequest
from flaap_mq.worker.values import ValueTable

# A task read from its message(s), request apart; or why its message is unreadable.
Read = tuple[task_pb2.Task, Payload]
Received = Read | envelope.MalformedEnvelope


class InFlight:
    """Delivery sequence numbers of the tasks handed to the pool and not yet finished."""

    def __init__(self) -> None:
        self._sequences: set[int] = set()
        self._changed = threading.Condition()
        self._next = itertools.count()

    def __len__(self) -> int:
        return len(self._sequences)

    def enter(self) -> int:
        """A new task's sequence number, later than every one before it."""
        sequence = next(self._next)
        with self._changed:
            self._sequences.add(sequence)
        return sequence

    def leave(self, sequence: int) -> None:
        with self._changed:
            self._sequences.discard(sequence)
            self._changed.notify_all()

    def wait_for_earlier(self, sequence: int, deadline: float | None) -> bool:
        """Waits until every task delivered before `sequence` has finished.

        False at the monotonic `deadline`. A disposal must not overtake a
        task sent before it, which may still be about to use the value (or
        executor) disposed of. Those tasks only ever wait for tasks
        delivered before them, so this cannot deadlock.
        """
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        with self._changed:
            return self._changed.wait_for(
                lambda: all(s >= sequence for s in self._sequences), timeout
            )


# A task entered for the pool: its request, its place in delivery order, and
# what was received (the task read from its message(s), or the
# `MalformedEnvelope` that says why the message could not be read, which
# the pool refuses with that reason).
Entry = tuple[TaskRequest, int, Received]


class Intake:
    """Turns each delivery into the entries it holds, handed to `submit(entries)`.

    A message holds one task; a batch one per task, in the batch's order,
    which the pool runs in that order, one after another: a batch is a
    chain, each task naming values the ones before it make, so running them
    side by side would only have them wait for each other (a thread
    handed the GIL per step: up to 1 ms per tiny invocation).
    """

    def __init__(
        self,
        *,
        replies: Replies,
        submit: Callable[[list[Entry]], object],
        collector: collector.Collector,
        values: ValueTable,
        in_flight: InFlight,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self._replies = replies
        self._submit = submit
        self._collector = collector
        self._values = values
        self._in_flight = in_flight
        self._log = log
        self._active_generation = -1  # channel generation of the first task seen

    def on_delivery(self, delivery: Delivery) -> None:
        """Runs on the I/O thread: hand the task(s) to the pool and return."""
        if delivery.generation != self._active_generation:
            self._active_generation = delivery.generation
            self._log.info("worker_active", detail="this worker now receives the silo's tasks")
        self._collector.expire()
        if delivery.properties.type == amqp.BATCH_TYPE:
            self._on_batch(delivery)
            return
        request = TaskRequest(delivery, self._replies)
        try:
            received: Received = envelope.read_task(delivery.body)
        except envelope.MalformedEnvelope as e:
            received = e  # refused by the pool, with the reason
        else:
            if chunking.is_chunked(received[0].chunk):
                received = self._collect_slice(request, *received)
                if received is None:
                    return
        self._submit([self._enter(request, received)])

    def _on_batch(self, delivery: Delivery) -> None:
        """Each task of a batch becomes a request, entered in the batch's order."""
        try:
            tasks = batch.read_batch(delivery.body)
        except envelope.MalformedEnvelope as e:
            self._submit([self._enter(TaskRequest(delivery, self._replies), e)])
            return
        requests = TaskRequest.for_batch(delivery, self._replies, [task for task, _ in tasks])
        self._submit(
            [self._enter(request, read) for request, read in zip(requests, tasks, strict=True)]
        )

    def _enter(self, request: TaskRequest, received: Received) -> Entry:
        """Announces the value the task makes and gives the task its place.

        Announced in delivery order, before any later task can name it; a
        sliced task once its last slice is in, so that slices that never
        make a whole leave nothing behind (the coordinator sends every slice
        of a task before any task that names its value). A Create* task is
        known by its kind, or by its AMQP `type` if its envelope cannot be
        read: that one is announced too, and its failure then reaches the
        tasks that name its value.
        """
        if isinstance(received, tuple):
            spec = envelope.KINDS.get(received[0].kind)
        else:
            spec = envelope.spec_named(request.properties.type)
        if spec is not None and spec.creates_value and request.message_id:
            self._values.announce(request.message_id)
        return request, self._in_flight.enter(), received

    def _collect_slice(
        self, request: TaskRequest, task: task_pb2.Task, payload: memoryview
    ) -> Read | None:
        """Stores one slice of a large task; the task and all its slices once complete.

        Slices before the last are acked once stored (`TaskRequest.slice_stored`).
        The collector bounds what coordinators' slices can make this process
        hold (`collector.Limits`, `--max-pending-transfer-bytes`), and drops a
        partial task at its deadline. A task refused there (declared too
        large, slices that lie) is answered CHUNK_INVALID like any bad slices.
        """
        try:
            parts = self._collector.add(
                task.task_id,
                task.chunk,
                payload,
                expires_at=collector.monotonic_deadline(task.deadline_unix_ms),
            )
        except chunking.ChunkError as e:
            task.ClearField("chunk")
            return task, e  # answered CHUNK_INVALID by the pool, like any task
        if parts is None:
            request.slice_stored()
            return None
        task.ClearField("chunk")
        return task, parts
