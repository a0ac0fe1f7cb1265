"""One HTTP/2 connection to TFF's executor service, carrying one unary gRPC call at a time.

What `ExecutorClient` (client.py) needs of HTTP/2 (RFC 9113) and of gRPC's
mapping onto it (gRPC's PROTOCOL-HTTP2.md), and nothing more: the
handshake; a call's HEADERS and DATA within the server's flow-control
windows; the answer's frames read as they come, its DATA straight into the
one buffer its gRPC message prefix sizes (`_Call`); settings, pings, window
updates, GOAWAY and resets answered or turned into an `ExecutorCallError`
that names them. Header blocks are coded by `headers.py`. A deadline
bounds every wait on the socket. Small frames are read from a read-ahead
buffer (an answer is about five frames: one `recv` for all of them, where
each frame head and payload took one), large DATA straight into its place;
a call's HEADERS and DATA go in one `sendmsg` where the windows allow.

Longer than 400 lines, as one state machine: every frame a server may send
is read in one place (`Connection._read_frame`), so that what RFC 9113
requires of a client (counted windows, checked lengths, one header block at
a time, in order) reads in one place too.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
import urllib.parse

import grpc
import hpack

from flaap_mq.executor.headers import AnswerHeaders, RequestHeaders
from flaap_mq.protocol.collector import new_buffer

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEAD = struct.Struct(">I B I")  # 24-bit length in the high bytes of the first field
_MESSAGE_HEAD = struct.Struct(">BI")  # gRPC's compressed flag and message length

# Frame types and flags (RFC 9113, section 6).
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
_END_STREAM = _ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY = 0x20

_SETTINGS_HEADER_TABLE_SIZE = 0x1
_SETTINGS_ENABLE_PUSH = 0x2
_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
_SETTINGS_MAX_FRAME_SIZE = 0x5

_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65_535
_DEFAULT_FRAME = 16_384
# The largest DATA frame we accept: few frames for a large answer, each
# read straight into its place.
_MAX_INBOUND_FRAME = 1 << 20
# What one `recv` may read ahead of the frame being read; a read of at least
# a quarter of it goes straight into its target instead.
_READ_AHEAD = 64 * 1024
# Frames handed to one `sendmsg` (two buffers each; Linux takes 1024).
_FRAMES_PER_SEND = 256
# The largest header block accepted, compressed (`hpack`'s decoder refuses
# more than 64 KiB of headers once decoded).
_MAX_HEADER_BLOCK = 64 * 1024
_MIN_FRAME, _MAX_FRAME = 16_384, 2**24 - 1  # what SETTINGS_MAX_FRAME_SIZE may be
_PUSH_PROMISE = 0x5

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
_REFUSED_STREAM = 0x7
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# The payload lengths RFC 9113 fixes (SETTINGS: a multiple of 6, checked where read).
_FIXED_LENGTHS = {_RST_STREAM: 4, _PING: 8, _WINDOW_UPDATE: 4}
# RST_STREAM error codes as gRPC maps them (PROTOCOL-HTTP2.md, "Errors").
_RESET_STATUS = {
    0x0: grpc.StatusCode.INTERNAL,  # NO_ERROR before the call ended
    0x7: _UNAVAILABLE,  # REFUSED_STREAM
    0x8: grpc.StatusCode.CANCELLED,  # CANCEL
    0xB: grpc.StatusCode.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: grpc.StatusCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}


class ExecutorCallError(Exception):
    """A call that did not return an answer: the server's status, or why the client gave up."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{code.name if code else 'UNKNOWN'}: {details}")
        self.code = code
        self.details = details

    @property
    def unavailable(self) -> bool:
        return self.code in (_UNAVAILABLE, grpc.StatusCode.CANCELLED)


class NotTaken(ExecutorCallError):
    """The server did not take the call (GOAWAY before it, REFUSED_STREAM, or the
    connection gone before the request was all sent): safe to send again."""


def grpc_timeout(seconds: float) -> str:
    """`seconds` as gRPC's `grpc-timeout` header value: at most 8 digits and a unit."""
    for unit, per_second in (("m", 1000), ("S", 1), ("M", 1 / 60), ("H", 1 / 3600)):
        value = max(1, int(seconds * per_second + 0.999999))  # never round down to less time
        if value < 10**8:
            return f"{value}{unit}"
    return "99999999H"


