"""One delivery's fate: its reply, refusal or dead-lettering, and its ack.

A `TaskRequest` is made for each delivery as it arrives (`intake`) and is
the only thing that settles it with the broker. The ack policy, all of it:

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
* one-way (no `reply_to`): acked at once; a failure is logged, and kept
  with the value the task should have made (`pipeline`);
* the worker failed handling it (`give_back`): requeued at once.

A reject carries no headers, so the reason a task is rejected is in the
`task_dead_lettered` log line (with its message and correlation ids), not
in the dead letter; the silo's broker user needs no permission on the
dead-letter exchange (deploy/rabbitmq/README.md).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable
from typing import Protocol

import pika
import structlog

from flaap_mq.broker.link import Delivery, Unroutable, all_confirmed, default_properties
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


class TaskRequest:
    """One delivery, from its arrival to its ack or reject; see the module docstring."""

    def __init__(self, delivery: Delivery, replies: Replies) -> None:
        self.delivery = delivery
        self._replies = replies
        self._log = replies.log

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
        self._replies.link.ack(self.delivery)

    def settle(self, task: task_pb2.Task | None, outcome: Outcome) -> None:
        """Answers (or not) and acks or rejects the delivery, as `outcome` says.

        `task` is None only for an unreadable envelope (`MALFORMED`).
        """
        props = self.properties
        if outcome.kind is OutcomeKind.MALFORMED:
            answered = None
            if props.reply_to and props.correlation_id and outcome.messages:
                answered = self._publish(
                    outcome.messages[0], task_id=None, correlation_id=props.correlation_id
                )
            self._dead_letter(f"malformed: {outcome.value_error}", after=answered)
        elif outcome.kind is OutcomeKind.EXPIRED:
            self._dead_letter(outcome.value_error)
        elif outcome.kind.refused:
            self._refuse(task, outcome)
        elif props.reply_to:
            self._reply(task, outcome.messages)
        else:
            if outcome.failure is not None:
                self._log.warning(
                    "one_way_task_failed",
                    task_id=task.task_id,
                    kind=envelope.kind_name(task.kind),
                    error=outcome.value_error,
                )
            self._replies.link.ack(self.delivery)

    def give_back(self) -> None:
        """The worker failed handling the task: back to the queue (and, after the
        delivery limit, to the dead-letter queue)."""
        if self._replies.link is not None:
            self._replies.link.reject(self.delivery, requeue=True)

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
            self.properties.reply_to,
            message,
            default_properties(**properties),
        )

    def _reply(self, task: task_pb2.Task, messages: tuple[bytes, ...]) -> None:
        correlation_id = self.properties.correlation_id or task.task_id
        futures = [
            self._publish(
                message,
                task_id=task.task_id,
                correlation_id=correlation_id,
                index=i,
                count=len(messages),
            )
            for i, message in enumerate(messages)
        ]
        self._ack_when_confirmed(all_confirmed(futures))

    def _refuse(self, task: task_pb2.Task, outcome: Outcome) -> None:
        """Answers a task no worker can run as sent, and rejects it to the dead-letter queue."""
        answered = None
        if self.properties.reply_to:
            answered = self._publish(
                outcome.messages[0],
                task_id=task.task_id,
                correlation_id=self.properties.correlation_id or task.task_id,
            )
        error = task_pb2.TaskResult.FromString(outcome.messages[0]).error
        self._dead_letter(f"{outcome.kind.value}: {error.message}", after=answered)

    # ------------------------------------------------------------ acks, rejects

    def _dead_letter(
        self, reason: str, *, after: concurrent.futures.Future[None] | None = None
    ) -> None:
        """Rejects the task without requeueing it, so that the broker dead-letters it.

        The silo queue's dead-letter exchange takes the task as it was sent,
        with `x-death` reason `rejected`; `reason` is logged.

        `after` is the error reply to the task's sender: the task is rejected
        once the broker has settled that reply either way, so that a
        connection lost in between redelivers the task and the sender is
        answered again, rather than left waiting for its timeout.
        """
        props = self.properties
        self._log.warning(
            "task_dead_lettered",
            reason=reason,
            message_id=props.message_id,
            correlation_id=props.correlation_id,
            queue=self.delivery.queue,
            redelivered=self.delivery.redelivered,
        )
        if after is None:
            self._replies.link.reject(self.delivery, requeue=False)
            return

        def reject(done: concurrent.futures.Future[None]) -> None:
            error = done.exception()
            if error is not None and not isinstance(error, Unroutable):
                self._log.warning(
                    "error_reply_not_confirmed",
                    message_id=props.message_id,
                    correlation_id=props.correlation_id,
                    error=str(error),
                )
            # Dead-lettered either way: a poison task is never worth a retry.
            self._replies.link.reject(self.delivery, requeue=False)

        after.add_done_callback(reject)

    def _ack_when_confirmed(self, future: concurrent.futures.Future[None]) -> None:
        """Acks the task once the broker confirmed its reply; see the cases below."""
        future.add_done_callback(self._on_reply_settled)

    def _on_reply_settled(self, done: concurrent.futures.Future[None]) -> None:
        error = done.exception()
        if error is None:
            self._replies.link.ack(self.delivery)
        elif isinstance(error, Unroutable):
            # The coordinator is gone and its reply queue expired with it:
            # nobody will read this result, so the task is done.
            self._log.warning("reply_unroutable", reason=str(error))
            self._replies.link.ack(self.delivery)
        elif self._replies.stopping_now():
            # Stopping at once: the link closed without acking the task,
            # so the broker has requeued it, as intended.
            self._log.debug("reply_abandoned", error=str(error))
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
            count = self._delivery_count()
            pause = requeue_pause(count)
            self._log.warning(
                "reply_not_confirmed",
                error=str(error),
                message_id=self.properties.message_id,
                delivery_count=count,
                requeue_in_s=pause,
            )
            timer = threading.Timer(pause, self._requeue)
            timer.daemon = True
            timer.start()

    def _delivery_count(self) -> int:
        """How often the silo queue delivered this task before (`x-delivery-count`)."""
        try:
            headers = self.properties.headers or {}
            return max(0, int(headers.get("x-delivery-count", 0)))
        except (TypeError, ValueError):
            return 0

    def _requeue(self) -> None:
        # A worker stopping meanwhile closes its channel, which requeues the
        # task anyway.
        link = self._replies.link
        if link is not None and not self._replies.shutting_down():
            try:
                link.reject(self.delivery, requeue=True)
            except Exception as e:  # the link closed under us: same as above
                self._log.debug("requeue_skipped", error=str(e))
