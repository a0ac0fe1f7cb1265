"""Payloads larger than one AMQP message: split, collect within bounds, verify.

A model can outgrow the broker's message size limit (RabbitMQ's default is
128 MiB, and operators often set less). A Task's `request` or a TaskResult's
`response` larger than the chunk size travels as several envelopes with the
same task id, each carrying a slice of the payload and a `Chunk` (index,
count, SHA-256 and length of the whole payload). The receiver keeps the
slices in a `Collector` until the last one arrives; `Parts.join` then puts
them together and checks length and digest before anything uses the payload.
The two steps are apart so that a receiver can collect slices on its I/O
thread, in delivery order, and join and check a large payload elsewhere.

Both sides use this one mechanism, and tell a slice the same way: by the
envelope's own `Chunk` (`is_chunked`), which is what decides how its payload
is read. The AMQP header `x-flaap-chunk` ("2/5") only labels slices for
people and tools looking at a queue.

Slices of one task arrive in order (one queue, one active consumer), but a
worker that restarted may get the last slice of a task whose first slices
went to its previous incarnation: that is `ChunksMissing`, which the worker
answers as retryable lost state.

What a sender can make a receiver hold
--------------------------------------
A peer is not trusted with the receiver's memory: a hostile silo (against
the coordinator) or coordinator (against a worker) cannot make a `Collector`
hold more than `Limits.max_pending_bytes`, however it lies:

* Slices are charged at what they pin, not at their length. A slice is a
  view of its AMQP body (no copy: an 8 MiB slice is never copied before the
  join), so it keeps the whole body alive; it is charged `len(body)` plus
  bookkeeping (`pinned_size`, `SLICE_COST`). A body that carries far more
  than its slice (its payload field written many times: protobuf keeps the
  last, but the body is as big as all of them) is refused, not charged:
  nothing flaap-mq sends exceeds its slice by more than the envelope's few
  hundred bytes, so `Limits.max_envelope_bytes` of slack costs an honest
  sender nothing. (Copying such a slice out instead would make it cheap to
  hold, but would reward a sender nobody honest resembles.)
* A transfer's declared size is capped (`max_transfer_bytes`, `max_slices`)
  and must fit in what is left of the budget when its first slice arrives;
  its slices may not add up to more than it declared.
* Charges last until the slices are freed: a complete transfer stays charged
  until it is joined (or dropped unjoined), so complete transfers waiting for
  a worker thread count too.
* A partial transfer is dropped at its task's deadline (at `max_age_s`
  without one), on any inconsistency, and when its receiver says
  so (`discard`: the coordinator drops a call's transfer when the call ends).

What the collector does not bound: a payload once joined is the task's
request (or the call's response) like any unchunked one, one per running
task.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from flaap_mq.protocol.v1 import task_pb2

# Payload bytes per message; envelope fields add well under a kilobyte.
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024

# Bookkeeping charged on top of the bytes a slice pins (a memoryview is 184
# bytes, its list slot 8), and per transfer on top of its key (the transfer's
# record, its dict entry, its expiry entry, its digest): rounded up, so the
# charge is never below what is really held.
SLICE_COST = 256
TRANSFER_COST = 1024

_SHA256_BYTES = hashlib.sha256().digest_size


class ChunkError(ValueError):
    """A chunked payload that cannot be put back together, or is refused; says why."""


class ChunksMissing(ChunkError):
    """The last slice arrived, but earlier ones never reached this process."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much chunked data one receiver takes in; see the module docstring.

    The defaults let the largest model flaap-mq is benchmarked with (512 MiB)
    through twice over while bounding a hostile peer.
    """

    # The largest payload a transfer may declare (`Chunk.total_size`).
    max_transfer_bytes: int = 1024**3
    # The most slices a transfer may declare (`Chunk.count`): 1 GiB in 64 KiB slices.
    max_slices: int = 16 * 1024
    # Everything the collector holds at once, charged at what it pins: the
    # bound on this process's memory that no sender can push it past.
    max_pending_bytes: int = 2 * 1024**3
    # How much larger than its slice a slice's message may be (the envelope).
    max_envelope_bytes: int = 64 * 1024
    # When a transfer whose task has no deadline (or a later one) is dropped.
    max_age_s: float = 3600.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"chunk limit {field.name} must be positive")


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
    """True if an envelope with this `Chunk` carries one slice of several (both sides ask this)."""
    return chunk.count > 1


# Labels a message as one slice of several, for people and tools reading a
# queue; receivers go by the envelope's `Chunk` (`is_chunked`).
CHUNK_HEADER = "x-flaap-chunk"


def headers(index: int, count: int) -> dict[str, str] | None:
    """The AMQP headers of message `index` (0-based) of `count` carrying one payload."""
    return {CHUNK_HEADER: f"{index + 1}/{count}"} if count > 1 else None


Slice = bytes | memoryview


def pinned_size(part: Slice) -> int:
    """The bytes `part` keeps alive: a view pins the whole buffer it was cut from."""
    if isinstance(part, memoryview) and part.obj is not None:
        return memoryview(part.obj).nbytes
    return len(part)


def monotonic_deadline(deadline_unix_ms: int) -> float | None:
    """A task's deadline (Unix ms, 0 for none) on the `time.monotonic` clock."""
    if not deadline_unix_ms:
        return None
    return time.monotonic() + (deadline_unix_ms / 1000 - time.time())


