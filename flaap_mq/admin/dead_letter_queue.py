"""`dead-letters show|purge`: the dead-letter queue read once, matches removed, the rest kept.

`show` groups the dead letters by reason and source queue, with the oldest
and newest ages; `purge` removes those a filter (reason, age) accepts and
returns the others to the queue in their order. Why reading it that way is
safe (nothing republished, nothing lost if the command dies) is in
`flaap_mq.admin.housekeeping`'s docstring.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pika

from flaap_mq.admin.dead_letter import DeadLetter, read_dead_letter
from flaap_mq.admin.queues import get_each, prefix_flag, queue_counts
from flaap_mq.protocol import topology


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
    The order and safety argument is in `flaap_mq.admin.housekeeping`'s docstring.
    """
    queue = names.dead_letter_queue
    counts = queue_counts(connection, queue)
    if counts is None:
        raise ValueError(
            f"the broker has no dead-letter queue {queue} (is the prefix right? "
            f"`flaap-mq topology{prefix_flag(names)}` declares it)"
        )
    channel = connection.channel()
    groups: dict[tuple[str, str], DeadLetterGroup] = {}
    report = DeadLetterReport(queue, counts.messages, [])
    last_kept: int | None = None
    now = time.time()
    for method, properties in get_each(channel, queue, counts.messages):
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
