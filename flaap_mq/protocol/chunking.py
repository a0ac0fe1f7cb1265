"""Payloads larger than one AMQP message: split, reassemble, verify.

A model can outgrow the broker's message size limit (RabbitMQ's default is
128 MiB, and operators often set less). A Task's `request` or a TaskResult's
`response` larger than the chunk size travels as several envelopes with the
same task id, each carrying a slice of the payload and a `Chunk` (index,
count, SHA-256 and length of the whole payload). The receiver keeps the
slices in a `Reassembler` until the last one arrives; `Parts.join` then puts
them together and checks length and digest before anything uses the payload.
The two steps are apart so that a receiver can collect slices on its I/O
thread, in delivery order, and join and check a large payload elsewhere.

Slices of one task arrive in order (one queue, one active consumer), but a
worker that restarted may get the last slice of a task whose first slices
went to its previous incarnation: that is `ChunksMissing`, which the worker
answers as retryable lost state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Iterator

from flaap_mq.protocol.v1 import task_pb2

# Payload bytes per message; envelope fields add well under a kilobyte.
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024


class ChunkError(ValueError):
    """A chunked payload that cannot be put back together; says why."""


class ChunksMissing(ChunkError):
    """The last slice arrived, but earlier ones never reached this process."""


def slices(payload: bytes, chunk_bytes: int) -> Iterator[tuple[task_pb2.Chunk, memoryview]]:
    """The `Chunk` header and payload slice of each part, in order."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_bytes}")
    count = max(1, -(-len(payload) // chunk_bytes))
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    for index in range(count):
        header = task_pb2.Chunk(index=index, count=count, sha256=digest, total_size=len(payload))
        yield header, view[index * chunk_bytes : (index + 1) * chunk_bytes]


def is_chunked(chunk: task_pb2.Chunk) -> bool:
    return chunk.count > 1


# Marks a message as one slice of several, so a receiver can tell without
# decoding the body.
CHUNK_HEADER = "x-flaap-chunk"


def headers(index: int, count: int) -> dict[str, str] | None:
    """The AMQP headers of message `index` (0-based) of `count` carrying one payload."""
    return {CHUNK_HEADER: f"{index + 1}/{count}"} if count > 1 else None


def has_chunk_header(message_headers: dict | None) -> bool:
    return bool(message_headers) and CHUNK_HEADER in message_headers


Slice = bytes | memoryview


@dataclasses.dataclass
class Parts:
    """Every slice of one payload, in order; `join()` makes and checks the whole."""

    task_id: str
    count: int
    sha256: bytes
    total_size: int
    parts: list[Slice]
    started: float

    def join(self) -> bytes:
        """The whole payload; raises `ChunkError` if its length or digest is wrong."""
        payload = b"".join(self.parts)
        if len(payload) != self.total_size:
            raise ChunkError(
                f"task {self.task_id}: reassembled {len(payload)} bytes, expected {self.total_size}"
            )
        if hashlib.sha256(payload).digest() != self.sha256:
            raise ChunkError(f"task {self.task_id}: reassembled payload fails its SHA-256 check")
        return payload


class Reassembler:
    """Collects slices per task id; bounded in bytes and in age."""

    def __init__(self, max_bytes: int = 2 * 1024**3, max_age_s: float = 3600.0) -> None:
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._partials: dict[str, Parts] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def add(self, task_id: str, chunk: task_pb2.Chunk, part: Slice) -> Parts | None:
        """Stores one slice (not copied); returns all of them once the last one is in."""
        if not 0 <= chunk.index < chunk.count:
            raise ChunkError(f"task {task_id}: chunk index {chunk.index} of {chunk.count}")
        with self._lock:
            self._expire_old()
            partial = self._partials.get(task_id)
            if partial is None:
                if chunk.index != 0:
                    if chunk.index == chunk.count - 1:
                        raise ChunksMissing(
                            f"task {task_id}: got the last of {chunk.count} chunks, but not "
                            "the earlier ones (sent to an earlier worker process?)"
                        )
                    return None  # a stray middle slice of a task we will not complete
                partial = Parts(
                    task_id, chunk.count, chunk.sha256, chunk.total_size, [], time.monotonic()
                )
                self._partials[task_id] = partial
            if (chunk.count, chunk.sha256, chunk.total_size) != (
                partial.count,
                partial.sha256,
                partial.total_size,
            ):
                self._drop(task_id)
                raise ChunkError(f"task {task_id}: chunks disagree about the whole payload")
            if chunk.index < len(partial.parts):
                return None  # a redelivered slice we already hold
            if chunk.index != len(partial.parts):
                self._drop(task_id)
                raise ChunksMissing(
                    f"task {task_id}: chunk {chunk.index} arrived after {len(partial.parts)} "
                    f"of {chunk.count}; some were lost"
                )
            if self._bytes + len(part) > self._max_bytes:
                self._drop(task_id)
                raise ChunkError(
                    f"task {task_id}: reassembly would hold more than {self._max_bytes} bytes"
                )
            partial.parts.append(part)
            self._bytes += len(part)
            if len(partial.parts) < partial.count:
                return None
            self._drop(task_id)
        return partial

    def discard(self, task_id: str) -> None:
        with self._lock:
            self._drop(task_id)

    def _drop(self, task_id: str) -> None:
        partial = self._partials.pop(task_id, None)
        if partial is not None:
            self._bytes -= sum(len(p) for p in partial.parts)

    def _expire_old(self) -> None:
        now = time.monotonic()
        for task_id in [t for t, p in self._partials.items() if now - p.started > self._max_age_s]:
            self._drop(task_id)
