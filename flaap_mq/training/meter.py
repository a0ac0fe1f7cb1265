"""Counts the executor payload bytes a coordinator exchanges with its silos.

`TaskClient` logs each task's request and response sizes at debug level but
keeps no totals; `PayloadMeter` observes one client's requests
(`TaskClient.observe`) and adds them up, overall and per silo, so that a
training loop can report bytes per round. The sizes are those of TFF's
executor requests and responses (the `Task` payload), before the envelope
and any chunking.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

from flaap_mq.coordinator.task_client import Exchange


@dataclasses.dataclass(frozen=True)
class PayloadCounts:
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    sent_by_silo: dict[str, int] = dataclasses.field(default_factory=dict)
    received_by_silo: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def bytes_total(self) -> int:
        return self.bytes_sent + self.bytes_received

    def __sub__(self, before: PayloadCounts) -> PayloadCounts:
        def minus(now: dict[str, int], then: dict[str, int]) -> dict[str, int]:
            return {k: v - then.get(k, 0) for k, v in now.items()}

        return PayloadCounts(
            self.requests - before.requests,
            self.bytes_sent - before.bytes_sent,
            self.bytes_received - before.bytes_received,
            minus(self.sent_by_silo, before.sent_by_silo),
            minus(self.received_by_silo, before.received_by_silo),
        )


class PayloadMeter:
    """Totals of request and response bytes through one `TaskClient`."""

    def __init__(self, client: Any) -> None:
        self._lock = threading.Lock()
        self._requests = 0
        self._sent: collections.Counter[str] = collections.Counter()
        self._received: collections.Counter[str] = collections.Counter()
        client.observe(self._record)

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self._requests += 1
            self._sent[exchange.silo_id] += exchange.bytes_sent
            self._received[exchange.silo_id] += exchange.bytes_received

    def snapshot(self) -> PayloadCounts:
        with self._lock:
            return PayloadCounts(
                self._requests,
                sum(self._sent.values()),
                sum(self._received.values()),
                dict(self._sent),
                dict(self._received),
            )
