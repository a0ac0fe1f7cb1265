"""One task's fate: its reply, refusal or dead-lettering, and its delivery's ack.

A `TaskRequest` is made for each task as its delivery arrives (`intake`),
and, through the delivery's `DeliveryFate`, is the only thing that settles
the delivery with the broker. A delivery carries one task, or a batch of
them (`batch.read_batch`): then each task has its request, and the
delivery is settled once every one of them is, as the gravest of their
verdicts says (`Verdict`): a batch is acked only when all its tasks are
done. The ack policy, all of it:

* a slice of a large task, not the last: acked once stored
  (`slice_stored`);
* an unreadable envelope (`MALFORMED`): answered MALFORMED_TASK if it names
  a `reply_to` and a `correlation_id`, and rejected, so that the broker
  dead-letters it, once that answer is settled either way;
* refused (`OutcomeKind.refused`: another protocol version, another silo's
  task, a malformed task): answered with its error if it has a `reply_to`,
  and rejected likewise;
* past its deadline (`EXPIRED`): rejected at once, not answered;
* with a `reply_to`: its result published, every slice, and the task acked
  once the broker confirmed them all, or once the reply proved unroutable
  (its coordinator is gone); not confirmed, it is requeued after a pause
  that doubles with each delivery (`REQUEUE_FIRST_PAUSE_S`), unless the
  worker is shutting down, whose closing channel requeues it;
* one-way (no `reply_to`; in a batch, every task but the last): acked at
  once; a failure is logged, and kept with the value the task should have
  made (`pipeline`);
* the worker failed handling it (`give_back`): requeued at once.

A batch redelivered is answered task by task from the results cache, not
run again.

A reject carries no headers, so the reason a task is rejected is in the
`task_dead_lettered` log line (with its message and correlation ids), not
in the dead letter; the silo's broker user needs no permission on the
dead-letter exchange (deploy/rabbitmq/README.md).

Why one module of some 420 lines: it is the whole ack policy above, and
the issue of the codebase (14) asked for that to read in one place.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import pika
import structlog

from flaap_mq.broker.link import (
    Delivery,
    Unroutable,
    confirmed_in_window,
    default_properties,
)
from flaap_mq.protocol import amqp, envelope
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.worker.outcome import Outcome, OutcomeKind

# A task whose reply the broker did not confirm (nacked: the coordinator's
# reply queue is over its max-length-bytes; or the link lost) goes back to the
# silo queue after this pause, doubled at each redelivery the queue counts
# (`x-delivery-count`), up to the cap: a full reply queue gets time to drain,
# and the task ends at its deadline or at the delivery limit, never spinning.
REQUEUE_FIRST_PAUSE_S = 1.0
REQUEUE_MAX_PAUSE_S = 30.0
# A sliced result's messages unconfirmed at once: a window of 4 slices
# (32 MiB at the default 8 MiB) keeps the broker busy while holding little.
REPLY_WINDOW = 4


def requeue_pause(delivery_count: int) -> float:
    """Seconds before a task whose reply was not confirmed goes back to its queue."""
    return min(REQUEUE_MAX_PAUSE_S, REQUEUE_FIRST_PAUSE_S * 2 ** min(delivery_count, 16))


class Link(Protocol):
    """What a request needs of the broker link (`BrokerLink`)."""

    def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: pika.spec.BasicProperties
    ) -> concurrent.futures.Future[None]: ...

    def ack(self, delivery: Delivery) -> None: ...

    def reject(self, delivery: Delivery, *, requeue: bool) -> None: ...


class ReplyCount:
    """How many replies are being published now; from any thread."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self._count > 0

    def add(self, change: int) -> None:
        with self._lock:
            self._count += change


@dataclasses.dataclass
class Replies:
    """What every request of one worker shares: where replies go, and the worker's state."""

    exchange: str
    # The worker's broker login, set as each reply's `user_id`: the broker
    # checks it, so the coordinator can trust which silo a result came from.
    user_id: str | None
    log: structlog.stdlib.BoundLogger
    # The worker has begun to shut down: a task is no longer requeued by
    # hand (closing the channel requeues it anyway).
    shutting_down: Callable[[], bool]
    # The worker stops at once: its link closed without acking what was in
    # flight, which the broker requeues.
    stopping_now: Callable[[], bool]
    link: Link | None = None  # set once the worker is connected
    # Replies still being published (a sliced one goes a window at a time,
    # `_reply`): a draining worker waits for them before it closes its link.
    replying: ReplyCount = dataclasses.field(default_factory=ReplyCount)


class Verdict(enum.IntEnum):
    """What a task asks for its delivery; a batch's delivery gets the gravest of its tasks'."""

    ACK = 0  # done: one-way and run, or its reply confirmed (or unroutable)
    REQUEUE_LATER = 1  # its reply was not confirmed: back to the queue after a pause
    DEAD_LETTER = 2  # unreadable, refused or expired: never worth a retry
    REQUEUE_NOW = 3  # the worker failed handling it
    LEFT = 4  # stopping at once: the closed link left it to the broker, which requeues it


