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

A dead letter's reason is the broker's (`x-death`: `rejected`, `expired`,
`delivery_limit`, `maxlen`), or, for one a worker published itself before
2026-12, the start of its `x-flaap-reason` header. Its age counts from when
it was dead-lettered (`x-death`'s time), else from when its task was
published.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.connect import open_connection
from flaap_mq.broker.declare import is_not_found
from flaap_mq.protocol import topology

# Between unbinding a silo queue and checking it again: tasks the broker
# routed to it just before the unbind land in it meanwhile (a quorum queue's
# reported depth lags its writes a little).
_SETTLE_S = 0.5


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """What the housekeeping commands read of one dead letter."""

    reason: str
    queue: str  # the queue it was dead-lettered from ("?" when it does not say)
    age_s: float | None  # None: no time in it


def reason_of(properties: pika.BasicProperties) -> str:
    """The broker's dead-lettering reason (`x-death`, most recent first), else the old header.

    `rejected`: a worker refused the task (malformed, another silo's or
    protocol version, or past its deadline when it arrived; the worker's
    `task_dead_lettered` log line has the detail); `expired`: its deadline
    passed while it waited in the queue; `delivery_limit`: redelivered too
    often (a worker crashed on it, or its reply was never confirmed).
    """
    headers = properties.headers or {}
    death = _last_death(headers)
    if death is not None:
        return _text(death.get("reason", "unknown"))
    if "x-flaap-reason" in headers:
        # Dead-lettered by a worker before 2026-12 (it published them itself).
        return _text(headers["x-flaap-reason"]).split(":", 1)[0]
    return "unknown"


def read_dead_letter(properties: pika.BasicProperties, now: float) -> DeadLetter:
    """The reason, source queue and age (at `now`, Unix seconds) of one dead letter."""
    headers = properties.headers or {}
    death = _last_death(headers) or {}
    when = _unix_seconds(death.get("time"))
    if when is None:
        when = _unix_seconds(properties.timestamp)
    return DeadLetter(
        reason=reason_of(properties),
        queue=_text(death.get("queue", "?")),
        age_s=None if when is None else max(0.0, now - when),
    )


def _last_death(headers: dict[str, Any]) -> dict[str, Any] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return None


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _unix_seconds(value: object) -> float | None:
    """An AMQP timestamp as pika gives it (a naive UTC datetime, or seconds) in Unix seconds."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


# ------------------------------------------------------------------ queue checks


@dataclasses.dataclass(frozen=True)
class _Counts:
    messages: int
    consumers: int


def _counts(connection: pika.BlockingConnection, queue: str) -> _Counts | None:
    """The queue's depth and consumers (passive declare), or None if it does not exist."""
    channel = connection.channel()
    try:
        method = channel.queue_declare(queue, passive=True).method
    except pika.exceptions.ChannelClosedByBroker as e:
        if is_not_found(e):
            return None
        raise ValueError(f"broker refused to show {queue}: {e.reply_text}") from None
    channel.close()
    return _Counts(method.message_count, method.consumer_count)


# ------------------------------------------------------------------ remove-silo


def remove_silo(
    connection: pika.BlockingConnection, names: topology.Names, silo_id: str, *, force: bool
) -> str:
    """Deletes the silo's queue, if empty and unused or with `force`; what was done, in a line.

    Raises `ValueError` naming the queue and what holds it (workers, tasks)
    and what to do, when it refuses; see the module docstring for the steps.
    """
    silo_id = topology.validate_id("silo", silo_id)
    queue = names.silo_queue(silo_id)
    counts = _counts(connection, queue)
    if counts is None:
        raise ValueError(
            f"the broker has no queue {queue}: nothing to remove (`flaap-mq status"
            f"{_prefix_flag(names)}` lists the silos there are)"
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
    counts = _counts(connection, queue)
    if counts is None:
        return f"{queue} is gone already (deleted meanwhile)"
    if counts.messages or counts.consumers:
        channel.queue_bind(queue, names.tasks_exchange, routing_key=silo_id)
        _refuse_if_used(queue, silo_id, counts, names)
    channel.queue_delete(queue)
    channel.close()
    return f"deleted {queue} (it was empty and no worker consumed it)"


def _refuse_if_used(queue: str, silo_id: str, counts: _Counts, names: topology.Names) -> None:
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
            f"{_prefix_flag(names)}` shows it"
        )


def _prefix_flag(names: topology.Names) -> str:
    return "" if names.prefix == "flaap" else f" --prefix {names.prefix}"


# ------------------------------------------------------------------ dead letters


@dataclasses.dataclass
class DeadLetterGroup:
    """Dead letters of one reason from one queue."""

    reason: str
    queue: str
    count: int = 0
    oldest_s: float | None = None
    newest_s: float | None = None

    def add(self, letter: DeadLetter) -> None:
        self.count += 1
        if letter.age_s is not None:
            self.oldest_s = max(self.oldest_s or 0.0, letter.age_s)
            self.newest_s = (
                letter.age_s if self.newest_s is None else min(self.newest_s, letter.age_s)
            )


@dataclasses.dataclass
class DeadLetterReport:
    queue: str
    depth: int  # the queue's depth when the command started
    groups: list[DeadLetterGroup]  # most common first
    removed: int = 0  # by purge
    kept: int = 0  # looked at by purge and left in the queue


def _scan(
    connection: pika.BlockingConnection,
    names: topology.Names,
    matches: Callable[[DeadLetter], bool],
    *,
    dry_run: bool = False,
) -> DeadLetterReport:
    """Reads every dead letter there is now, once; removes those that `matches` accepts.

    With `dry_run` nothing is removed and `removed` counts what would be.
    The order and safety argument is in the module docstring.
    """
    queue = names.dead_letter_queue
    counts = _counts(connection, queue)
    if counts is None:
        raise ValueError(
            f"the broker has no dead-letter queue {queue} (is the prefix right? "
            f"`flaap-mq topology{_prefix_flag(names)}` declares it)"
        )
    channel = connection.channel()
    groups: dict[tuple[str, str], DeadLetterGroup] = {}
    report = DeadLetterReport(queue, counts.messages, [])
    last_kept: int | None = None
    now = time.time()
    for method, properties in _get_each(channel, queue, counts.messages):
        letter = read_dead_letter(properties, now)
        if matches(letter):
            report.removed += 1
            if dry_run:
                last_kept = method.delivery_tag
            else:
                channel.basic_ack(method.delivery_tag)
        else:
            last_kept = method.delivery_tag
            report.kept += 1
        key = (letter.reason, letter.queue)
        groups.setdefault(key, DeadLetterGroup(*key)).add(letter)
    if last_kept is not None:
        # Every message still unacknowledged is a kept one: back, in order.
        channel.basic_nack(last_kept, multiple=True, requeue=True)
    channel.close()
    report.groups = sorted(groups.values(), key=lambda g: (-g.count, g.reason, g.queue))
    return report


def _get_each(channel: Any, queue: str, limit: int) -> Iterator[tuple[Any, Any]]:
    for _ in range(limit):
        method, properties, _body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return
        yield method, properties


def show_dead_letters(
    connection: pika.BlockingConnection, names: topology.Names
) -> DeadLetterReport:
    """The dead letters by reason and source queue; nothing is removed."""
    return _scan(connection, names, lambda _letter: False)


def purge_dead_letters(
    connection: pika.BlockingConnection,
    names: topology.Names,
    *,
    reasons: set[str] | None,
    older_than_s: float | None,
    dry_run: bool = False,
) -> DeadLetterReport:
    """Removes the dead letters of one of `reasons` (any, if None) older than `older_than_s`.

    A dead letter with no time in it is not "older than" anything. With
    `dry_run`, `removed` counts what would be removed and nothing is.
    """

    def matches(letter: DeadLetter) -> bool:
        if reasons is not None and letter.reason not in reasons:
            return False
        return older_than_s is None or (letter.age_s is not None and letter.age_s > older_than_s)

    return _scan(connection, names, matches, dry_run=dry_run)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def render_dead_letters(report: DeadLetterReport, *, purged: bool, dry_run: bool) -> str:
    if purged:
        verb = "would remove" if dry_run else "removed"
        head = f"{report.queue}: {verb} {report.removed} of {report.depth}, kept {report.kept}"
    else:
        head = f"{report.queue}: {report.depth} dead letter(s)"
    lines = [head]
    if report.groups:
        lines.append(
            f"  {'reason':<16} {'from queue':<40} {'count':>6} {'oldest':>8} {'newest':>8}"
        )
        for g in report.groups:
            lines.append(
                f"  {g.reason:<16} {g.queue:<40} {g.count:>6} "
                f"{_age(g.oldest_s):>8} {_age(g.newest_s):>8}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


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
