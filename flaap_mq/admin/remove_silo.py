"""`flaap-mq admin remove-silo ID [--force]`: delete a silo's queue, leaving no task behind.

Without `--force` the queue is unbound from the tasks exchange, checked again
once tasks routed before the unbind have landed, and deleted only if still
empty and unused; otherwise bound again and refused. Why in those steps (and
not `queue.delete` with `if-unused`, `if-empty`) is in
`flaap_mq.admin.housekeeping`'s docstring.
"""

from __future__ import annotations

import time

import pika

from flaap_mq.admin.queues import QueueCounts, prefix_flag, queue_counts
from flaap_mq.protocol import topology

# Between unbinding a silo queue and checking it again: tasks the broker
# routed to it just before the unbind land in it meanwhile (a quorum queue's
# reported depth lags its writes a little).
_SETTLE_S = 0.5


def remove_silo(
    connection: pika.BlockingConnection, names: topology.Names, silo_id: str, *, force: bool
) -> str:
    """Deletes the silo's queue, if empty and unused or with `force`; what was done, in a line.

    Raises `ValueError` naming the queue and what holds it (workers, tasks)
    and what to do, when it refuses; see the module docstring for the steps.
    """
    silo_id = topology.validate_id("silo", silo_id)
    queue = names.silo_queue(silo_id)
    counts = queue_counts(connection, queue)
    if counts is None:
        raise ValueError(
            f"the broker has no queue {queue}: nothing to remove (`flaap-mq status"
            f"{prefix_flag(names)}` lists the silos there are)"
        )
    if force:
        method = connection.channel().queue_delete(queue).method
        done = f"deleted {queue} and the {method.message_count} task(s) in it"
        if counts.consumers:
            done += (
                f"; {counts.consumers} worker(s) consumed it and will declare it again "
                f"unless stopped (systemctl stop flaap-mq-worker@{silo_id})"
            )
        return done
    _refuse_if_used(queue, silo_id, counts, names)
    channel = connection.channel()
    # Unbound first: no new task can reach the queue between the check below
    # and the delete; a coordinator's task is returned to it as unroutable.
    channel.queue_unbind(queue, names.tasks_exchange, routing_key=silo_id)
    time.sleep(_SETTLE_S)
    counts = queue_counts(connection, queue)
    if counts is None:
        return f"{queue} is gone already (deleted meanwhile)"
    if counts.messages or counts.consumers:
        channel.queue_bind(queue, names.tasks_exchange, routing_key=silo_id)
        _refuse_if_used(queue, silo_id, counts, names)
    channel.queue_delete(queue)
    channel.close()
    return f"deleted {queue} (it was empty and no worker consumed it)"


def _refuse_if_used(queue: str, silo_id: str, counts: QueueCounts, names: topology.Names) -> None:
    held = []
    if counts.consumers:
        held.append(
            f"{counts.consumers} worker(s) consume it (stop them first: "
            f"systemctl stop flaap-mq-worker@{silo_id})"
        )
    if counts.messages:
        held.append(
            f"{counts.messages} task(s) wait in it (let a worker drain them, or give --force "
            "to delete them with the queue)"
        )
    if held:
        raise ValueError(
            f"not removing {queue}: {'; '.join(held)}; `flaap-mq status --silo {silo_id}"
            f"{prefix_flag(names)}` shows it"
        )
