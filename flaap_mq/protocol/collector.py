"""A chunked payload put back together as its slices arrive, within stated bounds.

The receiving half of `flaap_mq.protocol.chunking`: a `Collector` writes
each slice, as it arrives, into one buffer of the payload's declared size
and feeds it to a running SHA-256; once the last one is in, `Parts` hands
the buffer on, checked against the declared length and digest (`Parts.view`).
Both sides use it: the worker for a task's request, the coordinator for a
reply's response.

Slices of one task arrive in order (one queue, one active consumer), but a
worker that restarted may get the last slice of a task whose first slices
went to its previous incarnation: that is `ChunksMissing`, which the worker
answers as retryable lost state.

What a sender can make a receiver hold
--------------------------------------
A peer is not trusted with the receiver's memory: a hostile silo (against
the coordinator) or coordinator (against a worker) cannot make a `Collector`
hold more than `Limits.max_pending_bytes`, however it lies:

* A transfer is charged its declared size from its first slice on, plus
  bookkeeping (`TRANSFER_COST` a transfer, `SLICE_COST` a slice): that is
  its buffer, made then, into which each slice is copied when it arrives;
  its message is not kept. A buffer of a megabyte or more is an anonymous
  memory map, whose pages the system provides only as they are written, so
  a transfer that never gets its slices holds less than it is charged, but
  a peer cannot reserve more address space (or more maps) than the budget.
  A body that carries far more than its slice (its payload field written
  many times: protobuf keeps the last, but the body is as big as all of
  them) is refused: nothing flaap-mq sends exceeds its slice by more than
  the envelope's few hundred bytes, so `Limits.max_envelope_bytes` of slack
  costs an honest sender nothing.
* A transfer's declared size is capped (`max_transfer_bytes`, `max_slices`)
  and must fit in what is left of the budget when its first slice arrives;
  its slices may not add up to more than it declared.
* Charges last until the buffer is handed on: a complete transfer stays
  charged until it is handed on (or dropped), so complete transfers
  waiting for a worker thread count too.
* A partial transfer is dropped at its task's deadline (at `max_age_s`
  without one), on any inconsistency, and when its receiver says
  so (`discard`: the coordinator drops a call's transfer when the call ends).

What the collector does not bound: a payload once handed on is the task's
request (or the call's response) like any unchunked one, one per running
task.

Why one module of some 430 lines: it is one class and the limits it keeps
(above), which every path of `add` must charge and release alike.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import itertools
import mmap
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from flaap_mq.protocol.chunking import Buffer, ChunkError
from flaap_mq.protocol.v1 import task_pb2

# Bookkeeping charged per slice, and per transfer on top of its key and its
# buffer (the transfer's record, its dict entry, its expiry entry, its
# digests, its running SHA-256, its buffer's object): rounded up, so the
# charge is never below what is really held.
SLICE_COST = 256
TRANSFER_COST = 1024
# From this size a transfer's buffer is an anonymous memory map (pages
# provided as they are written); below it, a bytearray.
_MAP_FROM_BYTES = 1024 * 1024

_SHA256_BYTES = hashlib.sha256().digest_size


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


Slice = bytes | memoryview


def pinned_size(part: Slice) -> int:
    """The bytes `part` keeps alive: a view pins the whole buffer it was cut from.

    A slice far smaller than the message it is cut from is refused (see the
    module docstring), though it is copied out and its message not kept.
    """
    if isinstance(part, memoryview) and part.obj is not None:
        return memoryview(part.obj).nbytes
    return len(part)


def new_buffer(size: int) -> bytearray | mmap.mmap:
    """A zeroed buffer of `size` bytes; a large one takes memory only where written."""
    if size < _MAP_FROM_BYTES:
        return bytearray(size)
    return mmap.mmap(-1, size)


def monotonic_deadline(deadline_unix_ms: int) -> float | None:
    """A task's deadline (Unix ms, 0 for none) on the `time.monotonic` clock."""
    if not deadline_unix_ms:
        return None
    return time.monotonic() + (deadline_unix_ms / 1000 - time.time())


