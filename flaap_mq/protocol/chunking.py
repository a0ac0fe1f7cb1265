"""Payloads larger than one AMQP message: cut into slices, each labelled.

A model can outgrow the broker's message size limit (RabbitMQ's default is
128 MiB, and operators often set less). A Task's `request` or a TaskResult's
`response` larger than the chunk size travels as several envelopes with the
same task id, each carrying a slice of the payload and a `Chunk` (index,
count, SHA-256 and length of the whole payload). The receiver writes each
slice, as it arrives, into one buffer of the declared size and feeds it to a
running SHA-256 (`collector.Collector`); once the last one is in, `Parts` hands the
buffer on, checked against the declared length and digest, without another
pass over it or a copy (`Parts.view`).

A sender's payload may be one `bytes` or a `Gathered` list of buffers (a
tensor's serialized header and the array's own memory, say): it is never
joined into one piece; each message copies its slice out of the pieces once
(`sliced`, `envelope.encode_task`). The digest is in every slice's header,
so the sender reads the payload once to hash it before it writes the first
message.

Both sides use this one mechanism, and tell a slice the same way: by the
envelope's own `Chunk` (`is_chunked`), which is what decides how its payload
is read. The AMQP header `x-flaap-chunk` ("2/5") only labels slices for
people and tools looking at a queue.

Putting a payload back together on the receiving side, within bounds a
peer cannot push it past, is `flaap_mq.protocol.collector`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from flaap_mq.protocol.v1 import task_pb2

# Payload bytes per message; envelope fields add well under a kilobyte.
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024


class ChunkError(ValueError):
    """A chunked payload that cannot be put back together, or is refused; says why."""


Buffer = bytes | bytearray | memoryview


class Gathered:
    """A payload given as several buffers, one after the other, never joined into one.

    A tensor's serialized `Value` is a few header bytes and the array's own
    memory: `sliced` cuts messages straight out of the pieces, so the payload
    is copied once, into the messages, instead of first into one `bytes`.
    """

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: Iterable[Buffer | Gathered]) -> None:
        views: list[memoryview] = []
        for piece in pieces:
            if isinstance(piece, Gathered):
                views.extend(piece.pieces)
            else:
                view = memoryview(piece)
                if view.nbytes:
                    views.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
        self.pieces: tuple[memoryview, ...] = tuple(views)
        self.size = sum(view.nbytes for view in self.pieces)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)


Payload = bytes | memoryview | Gathered


def pieces_of(payload: Payload) -> tuple[memoryview, ...]:
    """The buffers `payload` is made of, in order (one for `bytes`)."""
    if isinstance(payload, Gathered):
        return payload.pieces
    return (memoryview(payload),)


def sha256_of(payload: Payload) -> bytes:
    """The SHA-256 of the whole payload, read piece by piece (nothing copied)."""
    digest = hashlib.sha256()
    for piece in pieces_of(payload):
        digest.update(piece)
    return digest.digest()


def sliced(
    payload: Payload, chunk_bytes: int
) -> Iterator[tuple[task_pb2.Chunk, tuple[memoryview, ...]]]:
    """The `Chunk` header and the views making each `chunk_bytes` slice, in order.

    Nothing is copied: a slice is one view, or several where it spans pieces
    of a `Gathered` payload. The digest, which every header carries, is
    taken first, in one read of the payload.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_bytes}")
    size = len(payload)
    count = max(1, -(-size // chunk_bytes))
    digest = sha256_of(payload)
    pieces = iter(pieces_of(payload))
    rest = next(pieces, memoryview(b""))
    for index in range(count):
        header = task_pb2.Chunk(index=index, count=count, sha256=digest, total_size=size)
        wanted = min(chunk_bytes, size - index * chunk_bytes)
        part: list[memoryview] = []
        while wanted:
            while not rest.nbytes:
                rest = next(pieces)
            take = min(wanted, rest.nbytes)
            part.append(rest[:take])
            rest, wanted = rest[take:], wanted - take
        yield header, tuple(part)


def is_chunked(chunk: task_pb2.Chunk) -> bool:
    """True if an envelope with this `Chunk` carries one slice of several (both sides ask this)."""
    return chunk.count > 1


# Labels a message as one slice of several, for people and tools reading a
# queue; receivers go by the envelope's `Chunk` (`is_chunked`).
CHUNK_HEADER = "x-flaap-chunk"


def headers(index: int, count: int) -> dict[str, str] | None:
    """The AMQP headers of message `index` (0-based) of `count` carrying one payload."""
    return {CHUNK_HEADER: f"{index + 1}/{count}"} if count > 1 else None
