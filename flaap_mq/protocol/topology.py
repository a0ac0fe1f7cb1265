"""The broker topology of flaap-mq: every exchange, queue and binding, by name.

The topology is data (a list of declarations), declared idempotently by the
coordinator, the worker and `flaap-mq topology` alike, so that whoever
starts first creates it and nobody depends on start order. A task published
before its silo's worker ever ran waits in the silo queue: the coordinator
declares that queue before it publishes.

Names (prefix `flaap` by default):

| name                      | kind                 | role |
|---------------------------|----------------------|------|
| `flaap.tasks`             | direct exchange      | tasks, routing key = silo id |
| `flaap.silo.<silo>`       | quorum queue         | one silo's tasks; single active consumer |
| `flaap.replies`           | direct exchange      | results, routing key = job id |
| `flaap.reply.<job>`       | quorum queue         | one coordinator's results; expires unused |
| `flaap.dead-letter`       | fanout exchange      | rejected, expired, over delivery limit |
| `flaap.dead-letter`       | quorum queue         | where they wait for an operator |

Replies go through their own exchange, never the default one: a silo that
may write to the default exchange could write into any queue.

**Nothing the federation needs lives on one node.** Every queue is a quorum
queue (Raft-replicated on every node of a cluster, up to the broker's
default group size): a cluster keeps each queue, with the messages it
confirmed, through the loss of any minority of its nodes. A classic queue
lives on one node, and while that node is down its queue is gone from the
cluster (`404 home node ... is down`) and what is routed to it is dropped.
The one exception is opt-in: `queue_type="classic"` silo queues, for a
single-node broker whose operator wants the cheaper writes. A reply queue
is a quorum queue too, and still expires once its coordinator is gone
(`x-expires`, which quorum queues honour). What that costs: a quorum queue
applies its length bound (the broker's policy) once its Raft log has applied
the bytes over it, so a flooding silo gets one burst past it, where a
classic queue held it exactly (docs/security.md, Known weaknesses).

On a locked-down broker the administrator loads this topology ahead of time
(`flaap-mq admin definitions`, generated from these same declarations) and
the clients have no configure permission on it. They then declare it
passively: each shared exchange and queue (`shared=True`) is only checked to
exist; bindings, which AMQP cannot check, are left to the administrator;
what a client owns itself (a coordinator's reply queue) is still declared.

This module is data only. Sending it to a broker (the pika channel calls,
passive or not) is `flaap_mq.broker.declare`; `BrokerLink` switches to
passive on the broker's first ACCESS_REFUSED.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any

# How often a quorum queue redelivers a task before dead-lettering it with
# reason `delivery_limit`: a task that crashes its worker every time must not
# crash-loop the silo forever.
DEFAULT_DELIVERY_LIMIT = 5
# An unused reply queue lives this long: long enough for a coordinator to
# reconnect after a broker restart, short enough to not clog the broker.
DEFAULT_REPLY_QUEUE_EXPIRES_MS = 120_000


class QueueType(enum.StrEnum):
    QUORUM = "quorum"
    CLASSIC = "classic"


@dataclasses.dataclass(frozen=True)
class Names:
    prefix: str = "flaap"

    @property
    def tasks_exchange(self) -> str:
        return f"{self.prefix}.tasks"

    @property
    def replies_exchange(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dead-letter"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.dead-letter"

    def silo_queue(self, silo_id: str) -> str:
        return f"{self.prefix}.silo.{silo_id}"

    def reply_queue(self, job_id: str) -> str:
        return f"{self.prefix}.reply.{job_id}"


# `shared`: part of the topology the administrator owns (and may load ahead of
# time, with no configure permission for the clients); False for what a client
# declares for itself. Not part of equality: it says who declares, not what.
def _shared(default: bool = True) -> Any:
    return dataclasses.field(default=default, compare=False)


@dataclasses.dataclass(frozen=True)
class Exchange:
    name: str
    type: str
    durable: bool = True
    shared: bool = _shared()


@dataclasses.dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any]
    durable: bool = True
    shared: bool = _shared()


@dataclasses.dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str
    shared: bool = _shared()


Declaration = Exchange | Queue | Binding


def validate_id(kind: str, value: str) -> str:
    """Silo and job ids become routing keys and queue names: keep them plain."""
    if not value or len(value) > 100:
        raise ValueError(f"{kind} id must be 1 to 100 characters, got {value!r}")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    bad = sorted(set(value) - allowed)
    if bad:
        raise ValueError(
            f"{kind} id {value!r} has characters {''.join(bad)!r}; use letters, digits, - and _"
        )
    return value


def shared_declarations(names: Names) -> list[Declaration]:
    return [
        Exchange(names.tasks_exchange, "direct"),
        Exchange(names.replies_exchange, "direct"),
        Exchange(names.dead_letter_exchange, "fanout"),
        Queue(names.dead_letter_queue, {"x-queue-type": "quorum"}),
        Binding(names.dead_letter_queue, names.dead_letter_exchange, ""),
    ]


def silo_queue_arguments(names: Names, queue_type: QueueType) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": str(queue_type),
        "x-dead-letter-exchange": names.dead_letter_exchange,
        # Two workers of one silo must never share an executor's requests:
        # the second waits as a standby until the first goes away.
        "x-single-active-consumer": True,
    }
    if queue_type is QueueType.QUORUM:
        args["x-delivery-limit"] = DEFAULT_DELIVERY_LIMIT
    return args


def silo_declarations(
    names: Names, silo_ids: Iterable[str], queue_type: QueueType = QueueType.QUORUM
) -> list[Declaration]:
    decls: list[Declaration] = []
    for silo_id in silo_ids:
        queue = names.silo_queue(validate_id("silo", silo_id))
        decls.append(Queue(queue, silo_queue_arguments(names, queue_type)))
        decls.append(Binding(queue, names.tasks_exchange, silo_id))
    return decls


def reply_declarations(
    names: Names, job_id: str, expires_ms: int = DEFAULT_REPLY_QUEUE_EXPIRES_MS
) -> list[Declaration]:
    queue = names.reply_queue(validate_id("job", job_id))
    return [
        # Quorum, like every queue (see the module docstring): a classic reply
        # queue died with its node, and with it the coordinator's run. It
        # costs a replicated write per reply (docs/benchmarks.md).
        Queue(queue, {"x-expires": expires_ms, "x-queue-type": "quorum"}, shared=False),
        Binding(queue, names.replies_exchange, job_id, shared=False),
    ]
