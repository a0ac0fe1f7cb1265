"""A Task on its way to a silo: its envelope, its message(s), their AMQP properties, their confirms.

Every message goes to the tasks exchange under its silo's id, persistent
and `mandatory`, its publish confirmed by the broker (`BrokerLink.publish`),
and expires in the broker at its deadline (`amqp.task_properties`), so a
silo that comes back late finds it dead-lettered rather than runs it. A
task travels alone (`publish_task`; a large request sliced at `chunk_bytes`,
`envelope.encode_task`) or with others in one `TaskBatch` (`publish_batch`;
`outbox` decides which). A task the broker did not take fails its call with
the `SiloError` that says why (`publish_error`): too large, no queue for the
silo, or not delivered.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Sequence

from flaap_mq.broker import link as broker_link
from flaap_mq.coordinator import errors
from flaap_mq.protocol import amqp, batch, envelope
from flaap_mq.protocol.v1 import task_pb2


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """A task ready to publish: its envelope (request apart), its request, whether awaited."""

    task: task_pb2.Task
    request: envelope.SerializedRequest
    timeout_s: float
    reply: bool  # awaited: the task carries the coordinator's reply_to

    @property
    def size(self) -> int:
        """What it adds to a message: its request, its envelope, their field heads."""
        return len(self.request.payload) + self.task.ByteSize() + 16


def outgoing(
    request: envelope.SerializedRequest,
    *,
    job_id: str,
    silo_id: str,
    task_id: str,
    timeout_s: float,
    incarnation: str,
    reply: bool,
) -> Outgoing:
    """The task carrying `request`, expiring `timeout_s` from now."""
    task = envelope.task_envelope(
        kind=request.spec.kind,
        job_id=job_id,
        silo_id=silo_id,
        task_id=task_id,
        deadline_unix_ms=envelope.deadline_after(timeout_s),
        incarnation=incarnation,
    )
    return Outgoing(task, request, timeout_s, reply)


def publish_task(
    link: broker_link.BrokerLink, exchange: str, out: Outgoing, *, chunk_bytes: int
) -> tuple[concurrent.futures.Future[None], int]:
    """Publishes the task alone, sliced if its request is large: one future, and the
    number of messages.

    An awaited task asks for a reply to its job's reply queue. Every slice
    is handed to the link at once: the outbox's order (a value's slices
    before any task that names it) holds only for what is handed over
    together. (A window of unconfirmed slices, as the worker's replies
    have, would need the outbox to hold the silo's later tasks until the
    last slice is handed over; not done.)
    """
    messages = envelope.encode_task(out.task, out.request.payload, chunk_bytes)

    def publish_one(index: int) -> concurrent.futures.Future[None]:
        return link.publish(
            exchange,
            out.task.silo_id,
            messages[index],
            broker_link.default_properties(
                **amqp.task_properties(
                    task_id=out.task.task_id,
                    kind_name=out.request.spec.name,
                    reply_to=out.task.job_id if out.reply else None,
                    timeout_s=out.timeout_s,
                    index=index,
                    count=len(messages),
                )
            ),
        )

    return broker_link.all_confirmed([publish_one(i) for i in range(len(messages))]), len(messages)


def publish_batch(
    link: broker_link.BrokerLink, exchange: str, tasks: Sequence[Outgoing]
) -> concurrent.futures.Future[None]:
    """Publishes the tasks in one `TaskBatch` message; its future.

    Only the last may be awaited (`amqp.batch_properties`); each request
    must fit in one message, and all of them in the broker's message limit.
    """
    if any(out.reply for out in tasks[:-1]):
        raise ValueError("only a batch's last task can be awaited")
    last = tasks[-1]
    return link.publish(
        exchange,
        last.task.silo_id,
        batch.encode_batch([(out.task, out.request.payload) for out in tasks]),
        broker_link.default_properties(
            **amqp.batch_properties(
                last_task_id=last.task.task_id,
                reply_to=last.task.job_id if last.reply else None,
                timeout_s=max(out.timeout_s for out in tasks),
            )
        ),
    )


def confirmed(
    sent: concurrent.futures.Future[None], silo_id: str, request: str
) -> concurrent.futures.Future[None]:
    """A future that resolves once the broker holds all of a task, or fails
    with the `SiloError` saying why it could not be sent."""
    outcome: concurrent.futures.Future[None] = concurrent.futures.Future()

    def settle(done: concurrent.futures.Future[None]) -> None:
        error = done.exception()
        if error is None:
            outcome.set_result(None)
        else:
            outcome.set_exception(publish_error(silo_id, request, error))

    sent.add_done_callback(settle)
    return outcome


def publish_error(silo_id: str, request: str, error: BaseException) -> errors.SiloError:
    """What the caller sees of a task the broker did not take."""
    if isinstance(error, broker_link.MessageTooLarge):
        return errors.MessageTooLargeError(silo_id, request, str(error))
    if isinstance(error, broker_link.Unroutable):
        return errors.SiloProtocolError(
            silo_id,
            request,
            f"the broker has no queue for this silo ({error}); was it deleted?",
        )
    return errors.SiloRetryableError(silo_id, request, f"task not delivered to the broker: {error}")