class DeliveryFate:
    """Settles one delivery with the broker once each of its `tasks` has a verdict."""

    def __init__(self, delivery: Delivery, replies: Replies, tasks: int = 1) -> None:
        self._delivery = delivery
        self._replies = replies
        self._waiting = tasks
        self._verdict = Verdict.ACK
        self._lock = threading.Lock()

    def settle(self, verdict: Verdict) -> None:
        """One task's verdict; the last one settles the delivery."""
        with self._lock:
            self._verdict = max(self._verdict, verdict)
            self._waiting -= 1
            if self._waiting:
                return
            verdict = self._verdict
        link = self._replies.link
        if verdict is Verdict.ACK:
            link.ack(self._delivery)
        elif verdict is Verdict.DEAD_LETTER:
            link.reject(self._delivery, requeue=False)
        elif verdict is Verdict.REQUEUE_NOW:
            if link is not None:
                link.reject(self._delivery, requeue=True)
        elif verdict is Verdict.REQUEUE_LATER:
            timer = threading.Timer(self.requeue_pause(), self._requeue)
            timer.daemon = True
            timer.start()

    def requeue_pause(self) -> float:
        """The pause before a delivery whose reply was not confirmed goes back."""
        return requeue_pause(self.delivery_count())

    def delivery_count(self) -> int:
        """How often the silo queue delivered this task before (`x-delivery-count`)."""
        try:
            headers = self._delivery.properties.headers or {}
            return max(0, int(headers.get("x-delivery-count", 0)))
        except (TypeError, ValueError):
            return 0

    def _requeue(self) -> None:
        # A worker stopping meanwhile closes its channel, which requeues the
        # task anyway.
        link = self._replies.link
        if link is not None and not self._replies.shutting_down():
            try:
                link.reject(self._delivery, requeue=True)
            except Exception as e:  # the link closed under us: same as above
                self._replies.log.debug("requeue_skipped", error=str(e))


