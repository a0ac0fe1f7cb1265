"""Joins the owner, outside the sandbox, to the executor's TCP port inside it.

The executor (TFF's `worker_binary`) can only listen on TCP, on every
interface; inside the sandbox's network namespace "every interface" is a
loopback nobody else shares. The owner reaches it through Unix sockets in a
private directory, two ways:

- `hand_out`: each connection is answered with a TCP socket already
  connected to the executor, passed over the Unix socket (`SCM_RIGHTS`), and
  nothing more. The owner then talks to the executor directly: a socket
  keeps the network namespace it was made in, so this opens nothing in the
  host's, and no byte passes through this process. flaap-mq's own executor
  client (`flaap_mq/executor/client.py`) connects this way.
- `serve`: bytes are relayed, for clients that can only dial a path
  (grpcio's `unix:` channels: TFF's own stub in the tests and benchmarks).

Relayed bytes are moved with `splice(2)` through a pipe, so they are never copied
into Python: a 64 MB value costs two kernel page moves per hop, and a small
message one wake-up per direction. Each connection gets two threads (gRPC
keeps one long-lived connection per channel, so there are few of them);
blocking system calls release the GIL, so directions and connections do not
wait for each other.

Standard library only (see `__main__.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time

_F_SETPIPE_SZ = 1031
# Bytes moved per splice call; the pipe is asked to hold as much (the
# kernel's default cap for unprivileged users, /proc/sys/fs/pipe-max-size).
_CHUNK = 1 << 20
_SPLICE_F_MOVE = 1
MAX_CONNECTIONS = 64


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # a smaller pipe still works, in smaller steps
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, _CHUNK)
    return read_end, write_end


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Moves bytes from `source` to `sink` until `source` ends, then ends `sink`."""
    read_end, write_end = _pipe()
    try:
        while True:
            moved = os.splice(source.fileno(), write_end, _CHUNK, flags=_SPLICE_F_MOVE)
            if moved == 0:
                break
            while moved:
                moved -= os.splice(read_end, sink.fileno(), moved, flags=_SPLICE_F_MOVE)
    except OSError:
        pass  # a reset on either side ends this direction; the other notices
    finally:
        os.close(read_end)
        os.close(write_end)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _join(client: socket.socket, port: int, slots: threading.BoundedSemaphore) -> None:
    try:
        try:
            upstream = socket.create_connection(("127.0.0.1", port))
        except OSError:
            return  # the executor is gone; the caller sees the connection close
        try:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()
        finally:
            upstream.close()
    finally:
        client.close()
        slots.release()


def hand_out(listener: socket.socket, port: int) -> None:
    """Answers each connection on `listener` with a socket connected to `127.0.0.1:port`.

    One byte goes with the descriptor (`SCM_RIGHTS` needs data to ride on):
    `b"+"`, or `b"-"` with no descriptor if the executor refused the
    connection (it is gone; the owner then sees UNAVAILABLE). Our copy of
    the descriptor is closed once sent, so the owner holds the only one.
    """
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            time.sleep(0.1)  # out of descriptors: retried rather than ending
            continue
        with client:
            try:
                upstream = socket.create_connection(("127.0.0.1", port))
            except OSError:
                with contextlib.suppress(OSError):
                    client.sendall(b"-")
                continue
            with upstream:
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with contextlib.suppress(OSError):  # the owner gave up waiting
                    socket.send_fds(client, [b"+"], [upstream.fileno()])


def serve(listener: socket.socket, port: int) -> None:
    """Accepts connections on `listener` forever, each joined to `127.0.0.1:port`.

    At most `MAX_CONNECTIONS` at once (the owner opens one or two; only its
    user may connect at all), and a failed accept (out of descriptors) is
    retried after a pause rather than ending the relay.
    """
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    while True:
        slots.acquire()
        try:
            client, _ = listener.accept()
        except OSError:
            slots.release()
            time.sleep(0.1)
            continue
        threading.Thread(target=_join, args=(client, port, slots), daemon=True).start()
