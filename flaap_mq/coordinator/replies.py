"""Reply intake: a message off the coordinator's reply queue, matched to the call it answers.

A reply settles the call its AMQP `correlation_id` names, and only if

* its body names the same task (`reply_id_mismatch` otherwise);
* that call is still waiting and not yet answered: late and duplicate
  replies (a task redelivered after its reply), replies to one-way tasks and
  more slices for a call already settled are dropped (`reply_unclaimed`);
* it comes from the silo the task was sent to (`reply_from_wrong_silo`);
* with `silo_users` (silo id -> broker user), its AMQP `user_id` is the user
  of that silo (`reply_from_wrong_user`). The broker refuses any message
  whose `user_id` is not its sender's login, so a silo cannot answer for
  another. Without `silo_users` (local development, one shared `guest`
  login) any user is accepted.

Anything else is dropped before it can touch the call or fill its transfer.
A large result's slices are written, as they arrive, into one buffer in the
call table's `transfers` (within its `Limits`, keyed by the call's task id
and expiring with its deadline: `calls`), and hashed on the way; the last
one settles the call with that buffer (`collector.Parts`). The caller checks
it (`Parts.view`: no pass over it), off the I/O thread every silo shares, and
reads a computed value's arrays straight from it (`value_read`).

Nothing here logs: `take` says what it dropped, and the `TaskClient` logs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import pika.spec

from flaap_mq.coordinator import errors
from flaap_mq.coordinator.calls import CallTable, PendingCall, Reply
from flaap_mq.protocol import chunking, collector, envelope
from flaap_mq.protocol.v1 import task_pb2


@dataclasses.dataclass(frozen=True)
class Dropped:
    """A reply (or slice) not taken: the event to log, at what level, with what."""

    level: Literal["debug", "warning"]
    event: str
    fields: dict[str, Any]


def unmatched(
    correlation_id: str | None,
    result: task_pb2.TaskResult,
    user_id: str | None,
    call: PendingCall | None,
    silo_users: Mapping[str, str] | None,
) -> Dropped | None:
    """Why a reply may not settle `call`, the call its `correlation_id` names; None if it may."""
    if correlation_id != result.task_id:
        return Dropped(
            "warning",
            "reply_id_mismatch",
            {
                "correlation_id": correlation_id,
                "task_id": result.task_id,
                "silo": result.silo_id,
                "note": "dropped: a reply's body must name the task its correlation_id names",
            },
        )
    if call is None or call.answered:
        # A reply to a disposal, a second reply to a redelivered task, or
        # more slices for a call already settled.
        return Dropped(
            "debug", "reply_unclaimed", {"task_id": correlation_id, "silo": result.silo_id}
        )
    if result.silo_id != call.silo_id:
        return Dropped(
            "warning",
            "reply_from_wrong_silo",
            {"task_id": correlation_id, "expected": call.silo_id, "got": result.silo_id},
        )
    if silo_users is not None and user_id != silo_users[call.silo_id]:
        return Dropped(
            "warning",
            "reply_from_wrong_user",
            {
                "task_id": correlation_id,
                "silo": call.silo_id,
                "expected_user": silo_users[call.silo_id],
                "user": user_id,
                "note": "dropped: only the silo a task was sent to may answer it",
            },
        )
    return None


def take(
    calls: CallTable,
    body: bytes,
    properties: pika.spec.BasicProperties,
    silo_users: Mapping[str, str] | None,
) -> Dropped | None:
    """Settles the call a reply answers, once all of it is in; what was dropped, if anything.

    Runs on the I/O thread for every message in the reply queue. The call is
    looked up and a slice stored under `calls.lock`, so the call cannot end
    (and `CallTable.forget` drop its transfer) in between. A slice that does
    not fit (`chunking.ChunkError`) fails the call, retryable.
    """
    try:
        result, payload = envelope.read_result(body)
    except envelope.MalformedEnvelope as e:
        return Dropped("warning", "reply_malformed", {"error": str(e)})
    task_id = properties.correlation_id
    with calls.lock:
        call = calls.get_held(task_id)
        dropped = unmatched(task_id, result, properties.user_id, call, silo_users)
        if dropped is not None:
            return dropped
        assert call is not None  # `unmatched` says so
        reply: Reply | None = (result, payload)
        error: BaseException | None = None
        if chunking.is_chunked(result.chunk):
            try:
                reply = _collect_slice(calls.transfers, call, result, payload)
            except chunking.ChunkError as e:
                dropped = Dropped(
                    "warning",
                    "reply_chunks_invalid",
                    {"task_id": result.task_id, "silo": call.silo_id, "error": str(e)},
                )
                reply, error = None, errors.SiloRetryableError(call.silo_id, call.request, str(e))
            if reply is None and error is None:
                return None
        call.answered = True
    call.settle(reply, error)
    return dropped


def _collect_slice(
    transfers: collector.Collector,
    call: PendingCall,
    part: task_pb2.TaskResult,
    payload: memoryview,
) -> Reply | None:
    """Stores one slice of a call's large result: the reply once all are in, else None.

    The transfer is keyed by the call's task id, so each call has at most
    one, and it expires with the call's deadline. Only collected here: the
    caller (`TaskClient.ask`) checks the whole and makes its `bytes`.
    """
    parts = transfers.add(part.task_id, part.chunk, payload, expires_at=call.expires_at)
    if parts is None:
        return None
    part.ClearField("chunk")
    return part, parts