class Parts:
    """Every slice of one payload, in order; `join()` makes and checks the whole, once.

    The slices stay charged to their collector until joined, or until this
    object is dropped unjoined (a task refused before it was read).
    """

    def __init__(
        self,
        task_id: str,
        count: int,
        sha256: bytes,
        total_size: int,
        parts: list[Slice],
        *,
        charge: int = 0,
        release: Callable[[int], object] = lambda _charge: None,
    ) -> None:
        self.task_id = task_id
        self.count = count
        self.sha256 = sha256
        self.total_size = total_size
        self.parts = parts
        self._joined = False
        # Gives `charge` back once: at the join, or when this object is collected.
        self._release = weakref.finalize(self, release, charge)
        self._release.atexit = False

    def join(self) -> bytes:
        """The whole payload; raises `ChunkError` if its length or digest is wrong.

        Lets go of the slices (and their messages) and of their charge, so
        that the payload is not held twice while it is used.
        """
        if self._joined:
            raise ChunkError(f"task {self.task_id}: slices already joined")
        self._joined = True
        try:
            payload = b"".join(self.parts)
        finally:
            self.parts = []
            self._release()
        if len(payload) != self.total_size:
            raise ChunkError(
                f"task {self.task_id}: reassembled {len(payload)} bytes, expected {self.total_size}"
            )
        if hashlib.sha256(payload).digest() != self.sha256:
            raise ChunkError(f"task {self.task_id}: reassembled payload fails its SHA-256 check")
        return payload


@dataclasses.dataclass
class _Transfer:
    """One partial transfer: what its first slice declared, and the slices so far."""

    serial: int
    count: int
    sha256: bytes
    total_size: int
    expires: float
    parts: list[Slice] = dataclasses.field(default_factory=list)
    received: int = 0  # payload bytes in `parts`
    charged: int = 0  # what `parts` and the record are charged (see `pinned_size`)


