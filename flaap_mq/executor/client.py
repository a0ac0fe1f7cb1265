"""Unary gRPC calls to TFF's executor service, each answer received into one buffer.

Why not gRPC's own Python client: grpcio receives a message into its core's
buffers, copies them into a growing `bytearray` and that into `bytes`
(`ReceiveMessageOperation` in its Cython layer), so a 1 GiB Compute answer
is held three times at once: that was the silo worker's peak memory
(docs/benchmarks.md). And it sends only `bytes`, so a request that arrived
in slices had to be joined first.

This client speaks only what a unary call to one known, local server needs
of HTTP/2 (RFC 9113) and of gRPC's mapping onto it (gRPC's
PROTOCOL-HTTP2.md; `http2.py`). It sends a request from the caller's buffers as they
are, and reads the answer's DATA frames straight into one buffer of the
size the gRPC message prefix declares: nothing is copied in Python.

A connection (`http2.Connection`) carries one call at a time, on the
caller's thread: there is no reader thread and no multiplexing.
`ExecutorClient` keeps the idle connections, reads what the server sent an
idle one before using it, opens another when none is idle, drops a
connection after an error that leaves it unusable, and sends a call the
server provably never took once more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import grpc

from flaap_mq.executor.http2 import (
    Connection,
    ExecutorCallError,
    NotTaken,
    grpc_timeout,
)
from flaap_mq.protocol.chunking import Buffer

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

__all__ = ["ExecutorCallError", "ExecutorClient", "grpc_timeout"]


class ExecutorClient:
    """Unary gRPC calls to the server at `target`; thread-safe.

    `target` is `HOST:PORT`, `unix:PATH`, or `handoff:PATH`: a Unix socket
    that answers each connection with a socket connected to the server
    (the executor's sandbox, `flaap_mq/executor/inside/relay.py`).

    `max_message_bytes` bounds an answer (RESOURCE_EXHAUSTED above it), as
    grpcio's `max_receive_message_length` does.
    """

    def __init__(self, target: str, *, max_message_bytes: int) -> None:
        self.target = target
        self._max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()
        self._closed = False

    def call(
        self, method: str, request: Buffer | Sequence[Buffer], timeout_s: float | None = None
    ) -> memoryview:
        """Calls `method` (`/package.Service/Method`) with a serialized request.

        `request` may be several buffers, sent one after the other as one
        message. Returns the serialized answer, in a buffer of its own.
        Raises `ExecutorCallError`: the server's status, DEADLINE_EXCEEDED after
        `timeout_s`, UNAVAILABLE if the server cannot be reached or goes away.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pieces = [memoryview(request)] if _is_buffer(request) else [memoryview(p) for p in request]
        connection, pooled = self._take(deadline)
        try:
            return self._call_on(connection, method, pieces, deadline)
        except NotTaken:
            if not pooled:
                raise
        # A pooled connection the server had closed or was closing: it never
        # took the call (grpcio retries such a call transparently, too).
        return self._call_on(self._connect(deadline), method, pieces, deadline)

    def _call_on(
        self,
        connection: Connection,
        method: str,
        pieces: list[memoryview],
        deadline: float | None,
    ) -> memoryview:
        try:
            answer = connection.call(method, pieces, deadline, self._max_message_bytes)
        except ExecutorCallError:
            self._give_back(connection)  # kept only if the exchange ended cleanly
            raise
        except BaseException:
            self._drop(connection)
            raise
        self._give_back(connection)
        return answer

    def wait_ready(self, timeout_s: float) -> None:
        """Returns once the server answers an HTTP/2 handshake (`ExecutorCallError` if it
        does not within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                connection = self._connect(deadline)
            except ExecutorCallError as e:
                if time.monotonic() + 0.05 >= deadline:
                    raise ExecutorCallError(
                        _UNAVAILABLE,
                        f"no gRPC server answered at {self.target} within {timeout_s:.0f} s "
                        f"(last: {e.details})",
                    ) from None
                time.sleep(0.05)
                continue
            self._give_back(connection)
            return

    def close(self) -> None:
        """Closes every connection; a call still running on one fails UNAVAILABLE."""
        with self._lock:
            self._closed = True
            connections, self._idle = list(self._open), []
            self._open.clear()
        for connection in connections:
            connection.close()

    def _take(self, deadline: float | None) -> tuple[Connection, bool]:
        """An idle connection still usable (and True), or a new one (and False)."""
        while True:
            with self._lock:
                if self._closed:
                    raise ExecutorCallError(_UNAVAILABLE, "the client is closed")
                if not self._idle:
                    break
                connection = self._idle.pop()
            if connection.catch_up():
                return connection, True
            self._drop(connection)
        return self._connect(deadline), False

    def _connect(self, deadline: float | None) -> Connection:
        connection = Connection(self.target)
        with self._lock:  # registered first, so that `close` can end its handshake too
            if self._closed:
                raise ExecutorCallError(_UNAVAILABLE, "the client is closed")
            self._open.add(connection)
        try:
            connection.open(deadline)
        except BaseException:
            self._drop(connection)
            raise
        return connection

    def _give_back(self, connection: Connection) -> None:
        with self._lock:
            if not self._closed and connection.reusable:
                self._idle.append(connection)
                return
        self._drop(connection)

    def _drop(self, connection: Connection) -> None:
        with self._lock:
            self._open.discard(connection)
        connection.close()


def _is_buffer(request: object) -> bool:
    return isinstance(request, bytes | bytearray | memoryview)