class TaskRequest:
    """One task of a delivery, from its arrival to its verdict; see the module docstring.

    A delivery of one task: `reply_to`, `correlation_id` and `message_id`
    are its AMQP properties. A task of a batch (`for_batch`): its own task id
    is its message and correlation id, and only the last has a `reply_to`.
    """

    def __init__(
        self,
        delivery: Delivery,
        replies: Replies,
        *,
        fate: DeliveryFate | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        message_id: str | None = None,
    ) -> None:
        self.delivery = delivery
        self._replies = replies
        self._log = replies.log
        self._fate = fate or DeliveryFate(delivery, replies)
        props = delivery.properties
        alone = fate is None
        self.reply_to = props.reply_to if alone else reply_to
        self.correlation_id = props.correlation_id if alone else correlation_id
        # The value a Create* task makes is named by it (checked by `pipeline`).
        self.message_id = props.message_id if alone else message_id

    @classmethod
    def for_batch(
        cls, delivery: Delivery, replies: Replies, tasks: list[task_pb2.Task]
    ) -> list[TaskRequest]:
        """A request for each task of a batch delivery, sharing its fate."""
        fate = DeliveryFate(delivery, replies, len(tasks))
        last = len(tasks) - 1
        return [
            cls(
                delivery,
                replies,
                fate=fate,
                reply_to=delivery.properties.reply_to if i == last else None,
                correlation_id=task.task_id,
                message_id=task.task_id,
            )
            for i, task in enumerate(tasks)
        ]

    @property
    def properties(self) -> pika.spec.BasicProperties:
        return self.delivery.properties

    def slice_stored(self) -> None:
        """A slice before the last is stored: ack it.

        Holding such slices unacked would stall the silo on its prefetch
        window. If this process dies before the last slice, the last one
        reaches the next worker without its predecessors, which answers
        CHUNK_INVALID (retryable) rather than running half a request.
        """
        self._fate.settle(Verdict.ACK)

    def settle(self, task: task_pb2.Task | None, outcome: Outcome) -> None:
        """Answers (or not), and gives the delivery this task's verdict, as `outcome` says.

        `task` is None only for an unreadable envelope (`MALFORMED`).
        """
        if outcome.kind is OutcomeKind.MALFORMED:
            answered = None
            if self.reply_to and self.correlation_id and outcome.messages:
                answered = self._publish(
                    outcome.messages[0], task_id=None, correlation_id=self.correlation_id
                )
            self._dead_letter(f"malformed: {outcome.value_error}", after=answered)
        elif outcome.kind is OutcomeKind.EXPIRED:
            self._dead_letter(outcome.value_error)
        elif outcome.kind.refused:
            self._refuse(task, outcome)
        elif self.reply_to:
            self._reply(task, outcome.messages)
        else:
            if outcome.failure is not None:
                self._log.warning(
                    "one_way_task_failed",
                    task_id=task.task_id,
                    kind=envelope.kind_name(task.kind),
                    error=outcome.value_error,
                )
            self._fate.settle(Verdict.ACK)

    def give_back(self) -> None:
        """The worker failed handling the task: back to the queue (and, after the
        delivery limit, to the dead-letter queue)."""
        self._fate.settle(Verdict.REQUEUE_NOW if self._replies.link is not None else Verdict.LEFT)

    # ------------------------------------------------------------------ answers

    def _publish(
        self,
        message: bytes,
        *,
        task_id: str | None,
        correlation_id: str | None,
        index: int = 0,
        count: int = 1,
    ) -> concurrent.futures.Future[None]:
        properties = amqp.result_properties(
            task_id=task_id,
            correlation_id=correlation_id,
            user_id=self._replies.user_id,
            index=index,
            count=count,
        )
        return self._replies.link.publish(
            self._replies.exchange,
            self.reply_to,
            message,
            default_properties(**properties),
        )

    def _reply(self, task: task_pb2.Task, messages: Sequence[bytes]) -> None:
        """Publishes the result's messages, `REPLY_WINDOW` unconfirmed at most.

        A large result's slices are made as they go (`envelope.Slices`), so
        the worker holds the result once and a few slices, here and in
        pika's buffers, not every slice at once.
        """
        correlation_id = self.correlation_id or task.task_id
        self._replies.replying.add(1)

        def publish(index: int) -> concurrent.futures.Future[None]:
            return self._publish(
                messages[index],
                task_id=task.task_id,
                correlation_id=correlation_id,
                index=index,
                count=len(messages),
            )

        def settled(done: concurrent.futures.Future[None]) -> None:
            try:
                self._on_reply_settled(done)
            finally:
                self._replies.replying.add(-1)

        confirmed_in_window(publish, len(messages), REPLY_WINDOW).add_done_callback(settled)

    def _refuse(self, task: task_pb2.Task, outcome: Outcome) -> None:
        """Answers a task no worker can run as sent, and has it dead-lettered."""
        answered = None
        if self.reply_to:
            answered = self._publish(
                outcome.messages[0],
                task_id=task.task_id,
                correlation_id=self.correlation_id or task.task_id,
            )
        error = task_pb2.TaskResult.FromString(outcome.messages[0]).error
        self._dead_letter(f"{outcome.kind.value}: {error.message}", after=answered)

    # ------------------------------------------------------------ verdicts

    def _dead_letter(
        self, reason: str, *, after: concurrent.futures.Future[None] | None = None
    ) -> None:
        """Has the delivery rejected without requeueing, so that the broker dead-letters it.

        The silo queue's dead-letter exchange takes the message as it was
        sent (a whole batch, for a task of one), with `x-death` reason
        `rejected`; `reason` is logged.

        `after` is the error reply to the task's sender: the verdict is given
        once the broker has settled that reply either way, so that a
        connection lost in between redelivers the task and the sender is
        answered again, rather than left waiting for its timeout.
        """
        props = self.properties
        self._log.warning(
            "task_dead_lettered",
            reason=reason,
            message_id=self.message_id,
            correlation_id=self.correlation_id,
            queue=self.delivery.queue,
            redelivered=self.delivery.redelivered,
        )
        if after is None:
            self._fate.settle(Verdict.DEAD_LETTER)
            return

        def reject(done: concurrent.futures.Future[None]) -> None:
            error = done.exception()
            if error is not None and not isinstance(error, Unroutable):
                self._log.warning(
                    "error_reply_not_confirmed",
                    message_id=props.message_id,
                    correlation_id=self.correlation_id,
                    error=str(error),
                )
            # Dead-lettered either way: a poison task is never worth a retry.
            self._fate.settle(Verdict.DEAD_LETTER)

        after.add_done_callback(reject)

    def _on_reply_settled(self, done: concurrent.futures.Future[None]) -> None:
        """The broker settled the reply: the task is done, or its delivery goes back."""
        error = done.exception()
        if error is None:
            self._fate.settle(Verdict.ACK)
        elif isinstance(error, Unroutable):
            # The coordinator is gone and its reply queue expired with it:
            # nobody will read this result, so the task is done.
            self._log.warning("reply_unroutable", reason=str(error))
            self._fate.settle(Verdict.ACK)
        elif self._replies.stopping_now():
            # Stopping at once: the link closed without acking the task,
            # so the broker has requeued it, as intended.
            self._log.debug("reply_abandoned", error=str(error))
            self._fate.settle(Verdict.LEFT)
        else:
            # Not confirmed: nacked (the reply queue is over its
            # max-length-bytes, overflow reject-publish), or the link was
            # lost. Give the task back after a pause; the redelivery is
            # answered from the results cache, not run again. Each requeue
            # counts towards the silo queue's delivery limit, and a
            # redelivery after the deadline is dead-lettered, so a reply
            # queue that stays full ends the task, never a spin. (A classic
            # silo queue has no delivery limit and counts nothing: one retry
            # a second until the deadline. With the link lost, the broker
            # has requeued it already and the reject is dropped as stale.)
            self._log.warning(
                "reply_not_confirmed",
                error=str(error),
                message_id=self.message_id,
                delivery_count=self._fate.delivery_count(),
                requeue_in_s=self._fate.requeue_pause(),
            )
            self._fate.settle(Verdict.REQUEUE_LATER)
