"""What `flaap-mq status` reports, and its two renderings: a table and JSON.

Plain data filled by `status.collect_status` (AMQP) and
`management_api.ManagementApi.fill_silo` (the standby workers, task ages);
rendering reads it only, so a report can be printed, and tested, without a
broker.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class Consumer:
    tag: str
    connection: str
    active: bool | None  # None: the broker did not say (no management API)
    # "host" for a worker run with --executor-network=host, whose executor
    # listens on the network (it says so in its connection's name).
    executor_network: str = "sandbox"


@dataclasses.dataclass
class SiloStatus:
    silo_id: str
    queue: str
    exists: bool
    depth: int
    consumers: int
    online: bool
    oldest_task_age_s: float | None = None
    workers: list[Consumer] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Status:
    broker: str
    silos: list[SiloStatus]
    dead_letter_depth: int
    dead_letter_reasons: list[tuple[str, int]]
    reply_queues: list[dict[str, Any]] | None  # None: needs the management API
    # What the report lacks and why (no silos named, management API unreachable).
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def offline(self) -> list[str]:
        return [s.silo_id for s in self.silos if not s.online]


def _describe(worker: Consumer) -> str:
    described = f"{worker.connection} ({'active' if worker.active else 'standby'})"
    if worker.executor_network == "host":
        described += " INSECURE: its executor listens on the network"
    return described


def render_text(status: Status) -> str:
    lines = [f"broker {status.broker}"]
    lines.append(f"  {'silo':<20} {'state':<8} {'tasks':>6} {'oldest':>8}  workers")
    for silo in status.silos:
        state = "online" if silo.online else ("offline" if silo.exists else "no queue")
        oldest = f"{silo.oldest_task_age_s:.0f}s" if silo.oldest_task_age_s is not None else "-"
        if silo.workers:
            workers = ", ".join(_describe(w) for w in silo.workers)
        else:
            workers = f"{silo.consumers} consuming"
        lines.append(f"  {silo.silo_id:<20} {state:<8} {silo.depth:>6} {oldest:>8}  {workers}")
    reasons = ", ".join(f"{reason} x{count}" for reason, count in status.dead_letter_reasons)
    lines.append(
        f"  dead letters: {status.dead_letter_depth}" + (f" ({reasons})" if reasons else "")
    )
    if status.reply_queues is None:
        if not status.notes:  # a note says why, when there is one
            lines.append("  coordinators: (give --management-url to list reply queues)")
    else:
        for q in status.reply_queues:
            lines.append(
                f"  coordinator reply queue {q['queue']}: {q['messages']} messages, "
                f"{q['consumers']} consumers"
            )
    lines.extend(f"  note: {note}" for note in status.notes)
    return "\n".join(lines)


def render_json(status: Status) -> str:
    return json.dumps(dataclasses.asdict(status) | {"offline": status.offline}, indent=2)
