"""What every fault test measures afterwards, the same way each time.

* Duplicate executions and lost tasks are counted from the workers' JSON
  logs: every task a worker handles ends in one `"event": "task"` line with
  its task id, outcome, incarnation, whether it was a redelivery and whether
  it was answered from the results cache (`cached`) rather than run.
* Queues are checked by draining them with a consumer once the workers are
  stopped (for quorum queues the message counts that `rabbitmqctl` and
  `queue.declare-ok` report can lag behind; what a consumer gets does not).
* Figures for docs/reliability.md: `record(...)` appends one JSON line per
  fault run to `$FLAAP_MQ_RELIABILITY_OUT` when that is set.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psutil

from flaap_mq.executor import wait_until_gone
from flaap_mq.local.workers import WorkerFleet

# Outcomes that mean the request really ran on the executor.
EXECUTED = frozenset({"ok", "executor_error", "deadline_exceeded", "executor_unavailable"})


def read_events(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The JSON events in worker log files (TF's own noise lines are skipped)."""
    events = []
    for path in paths:
        if not Path(path).exists():
            continue
        for line in Path(path).read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def fleet_events(fleet: WorkerFleet) -> list[dict[str, Any]]:
    return read_events(w.log_path for w in fleet.workers.values() if w.log_path)


@dataclasses.dataclass
class Tally:
    """What the workers' `task` lines say."""

    task_ids: set[str]
    executions: collections.Counter[str]
    outcomes: collections.Counter[str]
    cached_answers: int
    redelivered: int
    incarnations: set[str]

    @property
    def duplicate_executions(self) -> int:
        """Extra runs of a task id beyond its first (0 is the guarantee)."""
        return sum(n - 1 for n in self.executions.values() if n > 1)

    @property
    def duplicated_ids(self) -> list[str]:
        return sorted(t for t, n in self.executions.items() if n > 1)


def tally(events: Iterable[dict[str, Any]]) -> Tally:
    task_ids: set[str] = set()
    executions: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    cached = redelivered = 0
    incarnations: set[str] = set()
    for e in events:
        if e.get("event") != "task":
            continue
        outcome = e.get("outcome")
        outcomes[outcome] += 1
        task_id = e.get("task_id")
        if task_id:
            task_ids.add(task_id)
        if e.get("cached"):
            cached += 1
        elif outcome in EXECUTED and task_id:
            executions[task_id] += 1
        if e.get("redelivered"):
            redelivered += 1
        if e.get("incarnation"):
            incarnations.add(e["incarnation"])
    return Tally(task_ids, executions, outcomes, cached, redelivered, incarnations)


# ------------------------------------------------------------------ queues


def _connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url.split(",")[0])
    params.socket_timeout = params.stack_timeout = 10
    params.blocked_connection_timeout = 10
    return pika.BlockingConnection(params)


def drain(url: str, queue: str, *, settle_s: float = 1.0) -> list[tuple[Any, bytes]]:
    """Takes every message out of `queue`: [(properties, body)]; [] if it does not exist."""
    taken: list[tuple[Any, bytes]] = []
    connection = _connect(url)
    try:
        channel = connection.channel()
        try:
            # A consumer, not basic.get: quorum queues with a single active
            # consumer refuse basic.get. The workers are stopped by now, so
            # this consumer is the active one.
            for method, properties, body in channel.consume(
                queue, auto_ack=True, inactivity_timeout=settle_s
            ):
                if method is None:
                    break
                taken.append((properties, body))
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                return taken
            raise
        return taken
    finally:
        if connection.is_open:
            connection.close()


def queue_exists(url: str, queue: str) -> bool:
    connection = _connect(url)
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return False
        raise
    finally:
        if connection.is_open:
            connection.close()


def message_count(url: str, queue: str) -> int | None:
    connection = _connect(url)
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return None
    finally:
        if connection.is_open:
            connection.close()


def dead_letter_reason(properties: Any) -> str | None:
    """Why the broker dead-lettered a message (`x-death`): rejected, expired, delivery_limit.

    A worker rejects a task it cannot run and logs the detail
    (`logged_dead_letters`); the message carries only the broker's reason.
    """
    headers = properties.headers or {}
    deaths = headers.get("x-death") or []
    if deaths:
        reason = deaths[0].get("reason")
        return reason.decode() if isinstance(reason, bytes) else str(reason)
    return None


def logged_dead_letters(events: Iterable[dict[str, Any]]) -> dict[str, str]:
    """message_id -> the reason the worker logged (`task_dead_lettered`) for rejecting it."""
    return {
        str(e.get("message_id")): str(e.get("reason"))
        for e in events
        if e.get("event") == "task_dead_lettered"
    }


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.2)


def wait_queues_empty(url: str, queues: Sequence[str], timeout_s: float = 60.0) -> None:
    """Waits until the workers have taken everything (e.g. the final disposals)."""

    def empty() -> bool:
        return all((message_count(url, q) or 0) == 0 for q in queues)

    wait_until(empty, timeout_s, f"queues {list(queues)} empty")
    time.sleep(0.5)  # tasks just delivered finish and are acked


# --------------------------------------------------------------- processes


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def assert_nothing_left(fleet: WorkerFleet, executor_pids: Iterable[int] = ()) -> None:
    """Every worker process of `fleet` exited, and every executor it ever started."""
    fleet.close()
    alive = [s for s, w in fleet.workers.items() if w.process.poll() is None]
    assert not alive, f"workers still running: {alive}"
    for pid in executor_pids:
        assert wait_until_gone(pid, 15), f"worker_binary {pid} outlived its worker"


# ----------------------------------------------------------------- figures


def record(fault: str, **figures: Any) -> None:
    """One row of measured figures for docs/reliability.md."""
    line = json.dumps({"fault": fault, **figures}, sort_keys=True)
    print(f"\nRELIABILITY {line}")
    out = os.environ.get("FLAAP_MQ_RELIABILITY_OUT")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


# ----------------------------------------------------------- broker faults


def close_connections_of(node: Any, pid: int, reason: str = "fault injected by test") -> int:
    """Closes, in the broker, every AMQP connection process `pid` has to `node`; returns how many.

    The connection is found by its client-side port, so only that process is hit.
    """
    ports = {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == node.port
    }
    closed = 0
    for line in node.rabbitmqctl("list_connections", "-q", "pid", "peer_port").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit() and int(fields[1]) in ports:
            node.rabbitmqctl("close_connection", fields[0], reason)
            closed += 1
    return closed
