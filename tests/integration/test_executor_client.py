"""The executor client (`flaap_mq/executor/client.py`) against TFF's real executor
service, and against servers that break the protocol on purpose.

Against the `worker_binary`: its answers are byte for byte grpcio's, its
errors carry the server's status and message, deadlines and concurrent
calls hold. Against a hand-written server on a Unix socket: every way a
server can misbehave ends in an `ExecutorCallError` that names it, never a
hang, and an answer larger than the limit is refused before it is allocated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import hpack
import numpy as np
import pytest

from flaap_mq.executor import ExecutorService
from flaap_mq.executor.client import ExecutorCallError, ExecutorClient, grpc_timeout
from flaap_mq.executor.service import SANDBOX_PORT
from flaap_mq.protocol.v1 import tff_executor_pb2 as light

SERVICE = "/tensorflow_federated.v0.ExecutorGroup/"
LIMIT = 2 * 1000 * 1000 * 1000


def _tff():  # TFF's messages and serialization, imported only by the tests that need them
    from tensorflow_federated.proto.v0 import computation_pb2, executor_pb2
    from tensorflow_federated.python.core.impl.executors import value_serialization
    from tensorflow_federated.python.core.impl.types import computation_types

    return computation_pb2, executor_pb2, value_serialization, computation_types


@pytest.fixture(scope="module")
def service() -> Iterator[ExecutorService]:
    with ExecutorService() as started:
        yield started


@pytest.fixture(scope="module")
def executor_id(service: ExecutorService) -> str:
    computation_pb2, executor_pb2, _, _ = _tff()
    request = executor_pb2.GetExecutorRequest(
        cardinalities=[
            executor_pb2.Cardinality(
                placement=computation_pb2.Placement(uri="clients"), cardinality=1
            )
        ]
    )
    answer = service.call(_kind("GET_EXECUTOR"), request.SerializeToString())
    return light.GetExecutorResponse.FromString(answer).executor.id


def _kind(name: str) -> int:
    from flaap_mq.protocol import envelope

    return int(envelope.RequestKind.Value(name))


def _create_value(client: ExecutorClient, executor: str, array: np.ndarray, pieces: int) -> str:
    """Makes `array` a value in the executor, sending the request in `pieces` buffers."""
    _, executor_pb2, value_serialization, computation_types = _tff()
    value, _ = value_serialization.serialize_value(
        array, computation_types.TensorType(array.dtype, array.shape)
    )
    request = executor_pb2.CreateValueRequest(
        executor=executor_pb2.ExecutorId(id=executor), value=value
    ).SerializeToString()
    step = -(-len(request) // pieces)
    parts = [memoryview(request)[i : i + step] for i in range(0, len(request), step)]
    answer = client.call(SERVICE + "CreateValue", parts)
    return light.CreateValueResponse.FromString(answer).value_ref.id


def _compute_request(executor: str, ref: str) -> bytes:
    return light.ComputeRequest(
        executor=light.ExecutorId(id=executor), value_ref=light.ValueRef(id=ref)
    ).SerializeToString()


def test_a_large_answer_is_grpcios_byte_for_byte_in_one_buffer(
    service: ExecutorService, executor_id: str
) -> None:
    client = ExecutorClient(service.client_target, max_message_bytes=LIMIT)
    channel = service.open_channel()
    try:
        model = np.arange(5_000_000, dtype=np.float32)  # 20 MB, sent in 7 buffers
        ref = _create_value(client, executor_id, model, pieces=7)
        ours = client.call(SERVICE + "Compute", _compute_request(executor_id, ref))
        theirs = channel.unary_unary(SERVICE + "Compute")(_compute_request(executor_id, ref))
        assert len(theirs) > model.nbytes
        assert ours.tobytes() == theirs
        assert memoryview(ours.obj).nbytes == len(theirs)  # one buffer, exactly the answer
    finally:
        channel.close()
        client.close()


def test_the_servers_error_is_raised_with_its_status_and_the_connection_kept(
    service: ExecutorService, executor_id: str
) -> None:
    client = ExecutorClient(service.client_target, max_message_bytes=LIMIT)
    try:
        with pytest.raises(ExecutorCallError) as raised:
            client.call(SERVICE + "Compute", _compute_request(executor_id, "not-a-ref"))
        assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "not-a-ref" in raised.value.details
        ref = _create_value(client, executor_id, np.ones(3, np.float32), pieces=1)
        assert client.call(SERVICE + "Compute", _compute_request(executor_id, ref))
        assert len(client._open) == 1  # the clean error did not cost the connection
    finally:
        client.close()


def test_a_deadline_ends_the_call_and_the_next_call_works(
    service: ExecutorService, executor_id: str
) -> None:
    client = ExecutorClient(service.client_target, max_message_bytes=LIMIT)
    try:
        ref = _create_value(client, executor_id, np.ones(8_000_000, np.float32), pieces=1)
        started = time.monotonic()
        with pytest.raises(ExecutorCallError) as raised:
            client.call(SERVICE + "Compute", _compute_request(executor_id, ref), timeout_s=0.001)
        assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        answer = client.call(SERVICE + "Compute", _compute_request(executor_id, ref))
        assert len(answer) > 32_000_000
    finally:
        client.close()


def test_concurrent_calls_each_get_their_own_answer(
    service: ExecutorService, executor_id: str
) -> None:
    client = ExecutorClient(service.client_target, max_message_bytes=LIMIT)
    _, executor_pb2, value_serialization, _ = _tff()
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            ref = _create_value(client, executor_id, np.full(200_000 + n, n, np.float32), 3)
            answer = client.call(SERVICE + "Compute", _compute_request(executor_id, ref))
            value = executor_pb2.ComputeResponse.FromString(answer).value
            results[n], _ = value_serialization.deserialize_value(value)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        client.close()
    assert not errors
    for n in range(8):
        assert results[n].shape == (200_000 + n,) and np.all(results[n] == n)


def test_the_client_talks_to_the_sandboxed_executor_on_a_socket_handed_out_of_it(
    service: ExecutorService, executor_id: str
) -> None:
    """No byte of our calls passes through the sandbox's relay, and no port opens."""
    assert service.client_target.startswith("handoff:")
    client = ExecutorClient(service.client_target, max_message_bytes=LIMIT)
    try:
        ref = _create_value(client, executor_id, np.arange(10, dtype=np.float32), pieces=1)
        assert ref
        # The sandbox's TCP table (the relay lives in its network namespace):
        # the connection to the executor's port is a socket of ours.
        sandbox = _tcp_table(service.pid)
        ours = _socket_inodes(os.getpid())
        handed = [e for e in sandbox if e["inode"] in ours and e["remote_port"] == SANDBOX_PORT]
        # This client's and the service's own (`executor_id` called through it).
        assert len(handed) == 2 and {e["state"] for e in handed} == {"01"}, sandbox
        assert not any(e["inode"] in ours for e in _tcp_table(os.getpid()))  # none in the host's
        relay = _socket_inodes(service.pid)
        assert not any(e["inode"] in relay for e in sandbox)  # it keeps no copy, relays nothing
    finally:
        client.close()


