"""Executor ids that name the worker process that created them.

TFF's executor protocol is stateful: a CreateCall refers to values an earlier
CreateValue left in one particular executor service. When a worker dies, its
`worker_binary` and every value in it die too, but tasks that refer to them
may still sit in the silo queue, and a new worker (a restart, or a standby
taking over) would start a fresh `worker_binary` that may hand out the very
same executor ids. Running those tasks would be a wrong answer or a
confusing "value not found".

So every executor id the worker hands out is prefixed with its incarnation
id, a random id chosen at process start. A request whose executor id carries
another incarnation (or none) is answered with a retryable STATE_LOST error,
which the coordinator turns into TFF's `RetryableError`: TFF then re-runs the
whole invocation on a fresh executor.
"""

from __future__ import annotations

import uuid

from google.protobuf import message as protobuf_message

from flaap_mq.protocol import envelope

_SEPARATOR = "/"


class StateLost(Exception):
    """A request refers to executor state this worker process never held."""


def new_incarnation_id() -> str:
    return uuid.uuid4().hex[:16]


class Incarnation:
    """Tags executor ids on the way out, checks and untags them on the way in."""

    def __init__(self, incarnation_id: str | None = None) -> None:
        self.id = incarnation_id or new_incarnation_id()

    def tag_response(self, kind: int, response: bytes) -> bytes:
        """Prefixes the executor id of a GetExecutor response; others pass as is."""
        if kind != envelope.RequestKind.GET_EXECUTOR:
            return response
        message = envelope.KINDS[kind].response_type.FromString(response)
        message.executor.id = f"{self.id}{_SEPARATOR}{message.executor.id}"
        return message.SerializeToString()

    def untag_request(self, kind: int, request: protobuf_message.Message) -> bytes:
        """Checks the request's executor id is ours and returns it with the raw id.

        Raises `StateLost` for an id from another incarnation.
        """
        if kind == envelope.RequestKind.GET_EXECUTOR:
            return request.SerializeToString()
        executor = request.executor  # every other request names its executor
        incarnation, sep, raw_id = executor.id.partition(_SEPARATOR)
        if not sep or incarnation != self.id:
            raise StateLost(
                f"executor {executor.id!r} belongs to worker incarnation "
                f"{incarnation if sep else 'unknown'!r}, not this one ({self.id!r}): "
                "its state was lost with that worker"
            )
        executor.id = raw_id
        return request.SerializeToString()
