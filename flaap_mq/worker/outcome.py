"""How a task ended: its serialized TaskResult and an `OutcomeKind`.

Every way a delivered task can end is one member of `OutcomeKind`, whose
value is the word the worker's `task` log line carries as `outcome` (the
fault tests count executions by it: docs/reliability.md). What the worker
does with a delivery follows from the kind (`TaskRequest.settle`): refused
kinds are rejected to the dead-letter queue, `EXPIRED` is rejected
unanswered, the others are answered (or, one-way, acked).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple

from flaap_mq.protocol import envelope


class OutcomeKind(enum.Enum):
    """What became of a task; the value is the `outcome` of its `task` log line."""

    OK = "ok"
    # One per `envelope.Failure`, same name: the failure the result carries.
    EXECUTOR_ERROR = "executor_error"
    MALFORMED_TASK = "malformed_task"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    EXECUTOR_UNAVAILABLE = "executor_unavailable"
    STATE_LOST = "state_lost"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    WRONG_SILO = "wrong_silo"
    CHUNK_INVALID = "chunk_invalid"
    # The envelope could not be read: answered where it says whom, rejected.
    MALFORMED = "malformed"
    # Delivered past its deadline: rejected, neither run nor answered.
    EXPIRED = "expired"

    @classmethod
    def of(cls, failure: envelope.Failure) -> OutcomeKind:
        """The kind of a result that carries `failure`."""
        return cls[failure.name]

    @property
    def refused(self) -> bool:
        """No worker can run the task as it was sent: answer the sender, then reject it.

        A wrong protocol version, another silo's task or an unreadable
        request is poison like an unreadable envelope: it goes to the
        dead-letter queue for an operator instead of vanishing with an ack
        (found by tests/faults/test_poison.py).
        """
        return self in _REFUSED


_REFUSED = frozenset(
    {OutcomeKind.UNSUPPORTED_PROTOCOL, OutcomeKind.WRONG_SILO, OutcomeKind.MALFORMED_TASK}
)


class Outcome(NamedTuple):
    """A TaskResult, serialized (a message per slice: `envelope.encode_result`), and its kind."""

    messages: Sequence[bytes]
    kind: OutcomeKind
    # True when answered from the results cache (or from the run of a
    # duplicate still in progress) rather than run: the `task` log line says
    # so, which is how duplicate executions are counted (docs/reliability.md).
    cached: bool = False
    failure: envelope.Failure | None = None
    # Why a value this task should have made cannot be used, for the tasks
    # that name it: the first cause, not wrapped again at every link. For
    # MALFORMED and EXPIRED: the reason logged when the task is rejected.
    value_error: str = ""

    @property
    def size(self) -> int:
        """The bytes it holds (the results cache's measure), without slicing anything."""
        return envelope.messages_size(self.messages)