def _tcp_table(pid: int) -> list[dict]:
    """The TCP sockets of `pid`'s network namespace (`/proc/PID/net/tcp`)."""
    entries = []
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            entries.append(
                {
                    "remote_port": int(fields[2].rsplit(":", 1)[1], 16),
                    "state": fields[3],
                    "inode": int(fields[9]),
                }
            )
    return entries


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


@pytest.mark.parametrize(
    ("answer", "named"),
    [
        ("nothing", "no connection to the executor was handed over"),
        ("a pipe", "Socket operation on non-socket"),
    ],
)
def test_a_handoff_that_hands_no_socket_is_an_error_naming_it_and_leaks_nothing(
    tmp_path: Path, answer: str, named: str
) -> None:
    """A server on the handoff path that answers without a socket (the sandbox's
    relay when its executor is gone), or with a descriptor of something else,
    fails the call UNAVAILABLE at once, and the descriptor is closed."""
    path = tmp_path / "connect.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    handed_pipe: list[str] = []

    def hand_over() -> None:
        connection, _ = listener.accept()
        if answer == "nothing":
            connection.sendall(b"-")
        else:
            read_end, write_end = os.pipe()
            handed_pipe.append(f"pipe:[{os.fstat(read_end).st_ino}]")
            socket.send_fds(connection, [b"+"], [read_end])
            os.close(read_end)
            os.close(write_end)
        connection.close()

    server = threading.Thread(target=hand_over, daemon=True)
    server.start()
    client = ExecutorClient(f"handoff:{path}", max_message_bytes=LIMIT)
    try:
        with pytest.raises(ExecutorCallError) as raised:
            client.call(SERVICE + "GetExecutor", b"", timeout_s=10)
        assert raised.value.unavailable
        assert named in raised.value.details
        server.join(5)
        # The handed pipe is open nowhere in this process any more.
        open_here = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                open_here.add(os.readlink(f"/proc/self/fd/{fd}"))
        assert not open_here.intersection(handed_pipe)
    finally:
        client.close()
        server.join(5)
        listener.close()