class Connection:
    """One HTTP/2 connection: the handshake, then one unary call at a time."""

    def __init__(self, target: str) -> None:
        self._target = target
        # `handoff:PATH`: the server at PATH answers with a socket connected to
        # the executor (the sandbox's `relay.hand_out`), which we then use.
        self._handed = target.startswith("handoff:")
        try:
            if target.startswith(("unix:", "handoff:")):
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._address: str | tuple[str, int] = target.partition(":")[2]
            else:
                host, _, port = target.rpartition(":")
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._address = (host.strip("[]"), int(port))
        except (OSError, ValueError) as e:
            raise ExecutorCallError(_UNAVAILABLE, f"bad target {target!r}: {e}") from e
        self._request_headers = RequestHeaders()
        self._answer_headers = AnswerHeaders()
        self._ahead = memoryview(bytearray(_READ_AHEAD))
        self._ahead_at = self._ahead_end = 0  # the unread bytes: [at, end)
        self._next_stream = 1
        self._send_window = _DEFAULT_WINDOW  # the server's, for the whole connection
        self._peer_initial_window = _DEFAULT_WINDOW
        self._peer_max_frame = _DEFAULT_FRAME
        self._stream_window = 0  # the server's, for the call running
        self._received = 0  # DATA bytes since our last connection WINDOW_UPDATE
        self._settings_seen = False
        self._closed = False
        self.reusable = True

    def open(self, deadline: float | None) -> None:
        """Connects and exchanges settings; `ExecutorCallError` if that fails."""
        with self._io(f"connecting to {self._target}", deadline):
            self._sock.connect(self._address)
            if self._handed:
                self._take_handed_socket()
            self._handshake(deadline)

    def _take_handed_socket(self) -> None:
        """Replaces our Unix socket by the connected socket the server sends over it."""
        data, fds, _, _ = socket.recv_fds(self._sock, 1, 1, socket.MSG_CMSG_CLOEXEC)
        if data != b"+" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(f"no connection to the executor was handed over (got {data!r})")
        try:
            handed = socket.socket(fileno=fds[0])  # OSError if it is no socket
        except OSError:
            os.close(fds[0])
            raise
        unix, self._sock = self._sock, handed
        unix.close()
        if self._closed:  # `close` ran meanwhile, on the Unix socket
            self._sock.close()
            raise OSError("the connection was closed")

    def catch_up(self) -> bool:
        """Reads what the server sent while this connection was idle; False if it is unusable.

        A server may have sent settings, pings, window updates, or a GOAWAY,
        or closed the connection: a call sent on it then would fail though
        the server never saw it.
        """
        try:
            with self._io("reading an idle connection", time.monotonic() + 1.0):
                while self.reusable and (
                    self._ahead_at < self._ahead_end or select.select([self._sock], [], [], 0)[0]
                ):
                    self._read_frame(time.monotonic() + 1.0, None)
        except ExecutorCallError:
            return False
        return self.reusable

    def close(self) -> None:
        self._closed = True
        self.reusable = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a call blocked on it
        self._sock.close()

    def _handshake(self, deadline: float | None) -> None:
        """Our preface, settings and window; then the server's settings, acknowledged."""
        settings = struct.pack(
            ">HIHIHIHI",
            _SETTINGS_ENABLE_PUSH,
            0,
            _SETTINGS_INITIAL_WINDOW_SIZE,
            _MAX_WINDOW,
            _SETTINGS_MAX_FRAME_SIZE,
            _MAX_INBOUND_FRAME,
            _SETTINGS_HEADER_TABLE_SIZE,
            4096,
        )
        self._sock.sendall(
            _PREFACE
            + _frame_head(len(settings), _SETTINGS, 0, 0)
            + settings
            + _window_update(0, _MAX_WINDOW - _DEFAULT_WINDOW)
        )
        while not self._settings_seen:
            self._read_frame(deadline, None)

    def call(
        self,
        method: str,
        request: list[memoryview],
        deadline: float | None,
        max_message_bytes: int,
    ) -> memoryview:
        if self._next_stream >= _MAX_WINDOW:  # stream ids are spent: use another connection
            self.reusable = False
            raise ExecutorCallError(_UNAVAILABLE, "connection has no stream ids left")
        stream, self._next_stream = self._next_stream, self._next_stream + 2
        call = _Call(stream, max_message_bytes)
        timeout = None if deadline is None else grpc_timeout(deadline - time.monotonic())
        block = self._request_headers.block(method, timeout)
        size = sum(piece.nbytes for piece in request)
        try:
            with self._io(method, deadline):
                try:
                    self._stream_window = self._peer_initial_window
                    message = [memoryview(_MESSAGE_HEAD.pack(0, size)), *request]
                    headers = _frame_head(len(block), _HEADERS, _END_HEADERS, stream) + block
                    self._send_data(call, headers, message, deadline)
                except (BrokenPipeError, ConnectionResetError) as e:
                    # Gone before the request was all sent (its END_STREAM with
                    # it): the server cannot have started the call.
                    self.reusable = False
                    raise NotTaken(_UNAVAILABLE, f"{method}: {e.strerror or e}") from None
                while not call.ended:
                    self._read_frame(deadline, call)
        except BaseException:
            if not call.ended:  # a frame may be half read: nothing more can be read here
                self.reusable = False
            raise
        return call.answer(method)

    def _send_data(
        self, call: _Call, headers: bytes, pieces: list[memoryview], deadline: float | None
    ) -> None:
        """Sends the call's `headers` frame, then `pieces` as DATA frames within the
        server's windows, the last ending the stream."""
        pieces = [p.cast("B") if p.format != "B" or p.ndim != 1 else p for p in pieces]
        left = sum(p.nbytes for p in pieces)
        frames: list[memoryview | bytes] = [headers]
        while True:
            allowed = min(left, self._send_window, self._stream_window)
            if allowed <= 0 and left:  # a window may even be negative (RFC 9113, 6.9.2)
                if frames:
                    _send_all(self._sock, frames, deadline)
                    frames = []
                self._read_frame(deadline, call)  # a WINDOW_UPDATE, or the call's end
                if call.ended:  # the server answered (an error) before taking it all:
                    self.reusable = False  # our half of the stream is left open
                    return
                continue
            while allowed:
                size = min(allowed, self._peer_max_frame)
                left -= size
                allowed -= size
                self._send_window -= size
                self._stream_window -= size
                frames.append(_frame_head(size, _DATA, 0 if left else _END_STREAM, call.stream))
                while size:
                    piece = pieces[0]
                    if piece.nbytes <= size:
                        frames.append(pieces.pop(0))
                        size -= piece.nbytes
                    else:
                        frames.append(piece[:size])
                        pieces[0] = piece[size:]
                        size = 0
                if len(frames) >= 2 * _FRAMES_PER_SEND:
                    _send_all(self._sock, frames, deadline)
                    frames = []
            if not left:
                _send_all(self._sock, frames, deadline)
                return

    def _read_frame(self, deadline: float | None, call: _Call | None) -> None:
        """Reads one frame and does what it asks: settings, pings, windows, the call's parts."""
        head = self._read_exactly(9, deadline)
        first, flags, stream = _FRAME_HEAD.unpack(head)
        length, kind, stream = first >> 8, first & 0xFF, stream & _MAX_WINDOW
        if length > _MAX_INBOUND_FRAME:
            raise self._protocol_error(f"a frame of {length} bytes, over the {_MAX_INBOUND_FRAME}")
        if length != _FIXED_LENGTHS.get(kind, length) or (kind == _GOAWAY and length < 8):
            raise self._protocol_error(f"a frame of type {kind:#x} of {length} bytes")
        if kind == _PUSH_PROMISE:
            raise self._protocol_error("a PUSH_PROMISE, though push is disabled")
        if kind == _DATA:
            self._received += length
            if self._received >= _MAX_WINDOW // 2:  # keep the connection's window open
                self._sock.sendall(_window_update(0, self._received))
                self._received = 0
        if kind == _DATA and call is not None and stream == call.stream:
            if not call.has_headers:
                raise self._protocol_error("DATA before the answer's headers")
            padding = self._read_exactly(1, deadline)[0] if flags & _PADDED else 0
            data = length - (1 if flags & _PADDED else 0) - padding
            if data < 0:
                raise self._protocol_error("DATA frame padding longer than the frame")
            while data:
                target = call.next_target(data)
                self._read_into(target, deadline)
                call.filled(target.nbytes)
                data -= target.nbytes
            self._read_exactly(padding, deadline)
            if flags & _END_STREAM:
                call.end_without_trailers()
            return
        payload = self._read_exactly(length, deadline)
        if kind in (_HEADERS, _CONTINUATION):
            self._on_headers(kind, flags, stream, payload, deadline, call)
        elif kind == _SETTINGS:
            if not flags & _ACK:
                self._on_settings(payload)
        elif kind == _PING:
            if not flags & _ACK:
                self._sock.sendall(_frame_head(8, _PING, _ACK, 0) + payload)
        elif kind == _WINDOW_UPDATE:
            increment = struct.unpack(">I", payload)[0] & _MAX_WINDOW
            if stream == 0:
                self._send_window = self._grown(self._send_window, increment)
            elif call is not None and stream == call.stream:
                self._stream_window = self._grown(self._stream_window, increment)
        elif kind == _RST_STREAM and call is not None and stream == call.stream:
            code = struct.unpack(">I", payload)[0]
            self.reusable = False
            error = NotTaken if code == _REFUSED_STREAM else ExecutorCallError
            raise error(
                _RESET_STATUS.get(code, grpc.StatusCode.INTERNAL),
                f"the server reset the call (HTTP/2 error code {code:#x})",
            )
        elif kind == _GOAWAY:
            self.reusable = False
            last_stream = struct.unpack(">I", payload[:4])[0] & _MAX_WINDOW
            if call is not None and call.stream > last_stream:
                raise NotTaken(_UNAVAILABLE, "the server is going away")
        # Anything else (PRIORITY, frames of closed streams, unknown types) is ignored,
        # as RFC 9113 asks.

    def _on_headers(
        self,
        kind: int,
        flags: int,
        stream: int,
        payload: bytes,
        deadline: float | None,
        call: _Call | None,
    ) -> None:
        if kind == _CONTINUATION:
            raise self._protocol_error("CONTINUATION frame without HEADERS before it")
        view = memoryview(payload)
        if flags & _PADDED:
            if not view or view[0] >= len(view):
                raise self._protocol_error("HEADERS padding as long as the frame")
            view = view[1 : len(view) - view[0]]
        if flags & _PRIORITY:
            if len(view) < 5:
                raise self._protocol_error("HEADERS too short for its priority")
            view = view[5:]
        block = bytearray(view)
        ends_stream = bool(flags & _END_STREAM)
        while not flags & _END_HEADERS:  # the block goes on in CONTINUATION frames
            first, flags, next_stream = _FRAME_HEAD.unpack(self._read_exactly(9, deadline))
            length, kind = first >> 8, first & 0xFF
            if kind != _CONTINUATION or next_stream & _MAX_WINDOW != stream:
                raise self._protocol_error("a header block broken off")
            if len(block) + length > _MAX_HEADER_BLOCK:
                raise self._protocol_error(f"a header block over {_MAX_HEADER_BLOCK} bytes")
            block += self._read_exactly(length, deadline)
        try:
            # Decoded even when not ours: the decoder's table must see every block.
            fields = self._answer_headers.decode(bytes(block))
        except hpack.HPACKError as e:
            raise self._protocol_error(f"an undecodable header block ({e})") from e
        if call is not None and stream == call.stream:
            call.headers(fields, ends_stream)

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise self._protocol_error("a SETTINGS frame of a length not a multiple of 6")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == _SETTINGS_INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise self._protocol_error(f"an initial window of {value} bytes")
                self._stream_window += value - self._peer_initial_window
                self._peer_initial_window = value
            elif key == _SETTINGS_MAX_FRAME_SIZE:
                if not _MIN_FRAME <= value <= _MAX_FRAME:
                    raise self._protocol_error(f"a largest frame of {value} bytes")
                self._peer_max_frame = value
        self._sock.sendall(_frame_head(0, _SETTINGS, _ACK, 0))
        self._settings_seen = True

    def _grown(self, window: int, increment: int) -> int:
        """A send window after a WINDOW_UPDATE; RFC 9113 forbids 0 and more than 2^31-1."""
        if increment == 0 or window + increment > _MAX_WINDOW:
            raise self._protocol_error(f"a window update of {increment} bytes")
        return window + increment

    def _read_exactly(self, size: int, deadline: float | None) -> bytes:
        if self._ahead_end - self._ahead_at >= size:  # the usual case: read ahead already
            start, self._ahead_at = self._ahead_at, self._ahead_at + size
            return bytes(self._ahead[start : self._ahead_at])
        buffer = bytearray(size)
        self._read_into(memoryview(buffer), deadline)
        return bytes(buffer)

    def _read_into(self, target: memoryview, deadline: float | None) -> None:
        """Fills `target`: from the bytes read ahead, then from the socket."""
        ahead = min(self._ahead_end - self._ahead_at, target.nbytes)
        if ahead:
            target[:ahead] = self._ahead[self._ahead_at : self._ahead_at + ahead]
            self._ahead_at += ahead
            target = target[ahead:]
        while target.nbytes:  # nothing is left ahead
            _set_timeout(self._sock, deadline)
            direct = target.nbytes >= _READ_AHEAD // 4
            got = self._sock.recv_into(target if direct else self._ahead)
            if not got:
                self.reusable = False
                raise ExecutorCallError(_UNAVAILABLE, "the server closed the connection mid-call")
            if not direct:
                self._ahead_end = got
                self._ahead_at = min(got, target.nbytes)
                target[: self._ahead_at] = self._ahead[: self._ahead_at]
                got = self._ahead_at
            target = target[got:]

    def _protocol_error(self, what: str) -> ExecutorCallError:
        self.reusable = False
        return ExecutorCallError(grpc.StatusCode.INTERNAL, f"the server broke HTTP/2: {what}")

    @contextlib.contextmanager
    def _io(self, doing: str, deadline: float | None):  # type: ignore[no-untyped-def]
        """Maps socket failures to gRPC statuses, as grpcio reports them."""
        try:
            _set_timeout(self._sock, deadline)
            yield
        except TimeoutError:
            self.reusable = False
            raise ExecutorCallError(_DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except OSError as e:
            self.reusable = False
            raise ExecutorCallError(_UNAVAILABLE, f"{doing}: {e.strerror or e}") from None


class _Call:
    """One call's answer as it arrives: headers, the one message, trailers."""

    def __init__(self, stream: int, max_message_bytes: int) -> None:
        self.stream = stream
        self._max = max_message_bytes
        self._prefix = memoryview(bytearray(_MESSAGE_HEAD.size))
        self._message: memoryview | None = None  # made once the prefix is in
        self._at = 0  # bytes of the prefix, then of the message, received
        self._status: str | None = None  # HTTP's, from the first header block
        self._trailers: dict[str, str] | None = None
        self.ended = False

    def next_target(self, available: int) -> memoryview:
        """Where the next (at most `available`) DATA bytes go."""
        target = self._prefix if self._message is None else self._message
        if self._at == target.nbytes:
            raise self._error("more data than one message of the size its prefix declared")
        return target[self._at : self._at + available]

    def filled(self, count: int) -> None:
        self._at += count
        if self._message is None and self._at == self._prefix.nbytes:
            compressed, size = _MESSAGE_HEAD.unpack(self._prefix)
            if compressed:
                raise self._error("a compressed message, which was not asked for")
            if size > self._max:
                raise ExecutorCallError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"an answer of {size} bytes, over the limit of {self._max}",
                )
            self._message = memoryview(new_buffer(size))
            self._at = 0

    @property
    def has_headers(self) -> bool:
        return self._status is not None

    def headers(self, fields: list[tuple[str, str]], ends_stream: bool) -> None:
        named = dict(fields)
        if self._status is None:
            self._status = named.get(":status", "")
            if not ends_stream:
                return
        self._trailers = named
        self.ended = True

    def end_without_trailers(self) -> None:
        self._trailers = {}
        self.ended = True

    def answer(self, method: str) -> memoryview:
        trailers = self._trailers or {}
        if self._status != "200":
            raise ExecutorCallError(
                grpc.StatusCode.UNKNOWN if self._status else grpc.StatusCode.INTERNAL,
                f"{method}: HTTP status {self._status or 'missing'}",
            )
        if "grpc-status" not in trailers:
            raise self._error("the call ended without a grpc-status")
        status = trailers["grpc-status"]
        number = int(status) if status.isascii() and status.isdecimal() else -1
        code = _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
        if code is not grpc.StatusCode.OK:
            raise ExecutorCallError(code, urllib.parse.unquote(trailers.get("grpc-message", "")))
        if self._message is None or self._at != self._message.nbytes:
            raise self._error("the answer ended before its message did")
        return self._message

    def _error(self, what: str) -> ExecutorCallError:
        return ExecutorCallError(grpc.StatusCode.INTERNAL, f"the server broke gRPC: {what}")


def _frame_head(length: int, kind: int, flags: int, stream: int) -> bytes:
    return _FRAME_HEAD.pack(length << 8 | kind, flags, stream)


def _window_update(stream: int, increment: int) -> bytes:
    return _frame_head(4, _WINDOW_UPDATE, 0, stream) + struct.pack(">I", increment)


def _set_timeout(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        sock.settimeout(None)
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    sock.settimeout(left)


def _send_all(
    sock: socket.socket, buffers: list[memoryview | bytes], deadline: float | None
) -> None:
    """`sendall` for several buffers at once (`sendmsg` may send part of them)."""
    views = [memoryview(b) for b in buffers]
    while views:
        _set_timeout(sock, deadline)  # the whole send, not each part, is bounded
        sent = sock.sendmsg(views[:1024])
        while sent:
            if views[0].nbytes <= sent:
                sent -= views.pop(0).nbytes
            else:
                views[0] = views[0][sent:]
                sent = 0