class Collector:
    """Collects the slices of chunked transfers by task id, within `Limits`.

    One per process side (the coordinator's replies, a worker's tasks).
    Thread-safe; `add` is meant for the I/O thread, in delivery order.
    """

    def __init__(
        self, limits: Limits | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or Limits()
        self._clock = clock
        self._partials: dict[str, _Transfer] = {}
        self._expiry: list[tuple[float, int, str]] = []  # heap; entries of dropped ones linger
        self._serials = itertools.count()
        self._charged = 0
        # Charges given back by `Parts` from any thread, the garbage
        # collector's included, where taking the lock could deadlock.
        self._released: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()

    @property
    def pinned_bytes(self) -> int:
        """What is held now, charged as `pinned_size`: never above `max_pending_bytes`."""
        with self._lock:
            self._settle()
            return self._charged

    @property
    def partial_count(self) -> int:
        with self._lock:
            return len(self._partials)

    def add(
        self,
        task_id: str,
        chunk: task_pb2.Chunk,
        part: Slice,
        *,
        expires_at: float | None = None,
    ) -> Parts | None:
        """Stores one slice (not copied); returns all of them once the last one is in.

        `expires_at` is the task's deadline on the collector's clock (see
        `monotonic_deadline`); the partial transfer is dropped then. Returns
        None while slices are missing, and for a slice not stored (a
        duplicate, or a stray slice of a transfer this process does not
        hold). Raises `ChunkError` saying why a slice is refused; the
        transfer it belongs to is dropped.
        """
        if not 0 <= chunk.index < chunk.count:
            raise ChunkError(f"task {task_id}: chunk index {chunk.index} of {chunk.count}")
        now = self._clock()
        with self._lock:
            self._settle()
            self._expire(now)
            transfer = self._partials.get(task_id)
            if transfer is None:
                if chunk.index != 0:
                    if chunk.index == chunk.count - 1:
                        raise ChunksMissing(
                            f"task {task_id}: got the last of {chunk.count} chunks, but not "
                            "the earlier ones (sent to an earlier worker process?)"
                        )
                    return None  # a stray middle slice of a task we will not complete
                transfer = self._start(task_id, chunk, now, expires_at)
            elif (chunk.count, chunk.sha256, chunk.total_size) != (
                transfer.count,
                transfer.sha256,
                transfer.total_size,
            ):
                self._drop(task_id)
                raise ChunkError(f"task {task_id}: chunks disagree about the whole payload")
            if chunk.index < len(transfer.parts):
                return None  # a redelivered slice we already hold
            try:
                self._store(task_id, transfer, chunk.index, part)
            except ChunkError:
                self._drop(task_id)
                raise
            if len(transfer.parts) < transfer.count:
                return None
            self._remove(task_id)
            if transfer.received != transfer.total_size:
                self._charged -= transfer.charged
                raise ChunkError(
                    f"task {task_id}: {transfer.count} chunks hold {transfer.received} bytes, "
                    f"but declared {transfer.total_size}"
                )
        return self._hand_out(task_id, transfer)

    def discard(self, task_id: str) -> None:
        """Drops the partial transfer of `task_id`, if any (its task is over)."""
        with self._lock:
            self._settle()
            self._drop(task_id)

    def expire(self) -> None:
        """Drops partial transfers whose deadline has passed (`add` does this too)."""
        now = self._clock()
        with self._lock:
            self._settle()
            self._expire(now)

    def _start(
        self, task_id: str, chunk: task_pb2.Chunk, now: float, expires_at: float | None
    ) -> _Transfer:
        """A new transfer for a first slice, if what it declares is acceptable."""
        limits = self.limits
        if chunk.count > limits.max_slices:
            raise ChunkError(
                f"task {task_id}: declares {chunk.count} chunks, over this receiver's limit "
                f"of {limits.max_slices} (max_slices)"
            )
        if chunk.total_size > limits.max_transfer_bytes:
            raise ChunkError(
                f"task {task_id}: declares a payload of {chunk.total_size} bytes, over this "
                f"receiver's limit of {limits.max_transfer_bytes} (max_transfer_bytes)"
            )
        if len(chunk.sha256) != _SHA256_BYTES:
            raise ChunkError(f"task {task_id}: chunk digest is {len(chunk.sha256)} bytes, not 32")
        record = TRANSFER_COST + len(task_id)
        least = record + chunk.total_size + chunk.count * SLICE_COST
        if self._charged + least > limits.max_pending_bytes:
            raise ChunkError(
                f"task {task_id}: a payload of {chunk.total_size} bytes does not fit in what "
                f"this receiver holds for transfers ({self._charged} of "
                f"{limits.max_pending_bytes} bytes in use; max_pending_bytes)"
            )
        latest = now + limits.max_age_s
        expires = latest if expires_at is None else min(expires_at, latest)
        if expires <= now:
            raise ChunkError(f"task {task_id}: its deadline passed before its chunks were in")
        transfer = _Transfer(
            next(self._serials), chunk.count, chunk.sha256, chunk.total_size, expires
        )
        transfer.charged = record
        self._charged += record
        self._partials[task_id] = transfer
        heapq.heappush(self._expiry, (expires, transfer.serial, task_id))
        return transfer

    def _store(self, task_id: str, transfer: _Transfer, index: int, part: Slice) -> None:
        """Appends slice `index` to `transfer` and charges it, or raises why not."""
        if index != len(transfer.parts):
            raise ChunksMissing(
                f"task {task_id}: chunk {index} arrived after {len(transfer.parts)} "
                f"of {transfer.count}; some were lost"
            )
        pinned = pinned_size(part)
        if pinned - len(part) > self.limits.max_envelope_bytes:
            raise ChunkError(
                f"task {task_id}: chunk {index} is a {pinned}-byte message for a "
                f"{len(part)}-byte slice (its payload written more than once?)"
            )
        if transfer.received + len(part) > transfer.total_size:
            raise ChunkError(
                f"task {task_id}: chunks add up to more than the declared "
                f"{transfer.total_size} bytes"
            )
        cost = pinned + SLICE_COST
        if self._charged + cost > self.limits.max_pending_bytes:
            raise ChunkError(
                f"task {task_id}: reassembly would hold more than "
                f"{self.limits.max_pending_bytes} bytes (max_pending_bytes)"
            )
        transfer.parts.append(part)
        transfer.received += len(part)
        transfer.charged += cost
        self._charged += cost

    def _hand_out(self, task_id: str, transfer: _Transfer) -> Parts:
        """The complete transfer, still charged until joined or dropped."""
        return Parts(
            task_id,
            transfer.count,
            transfer.sha256,
            transfer.total_size,
            transfer.parts,
            charge=transfer.charged,
            release=self._released.append,
        )

    def _settle(self) -> None:
        while self._released:
            self._charged -= self._released.popleft()

    def _drop(self, task_id: str) -> None:
        """Forgets a partial transfer and its charge."""
        transfer = self._remove(task_id)
        if transfer is not None:
            self._charged -= transfer.charged

    def _remove(self, task_id: str) -> _Transfer | None:
        """Forgets a transfer, still charged (complete ones are charged until joined)."""
        transfer = self._partials.pop(task_id, None)
        if len(self._expiry) > 2 * len(self._partials) + 64:
            # Compact: entries of dropped transfers would otherwise pile up
            # until their deadline, one per transfer a sender started.
            self._expiry = [e for e in self._expiry if self._is_live(e)]
            heapq.heapify(self._expiry)
        return transfer

    def _is_live(self, entry: tuple[float, int, str]) -> bool:
        transfer = self._partials.get(entry[2])
        return transfer is not None and transfer.serial == entry[1]

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            entry = heapq.heappop(self._expiry)
            if self._is_live(entry):
                self._drop(entry[2])