@pytest.mark.parametrize("path", ["handed", "relayed"])
def test_a_killed_executor_fails_calls_unavailable_without_hanging(path: str) -> None:
    with ExecutorService() as service:
        target = service.client_target if path == "handed" else service.target
        client = ExecutorClient(target, max_message_bytes=LIMIT)
        try:
            with pytest.raises(ExecutorCallError) as raised:  # a clean error: connection kept
                client.call(SERVICE + "GetExecutor", b"", timeout_s=30)
            assert raised.value.code is grpc.StatusCode.NOT_FOUND
            service._process.kill()  # the sandbox, relay and binary with it
            service._process.wait(10)
            with pytest.raises(ExecutorCallError) as raised:
                client.call(SERVICE + "GetExecutor", b"", timeout_s=30)
            assert raised.value.unavailable
        finally:
            client.close()


# --- servers that break the protocol --------------------------------------


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I B I", len(payload) << 8 | kind, flags, stream) + payload


SETTINGS = _frame(0x4, 0, 0, b"")


def _headers(fields: list[tuple[str, str]], end_stream: bool | int = False) -> bytes:
    return _frame(0x1, 0x4 | (0x1 if end_stream else 0), 1, hpack.Encoder().encode(fields))


@contextlib.contextmanager
def fake_server(tmp_path: Path, script: Callable[[socket.socket], None]) -> Iterator[str]:
    """A Unix socket server that runs `script` on each connection, after reading the preface."""
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    stop = threading.Event()
    connections: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(connection)
            with contextlib.suppress(OSError):
                connection.recv(65536)  # preface, settings, window update
                script(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"unix:{path}"
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for connection in connections:
            connection.close()
        thread.join(10)
        assert not thread.is_alive()


def _answer_with(*frames: bytes, then_wait: bool = False) -> Callable[[socket.socket], None]:
    def script(connection: socket.socket) -> None:
        connection.sendall(SETTINGS)
        connection.recv(65536)  # our settings ack, the call's headers and data
        for frame in frames:
            connection.sendall(frame)
        if then_wait:
            connection.recv(65536)  # until the client gives up

    return script


def _call(target: str, timeout_s: float = 10, limit: int = LIMIT) -> ExecutorCallError:
    client = ExecutorClient(target, max_message_bytes=limit)
    try:
        with pytest.raises(ExecutorCallError) as raised:
            client.call(SERVICE + "Compute", b"\x0a\x00", timeout_s=timeout_s)
        return raised.value
    finally:
        client.close()


def test_an_answer_over_the_limit_is_refused_before_it_is_allocated(tmp_path: Path) -> None:
    huge = struct.pack(">BI", 0, 3_000_000_000)  # declares 3 GB, over a 1 MB limit
    script = _answer_with(
        _headers([(":status", "200"), ("content-type", "application/grpc")]),
        _frame(0x0, 0, 1, huge),
        then_wait=True,
    )
    with fake_server(tmp_path, script) as target:
        error = _call(target, limit=1_000_000)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3000000000 bytes" in error.details


@pytest.mark.parametrize(
    ("frames", "code", "names"),
    [
        (
            [struct.pack(">I B I", (8 << 20) << 8, 0, 1)],  # a DATA frame of 8 MiB
            grpc.StatusCode.INTERNAL,
            "8388608 bytes",
        ),
        ([_frame(0x1, 0x4, 1, b"\xff\xff\xff\xff")], grpc.StatusCode.INTERNAL, "header block"),
        ([_frame(0x3, 0, 1, struct.pack(">I", 0xB))], grpc.StatusCode.RESOURCE_EXHAUSTED, "reset"),
        (
            [_frame(0x7, 0, 0, struct.pack(">II", 0, 0))],
            grpc.StatusCode.UNAVAILABLE,
            "going away",
        ),
        (
            [
                _headers([(":status", "200")]),
                _frame(0x0, 0x1, 1, struct.pack(">BI", 1, 1) + b"x"),
            ],
            grpc.StatusCode.INTERNAL,
            "compressed",
        ),
        (
            [
                _headers([(":status", "200")]),
                _frame(0x0, 0, 1, struct.pack(">BI", 0, 4) + b"abcd"),
                _headers([("grpc-status", "0")], end_stream=True),
            ],
            None,  # a clean answer: no error
            "",
        ),
        (
            [
                _headers(
                    [(":status", "200"), ("grpc-status", "5"), ("grpc-message", "gone%21")], True
                )
            ],
            grpc.StatusCode.NOT_FOUND,
            "gone!",
        ),
        ([_headers([(":status", "503")], end_stream=True)], grpc.StatusCode.UNKNOWN, "HTTP status"),
        ([], grpc.StatusCode.UNAVAILABLE, "closed the connection"),
        ([_frame(0x3, 0, 1, b"")], grpc.StatusCode.INTERNAL, "type 0x3 of 0 bytes"),
        ([_frame(0x8, 0, 0, b"\x00\x01")], grpc.StatusCode.INTERNAL, "type 0x8 of 2 bytes"),
        ([_frame(0x7, 0, 0, b"\x00\x01")], grpc.StatusCode.INTERNAL, "type 0x7 of 2 bytes"),
        ([_frame(0x1, 0x4 | 0x8, 1, b"")], grpc.StatusCode.INTERNAL, "padding"),
        (
            [_headers([(":status", "200"), ("grpc-status", "\u00b2")], end_stream=True)],
            grpc.StatusCode.UNKNOWN,
            "",
        ),
        (  # a header block that never ends: refused at 64 KiB, not read on
            [_frame(0x1, 0, 1, b"")] + [_frame(0x9, 0, 1, b"\x00" * 16_384)] * 5,
            grpc.StatusCode.INTERNAL,
            "header block over 65536 bytes",
        ),
        ([_frame(0x4, 0, 0, struct.pack(">HI", 5, 0))], grpc.StatusCode.INTERNAL, "largest frame"),
        (
            [_frame(0x0, 0x1, 1, struct.pack(">BI", 0, 1) + b"x")],
            grpc.StatusCode.INTERNAL,
            "DATA before",
        ),
        ([_frame(0x5, 0x4, 1, b"\x00\x00\x00\x02")], grpc.StatusCode.INTERNAL, "PUSH_PROMISE"),
    ],
    ids=[
        "frame-over-our-limit",
        "bad-hpack",
        "rst-stream",
        "goaway",
        "compressed",
        "clean",
        "trailers-only-error",
        "http-503",
        "closed",
        "rst-stream-short",
        "window-update-short",
        "goaway-short",
        "headers-padding-past-its-end",
        "grpc-status-not-ascii",
        "header-block-without-end",
        "max-frame-size-zero",
        "data-before-headers",
        "push-promise",
    ],
)
def test_a_broken_server_ends_the_call_with_an_error_naming_it(
    tmp_path: Path, frames: list[bytes], code: grpc.StatusCode | None, names: str
) -> None:
    def script(connection: socket.socket) -> None:
        _answer_with(*frames)(connection)
        connection.shutdown(socket.SHUT_WR)

    with fake_server(tmp_path, script) as target:
        client = ExecutorClient(target, max_message_bytes=LIMIT)
        try:
            if code is None:
                assert client.call(SERVICE + "Compute", b"", timeout_s=10).tobytes() == b"abcd"
                return
            started = time.monotonic()
            with pytest.raises(ExecutorCallError) as raised:
                client.call(SERVICE + "Compute", b"", timeout_s=3)
        finally:
            client.close()
    assert time.monotonic() - started < 3  # an answer, not the deadline
    assert raised.value.code is code
    assert names in raised.value.details


def _read_frame(connection: socket.socket) -> tuple[int, int, int, bytes]:
    head = _read_exactly(connection, 9)
    first, flags, stream = struct.unpack(">I B I", head)
    return first & 0xFF, flags, stream, _read_exactly(connection, first >> 8)


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        got = connection.recv(size - len(data))
        if not got:
            raise ConnectionError("closed")
        data += got
    return data


def _read_request(connection: socket.socket) -> int:
    """Reads frames until a request's END_STREAM; returns its stream."""
    while True:
        kind, flags, stream, _ = _read_frame(connection)
        if kind == 0x0 and flags & 0x1:
            return stream


def _ok_answer(encoder: hpack.Encoder, stream: int, body: bytes = b"ok") -> bytes:
    return (
        _frame(0x1, 0x4, stream, encoder.encode([(":status", "200")]))
        + _frame(0x0, 0, stream, struct.pack(">BI", 0, len(body)) + body)
        + _frame(0x1, 0x5, stream, encoder.encode([("grpc-status", "0")]))
    )


@contextlib.contextmanager
def framed_server(tmp_path: Path, script: Callable[[socket.socket, int], None]) -> Iterator[str]:
    """`fake_server` whose script reads frames (the preface is read) and knows
    which connection it serves (0, 1, ...)."""
    count = iter(range(1000))

    def each(connection: socket.socket) -> None:
        script(connection, next(count))

    with fake_server(tmp_path, each) as target:
        yield target


def test_an_answer_over_the_limit_costs_its_connection_not_the_next_call(tmp_path: Path) -> None:
    def script(connection: socket.socket, _: int) -> None:
        encoder = hpack.Encoder()
        connection.sendall(SETTINGS)
        while True:
            stream = _read_request(connection)
            connection.sendall(_ok_answer(encoder, stream, b"x" * 100))

    with framed_server(tmp_path, script) as target:
        client = ExecutorClient(target, max_message_bytes=10)
        try:
            for _ in range(2):  # the second is refused the same way, not misread
                with pytest.raises(ExecutorCallError) as raised:
                    client.call(SERVICE + "Compute", b"", timeout_s=5)
                assert raised.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert not client._idle  # a half-read answer: the connection is not pooled
        finally:
            client.close()


def test_a_pooled_connection_the_server_left_is_not_used(tmp_path: Path) -> None:
    def script(connection: socket.socket, index: int) -> None:
        encoder = hpack.Encoder()
        connection.sendall(SETTINGS)
        stream = _read_request(connection)
        connection.sendall(_ok_answer(encoder, stream))
        if index == 0:  # then it goes away, as a restarted or idle-limited server does
            connection.sendall(_frame(0x7, 0, 0, struct.pack(">II", stream, 0)))
            connection.shutdown(socket.SHUT_WR)
            return
        while True:
            connection.sendall(_ok_answer(encoder, _read_request(connection)))

    with framed_server(tmp_path, script) as target:
        client = ExecutorClient(target, max_message_bytes=100)
        try:
            assert client.call(SERVICE + "Compute", b"", timeout_s=5).tobytes() == b"ok"
            time.sleep(0.3)
            for _ in range(2):
                assert client.call(SERVICE + "Compute", b"", timeout_s=5).tobytes() == b"ok"
        finally:
            client.close()


def test_a_stream_window_made_negative_by_new_settings_waits_for_updates(
    tmp_path: Path,
) -> None:
    def script(connection: socket.socket, _: int) -> None:
        encoder = hpack.Encoder()
        connection.sendall(SETTINGS)
        received = 0
        while received < 65_535:  # the client fills the default windows
            kind, _, stream, payload = _read_frame(connection)
            received += len(payload) if kind == 0x0 else 0
        connection.sendall(  # RFC 9113, 6.9.2: the stream's window goes below zero
            _frame(0x4, 0, 0, struct.pack(">HI", 4, 1000))
            + _frame(0x8, 0, 0, struct.pack(">I", 1 << 20))
        )
        time.sleep(0.2)
        connection.sendall(_frame(0x8, 0, stream, struct.pack(">I", 1 << 20)))
        connection.sendall(_ok_answer(encoder, _read_request(connection)))
        _read_exactly(connection, 1)  # until the client closes

    with framed_server(tmp_path, script) as target:
        client = ExecutorClient(target, max_message_bytes=100)
        try:
            answer = client.call(SERVICE + "Compute", b"x" * 200_000, timeout_s=10)
            assert answer.tobytes() == b"ok"
        finally:
            client.close()


def test_a_server_that_reads_slowly_meets_the_deadline(tmp_path: Path) -> None:
    def script(connection: socket.socket, _: int) -> None:
        connection.sendall(  # windows wide open, then a trickle
            _frame(0x4, 0, 0, struct.pack(">HI", 4, 2**31 - 1))
            + _frame(0x8, 0, 0, struct.pack(">I", 2**31 - 1 - 65_535))
        )
        with contextlib.suppress(OSError):
            while connection.recv(256 * 1024):
                time.sleep(0.3)

    with framed_server(tmp_path, script) as target:
        started = time.monotonic()
        client = ExecutorClient(target, max_message_bytes=100)
        try:
            with pytest.raises(ExecutorCallError) as raised:
                client.call(SERVICE + "Compute", b"x" * 20_000_000, timeout_s=1)
        finally:
            client.close()
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


def _closed_while_calling(target: str) -> BaseException:
    """What a call without a deadline raises when the client is closed 0.3 s into it."""
    client = ExecutorClient(target, max_message_bytes=LIMIT)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.call(SERVICE + "Compute", b"")
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.3)
    client.close()
    thread.join(5)
    assert not thread.is_alive()
    return outcome[0]


