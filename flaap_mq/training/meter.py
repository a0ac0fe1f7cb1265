"""Counts the executor payload bytes a coordinator exchanges with its silos.

`TaskClient` logs each task's request and response sizes at debug level but
keeps no totals; `PayloadMeter` wraps one client's `call` and
`send_and_forget` (on that instance only) and adds them up, overall and per
silo, so that a training loop can report bytes per round. The sizes are those
of TFF's executor requests and responses (the `Task` payload), before the
envelope and any chunking.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any


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
        call = client.call
        send_and_forget = client.send_and_forget

        async def counted_call(silo_id: str, request: Any, **kwargs: Any) -> Any:
            self._count(silo_id, sent=request.ByteSize())
            response = await call(silo_id, request, **kwargs)
            self._count(silo_id, received=response.ByteSize(), request=False)
            return response

        def counted_send_and_forget(silo_id: str, request: Any) -> None:
            self._count(silo_id, sent=request.ByteSize())
            send_and_forget(silo_id, request)

        client.call = counted_call
        client.send_and_forget = counted_send_and_forget

    def _count(
        self, silo_id: str, *, sent: int = 0, received: int = 0, request: bool = True
    ) -> None:
        with self._lock:
            self._requests += int(request)
            self._sent[silo_id] += sent
            self._received[silo_id] += received

    def snapshot(self) -> PayloadCounts:
        with self._lock:
            return PayloadCounts(
                self._requests,
                sum(self._sent.values()),
                sum(self._received.values()),
                dict(self._sent),
                dict(self._received),
            )
