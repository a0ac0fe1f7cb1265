"""What one dead letter says: why it was dead-lettered, from which queue, how long ago.

Read from its properties only (pure; the body is never looked at), for
`dead-letters show|purge` and for `status`'s most common reasons.

A dead letter's reason is the broker's (`x-death`: `rejected`, `expired`,
`delivery_limit`, `maxlen`), or, for one a worker published itself before
2026-12, the start of its `x-flaap-reason` header. Its age counts from when
it was dead-lettered (`x-death`'s time), else from when its task was
published.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pika


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