def test_closing_the_client_ends_a_handshake_waiting_for_settings(tmp_path: Path) -> None:
    def script(connection: socket.socket, _: int) -> None:
        with contextlib.suppress(OSError):
            connection.recv(1)  # never sends its settings

    with framed_server(tmp_path, script) as target:
        error = _closed_while_calling(target)
    assert isinstance(error, ExecutorCallError) and error.unavailable


def test_a_server_that_never_answers_meets_the_deadline(tmp_path: Path) -> None:
    with fake_server(tmp_path, _answer_with(then_wait=True)) as target:
        started = time.monotonic()
        error = _call(target, timeout_s=0.5)
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


def test_closing_the_client_ends_a_call_waiting_without_a_deadline(tmp_path: Path) -> None:
    with fake_server(tmp_path, _answer_with(then_wait=True)) as target:
        error = _closed_while_calling(target)
    assert isinstance(error, ExecutorCallError) and error.unavailable


def test_no_server_is_unavailable_naming_the_target(tmp_path: Path) -> None:
    client = ExecutorClient(f"unix:{tmp_path / 'nothing.sock'}", max_message_bytes=LIMIT)
    with pytest.raises(ExecutorCallError) as raised:
        client.wait_ready(0.3)
    assert raised.value.unavailable
    assert "nothing.sock" in raised.value.details


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (0.0001, "1m"),
        (1.5, "1500m"),
        (99_999.999, "99999999m"),
        (99_999.9999, "100000S"),
        (10**9, "16666667M"),
        (10**12, "99999999H"),
    ],
)
def test_grpc_timeout_never_rounds_down_and_keeps_to_eight_digits(
    seconds: float, header: str
) -> None:
    assert grpc_timeout(seconds) == header


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A `RUNTIME_DIRECTORY` of its own, short: a Unix socket's path has at most
    107 bytes, which pytest's `tmp_path` under xdist can exceed."""
    directory = Path(tempfile.mkdtemp(prefix="fx-"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_socket_dirs_whose_sandbox_is_gone_are_removed_and_live_ones_kept(
    runtime_dir: Path,
) -> None:
    """What an owner killed with SIGKILL leaves (a socket nothing listens on, or none)
    goes once it is `min_age_s` old; a live sandbox's directory, and a young one, stay."""
    from flaap_mq.executor.service import remove_stale_socket_dirs

    old = time.time() - 120

    def left_behind(name: str, with_socket: bool, mtime: float) -> Path:
        directory = runtime_dir / f"flaap-executor-{name}"
        directory.mkdir(mode=0o700)
        if with_socket:
            with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening: refused
                dead.bind(str(directory / "executor.sock"))
        os.utime(directory, (mtime, mtime))
        return directory

    dead = left_behind("dead", True, old)
    empty = left_behind("empty", False, old)
    young = left_behind("young", True, time.time())
    with ExecutorService() as live:
        live_dir = Path(live.target.removeprefix("unix:")).parent
        os.utime(live_dir, (old, old))
        remove_stale_socket_dirs(min_age_s=60.0)
        assert not dead.exists() and not empty.exists()
        assert young.exists() and live_dir.exists()
        with pytest.raises(ExecutorCallError) as raised:  # and it still answers
            live.call(_kind("GET_EXECUTOR"), b"", timeout_s=30)
        assert raised.value.code is grpc.StatusCode.NOT_FOUND  # TFF's answer to no cardinalities
