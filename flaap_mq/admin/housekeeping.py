"""Housekeeping done with `rabbitmqctl` until now: remove a silo, read and purge dead letters.

`flaap-mq admin remove-silo ID [--force]` deletes the silo's queue
(`PREFIX.silo.ID`). Without `--force` it refuses while a worker consumes the
queue or a task waits in it, like `queue.delete` with `if-unused` and
`if-empty`; RabbitMQ 3.x quorum queues refuse those flags (540
NOT_IMPLEMENTED, which closes the connection), so the same is done in
steps that leave no task behind: the queue is unbound from the tasks
exchange (a coordinator's task for the silo is now returned to it as
unroutable, never dropped in silence), checked again once messages routed
before the unbind have landed, and deleted only if still empty and unused;
otherwise it is bound again and the command refuses. With `--force` it is
deleted whatever it holds; the tasks in it are gone, not dead-lettered.
A worker still running declares the queue again: stop the silo's workers
first.

`flaap-mq dead-letters show` lists the dead-letter queue (`PREFIX.dead-letter`)
by reason and source queue, with the ages of the oldest and newest; reading
it takes nothing away. `flaap-mq dead-letters purge --reason R --older-than S`
removes the matching dead letters only, and `--all` every one. How both read
the queue, and why that is safe:

* only the messages in the queue when the command starts are looked at
  (its depth then), each once, from the head, with `basic.get` and no
  automatic acknowledgement; dead letters that arrive meanwhile queue up
  behind them and are left alone;
* a matching message is acknowledged (removed) at once; the others stay
  unacknowledged until the end and are then returned to the queue with one
  `basic.nack(multiple, requeue)`, in the order they were read, ahead of
  anything that arrived meanwhile. Nothing is ever republished: no copy is
  made, none is lost, and the broker's `x-death` headers stay as they were;
* if the command dies half-way (or its connection does), the broker returns
  every message it had not acknowledged to the queue: what it had not
  decided to remove stays;
* a returned message is marked redelivered (and a quorum queue counts the
  delivery). The messages are held for at most as long as the scan takes;
  the broker's `consumer_timeout` (30 min by default) bounds that.

The commands' flags and what each prints are here; each chore lives in its
own module: `remove_silo.py`; `dead_letter_queue.py` (show and purge);
`dead_letter.py` (one dead letter's reason, from `x-death`, its source queue
and its age); `queues.py` (a queue's depth and consumers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable

import pika.exceptions

from flaap_mq.admin.dead_letter_queue import (
    purge_dead_letters,
    render_dead_letters,
    show_dead_letters,
)
from flaap_mq.admin.remove_silo import remove_silo
from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.connect import open_connection
from flaap_mq.protocol import topology


def add_parsers(
    sub: argparse._SubParsersAction,
    admin_sub: argparse._SubParsersAction,
    add_broker_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    """`admin remove-silo` and `dead-letters show|purge`, with the broker options."""
    remove = admin_sub.add_parser(
        "remove-silo",
        help="delete a silo's queue (refuses while a worker consumes it or tasks wait)",
        description="Deletes PREFIX.silo.ID. Refuses while a worker consumes it or a task "
        "waits in it, unless --force (its tasks are then deleted, not dead-lettered). Stop "
        "the silo's workers first: a running worker declares its queue again.",
    )
    add_broker_args(remove)
    remove.add_argument("remove_silo_id", metavar="ID", help="the silo whose queue to delete")
    remove.add_argument(
        "--force", action="store_true", help="delete it even with tasks in it or workers on it"
    )

    dead = sub.add_parser(
        "dead-letters", help="show or purge the dead-letter queue (by reason and age)"
    )
    dead_sub = dead.add_subparsers(dest="dead_letters_command", required=True)
    show = dead_sub.add_parser(
        "show",
        help="dead letters by reason and source queue, with ages (removes nothing)",
    )
    add_broker_args(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    purge = dead_sub.add_parser(
        "purge",
        help="remove the matching dead letters, keeping the others in order",
        description="Removes the dead letters that match every filter given; the others go "
        "back to the queue in their order. Messages dead-lettered while it runs are not "
        "looked at. Give --reason and/or --older-than, or --all.",
    )
    add_broker_args(purge)
    purge.add_argument(
        "--reason",
        action="append",
        default=None,
        help="only dead letters with this reason (rejected, expired, delivery_limit, ...; "
        "repeatable)",
    )
    purge.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="SECONDS",
        help="only dead letters dead-lettered more than SECONDS ago",
    )
    purge.add_argument("--all", action="store_true", help="every dead letter (no filter)")
    purge.add_argument(
        "--dry-run", action="store_true", help="say what would be removed; remove nothing"
    )
    purge.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    """Runs `admin remove-silo` or `dead-letters show|purge`; raises `ValueError` to refuse."""
    names = topology.Names(args.prefix)
    command = getattr(args, "dead_letters_command", None)
    if command == "purge":
        if args.all and (args.reason or args.older_than is not None):
            raise ValueError("give --all or filters (--reason, --older-than), not both")
        if not args.all and not args.reason and args.older_than is None:
            raise ValueError(
                "say which dead letters to remove: --reason R and/or --older-than SECONDS, "
                "or --all for every one"
            )
        if args.older_than is not None and args.older_than < 0:
            raise ValueError(f"--older-than must not be negative, got {args.older_than:g}")
    connection = open_connection(
        parse_broker_urls(args.broker_url, connection_name="flaap-mq-admin")
    )
    try:
        if command is None:
            print(remove_silo(connection, names, args.remove_silo_id, force=args.force))
            return 0
        if command == "show":
            report = show_dead_letters(connection, names)
        else:
            report = purge_dead_letters(
                connection,
                names,
                reasons=set(args.reason) if args.reason else None,
                older_than_s=args.older_than,
                dry_run=args.dry_run,
            )
    except pika.exceptions.ChannelClosedByBroker as e:
        # E.g. a user without configure permission on the queue: say so, in one line.
        raise ValueError(f"the broker refused: {e.reply_text}") from None
    finally:
        if connection.is_open:
            connection.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        purged = command == "purge"
        print(render_dead_letters(report, purged=purged, dry_run=purged and args.dry_run))
    return 0
