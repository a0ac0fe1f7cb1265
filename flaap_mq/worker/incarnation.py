"""Incarnation ids: which worker process holds an executor's state.

TFF's executor protocol is stateful: a CreateCall refers to values an earlier
CreateValue left in one particular executor service. When a worker dies, its
`worker_binary` and every value in it die too, but tasks that refer to them
may still sit in the silo queue, and a new worker (a restart, or a standby
taking over) starts a fresh `worker_binary` that may hand out the very same
executor ids. Running those tasks would be a wrong answer or a confusing
"value not found".

So each worker process (and each restart of its executor service) has an
incarnation id, chosen at random. The worker reports it with every result;
the coordinator copies the one of its GetExecutor answer into every later
task for that executor (`Task.incarnation`). A task for another incarnation
is answered with a retryable STATE_LOST error, which the coordinator turns
into TFF's `RetryableError`: TFF then re-runs the whole invocation on a
fresh executor. The request itself is never rewritten for this check.
"""

from __future__ import annotations

import uuid

from flaap_mq.protocol import envelope
from flaap_mq.protocol.v1 import task_pb2


class StateLost(Exception):
    """A task refers to executor state this worker process never held."""


def new_incarnation_id() -> str:
    return uuid.uuid4().hex[:16]


class Incarnation:
    """One worker process's (or executor service start's) incarnation id."""

    def __init__(self, incarnation_id: str | None = None) -> None:
        self.id = incarnation_id or new_incarnation_id()

    def check(self, task: task_pb2.Task) -> None:
        """Raises `StateLost` unless `task` is for this incarnation's executors.

        GetExecutor creates an executor, so it is the one request that may
        come without an incarnation.
        """
        if task.kind == envelope.RequestKind.GET_EXECUTOR or task.incarnation == self.id:
            return
        raise StateLost(
            f"task {task.task_id} is for executors of worker incarnation "
            f"{task.incarnation or 'unknown'!r}, not this one ({self.id!r}): "
            "their state was lost with that worker"
        )