class Parts:
    """One whole payload, written slice by slice into one buffer; handed on once, checked.

    The buffer stays charged to its collector until handed on (`view`), or
    until this object is dropped unused (a task refused before it was read).
    """

    def __init__(
        self,
        task_id: str,
        count: int,
        sha256: bytes,
        total_size: int,
        buffer: Buffer | mmap.mmap,
        digest: bytes,
        *,
        charge: int = 0,
        release: Callable[[int], object] = lambda _charge: None,
    ) -> None:
        self.task_id = task_id
        self.count = count
        self.sha256 = sha256  # declared by the sender
        self.total_size = total_size
        self._buffer: Buffer | mmap.mmap | None = buffer
        self._digest = digest  # of what arrived, taken slice by slice
        # Gives `charge` back once: when handed on, or when this object is collected.
        self._release = weakref.finalize(self, release, charge)
        self._release.atexit = False

    def view(self) -> memoryview:
        """The whole payload, checked, read-only, in the buffer the slices were written into.

        Raises `ChunkError` if its length or digest is wrong. No copy and no
        pass over the payload: the digest was taken as the slices arrived.
        Lets go of the buffer and of its charge: the caller holds the payload,
        as it holds an unchunked one (the worker sends it on to its executor,
        the coordinator reads arrays from it, `value_read`).
        """
        if self._buffer is None:
            raise ChunkError(f"task {self.task_id}: slices already handed on")
        buffer, self._buffer = self._buffer, None
        self._release()
        if len(buffer) != self.total_size:
            raise ChunkError(
                f"task {self.task_id}: reassembled {len(buffer)} bytes, expected {self.total_size}"
            )
        if self._digest != self.sha256:
            raise ChunkError(f"task {self.task_id}: reassembled payload fails its SHA-256 check")
        return memoryview(buffer).toreadonly()


@dataclasses.dataclass
class _Transfer:
    """One partial transfer: what its first slice declared, and what arrived so far."""

    serial: int
    count: int
    sha256: bytes
    total_size: int
    expires: float
    buffer: bytearray | mmap.mmap | None = None  # of `total_size`, made by `Collector._start`
    digest: Any = dataclasses.field(default_factory=hashlib.sha256)  # of what arrived
    slices: int = 0  # slices written into `buffer`
    received: int = 0  # payload bytes written into `buffer`
    charged: int = 0  # what the record, the buffer and the slices are charged


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
        """What transfers are charged now (their buffers): never above `max_pending_bytes`."""
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
        """Writes one slice into its transfer's buffer; returns the whole once the last is in.

        The slice (and the message it is a view of) is not kept.
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
            if chunk.index < transfer.slices:
                return None  # a redelivered slice we already hold
            try:
                self._store(task_id, transfer, chunk.index, part)
            except ChunkError:
                self._drop(task_id)
                raise
            if transfer.slices < transfer.count:
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
        try:
            transfer.buffer = new_buffer(chunk.total_size)
        except (OSError, MemoryError) as e:
            raise ChunkError(
                f"task {task_id}: no buffer of {chunk.total_size} bytes for its payload: {e}"
            ) from None
        transfer.charged = record + chunk.total_size
        self._charged += transfer.charged
        self._partials[task_id] = transfer
        heapq.heappush(self._expiry, (expires, transfer.serial, task_id))
        return transfer

    def _store(self, task_id: str, transfer: _Transfer, index: int, part: Slice) -> None:
        """Writes slice `index` into `transfer`'s buffer and charges it, or raises why not."""
        if index != transfer.slices:
            raise ChunksMissing(
                f"task {task_id}: chunk {index} arrived after {transfer.slices} "
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
        # The buffer the slice goes into was charged when the transfer began.
        cost = SLICE_COST
        if self._charged + cost > self.limits.max_pending_bytes:
            raise ChunkError(
                f"task {task_id}: reassembly would hold more than "
                f"{self.limits.max_pending_bytes} bytes (max_pending_bytes)"
            )
        assert transfer.buffer is not None  # made by `_start`
        end = transfer.received + len(part)
        transfer.buffer[transfer.received : end] = part
        transfer.digest.update(part)
        transfer.slices += 1
        transfer.received = end
        transfer.charged += cost
        self._charged += cost

    def _hand_out(self, task_id: str, transfer: _Transfer) -> Parts:
        """The complete transfer, still charged until handed on or dropped."""
        assert transfer.buffer is not None  # made by `_start`
        return Parts(
            task_id,
            transfer.count,
            transfer.sha256,
            transfer.total_size,
            transfer.buffer,
            transfer.digest.digest(),
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
