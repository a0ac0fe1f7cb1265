"""A Task on its way to a silo: its envelope, its slices, their AMQP properties, their confirms.

Every task goes to the tasks exchange under its silo's id, persistent and
`mandatory`, its publish confirmed by the broker (`BrokerLink.publish`), and
expires in the broker at its deadline (`amqp.task_properties`), so a silo
that comes back late finds it dead-lettered rather than runs it. A large
request is sliced at `chunk_bytes` (`envelope.encode_task`). A task the
broker did not take fails its call with the `SiloError` that says why
(`publish_error`): too large, no queue for the silo, or not delivered.
"""

from __future__ import annotations

import concurrent.futures

from flaap_mq.broker import link as broker_link
from flaap_mq.coordinator import errors
from flaap_mq.protocol import amqp, envelope


def publish_task(
    link: broker_link.BrokerLink,
    exchange: str,
    request: envelope.SerializedRequest,
    *,
    job_id: str,
    silo_id: str,
    task_id: str,
    timeout_s: float,
    incarnation: str,
    reply: bool,
    chunk_bytes: int,
) -> tuple[list[concurrent.futures.Future[None]], int]:
    """Publishes the task, split into chunks if its request is large.

    With `reply`, the task asks for a reply to `job_id`'s reply queue.
    Returns the publish futures of its messages, and the request's size.
    """
    task = envelope.task_envelope(
        kind=request.spec.kind,
        job_id=job_id,
        silo_id=silo_id,
        task_id=task_id,
        deadline_unix_ms=envelope.deadline_after(timeout_s),
        incarnation=incarnation,
    )
    messages = envelope.encode_task(task, request.payload, chunk_bytes)
    futures = [
        link.publish(
            exchange,
            silo_id,
            message,
            broker_link.default_properties(
                **amqp.task_properties(
                    task_id=task_id,
                    kind_name=envelope.kind_name(task.kind),
                    reply_to=job_id if reply else None,
                    timeout_s=timeout_s,
                    index=i,
                    count=len(messages),
                )
            ),
        )
        for i, message in enumerate(messages)
    ]
    return futures, len(request.payload)


def confirmed(
    parts: list[concurrent.futures.Future[None]], silo_id: str, request: str
) -> concurrent.futures.Future[None]:
    """A future that resolves once the broker holds every part of a task, or
    fails with the `SiloError` saying why it could not be sent."""
    sent: concurrent.futures.Future[None] = concurrent.futures.Future()

    def settle(done: concurrent.futures.Future[None]) -> None:
        error = done.exception()
        if error is None:
            sent.set_result(None)
        else:
            sent.set_exception(publish_error(silo_id, request, error))

    broker_link.all_confirmed(parts).add_done_callback(settle)
    return sent


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
