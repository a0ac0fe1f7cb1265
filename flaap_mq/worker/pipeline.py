"""The execution pipeline: one task in, one `Outcome` out, against an executor.

For a task read from its message(s) (`intake`), the pipeline

1. refuses what no worker can run as sent (another protocol version, another
   silo's task, a task whose kind needs a `reply_to` or whose `message_id`
   is not its task id) and marks a task delivered past its deadline
   `EXPIRED`;
2. runs each task id once (`cache.ResultCache`);
3. checks the task is for this incarnation's executors (`incarnation`),
   starting a fresh executor under a new incarnation if the last one died;
4. replaces the coordinator's value names in the request by the executor
   service's refs, waiting for values still being made (`values`), lets a
   disposal wait for every task delivered before it, and forwards the
   request to the executor.

It knows nothing of the broker: what becomes of the delivery is
`request.TaskRequest`'s, and the executor is anything with the `Executor`
methods, so it is unit-tested with a fake one (tests/unit/test_worker_pipeline.py).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Protocol

import grpc
from google.protobuf import message as protobuf_message

from flaap_mq.executor import ExecutorCallError
from flaap_mq.logs import get_logger
from flaap_mq.protocol import batch, chunking, collector, envelope
from flaap_mq.protocol.v1 import task_pb2, tff_executor_pb2
from flaap_mq.worker.cache import ResultCache
from flaap_mq.worker.incarnation import Incarnation, StateLost
from flaap_mq.worker.outcome import Outcome, OutcomeKind
from flaap_mq.worker.values import ValueTable, ValueUnavailable

log = get_logger("flaap_mq.worker")

# A task's request as received: a view of the message, every slice of it, or
# why its slices do not make a whole.
Payload = memoryview | collector.Parts | chunking.ChunkError


# After an executor call that moved this many bytes, freed memory is handed
# back to the kernel (`return_freed_memory`).
TRIM_AFTER_BYTES = 64 * 1024 * 1024

try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to do
    _malloc_trim = None


def return_freed_memory() -> None:
    """Hands the heap's free pages back to the kernel (glibc's `malloc_trim`).

    A large message passes through many buffers that glibc keeps after they
    are freed (pika's frames; grpcio's, when it carried the executor's
    calls): after a 1 GiB Compute the worker's resident memory stayed at
    twice the model while it sent the reply, and at once the model with
    this (bench.peak_memory's timeline).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


class Executor(Protocol):
    """What the pipeline needs of TFF's executor service (`ExecutorService`)."""

    def start(self) -> None: ...

    def close(self) -> None: ...

    def alive(self) -> bool: ...

    def call(
        self, kind: int, request: chunking.Buffer, timeout_s: float | None = None
    ) -> chunking.Buffer:
        """One serialized request in, its serialized response out; `ExecutorCallError`."""
        ...


class Pipeline:
    """Runs tasks on one silo's executor; thread-safe, one call per task."""

    def __init__(
        self,
        silo_id: str,
        executor: Executor,
        values: ValueTable,
        *,
        wait_for_earlier: Callable[[int, float | None], bool],
        stopping_now: Callable[[], bool],
        result_cache_bytes: int,
        chunk_bytes: int = chunking.DEFAULT_CHUNK_BYTES,
    ) -> None:
        """`wait_for_earlier(sequence, deadline)` waits until every task delivered
        before `sequence` has finished (False at the monotonic `deadline`);
        `stopping_now()` is true once the worker stops at once, after which a
        dead executor is not started again."""
        self.silo_id = silo_id
        self._executor = executor
        self._values = values
        self._wait_for_earlier = wait_for_earlier
        self._stopping_now = stopping_now
        self._chunk_bytes = chunk_bytes
        self._results = ResultCache(result_cache_bytes)
        self._incarnation = Incarnation()
        self._executor_lock = threading.Lock()
        self._log = log.bind(silo=silo_id)

    @property
    def incarnation_id(self) -> str:
        return self._incarnation.id

    def close_executor(self) -> None:
        """Stops the executor; no task starts another after `stopping_now()`."""
        with self._executor_lock:
            self._executor.close()

    def outcome_for(
        self,
        task: task_pb2.Task,
        payload: Payload,
        *,
        reply_to: str | None,
        message_id: str | None,
        sequence: int,
    ) -> Outcome:
        """The outcome of `task`, delivered with `reply_to` and `message_id`.

        `sequence` is its place in delivery order (`intake.InFlight`).
        """
        if task.protocol_version not in envelope.SPOKEN_VERSIONS:
            spoken = " and ".join(str(v) for v in sorted(envelope.SPOKEN_VERSIONS))
            return self._error(
                task,
                envelope.Failure.UNSUPPORTED_PROTOCOL,
                f"protocol version {task.protocol_version} is not supported by this worker "
                f"(it speaks {spoken}); upgrade the worker or coordinator",
            )
        if task.silo_id != self.silo_id:
            return self._error(
                task,
                envelope.Failure.WRONG_SILO,
                f"task for silo {task.silo_id!r} reached silo {self.silo_id!r}",
            )
        spec = envelope.KINDS[task.kind]  # known: read_task checked it
        if spec.answers_with_data and not reply_to:
            return self._error(
                task,
                envelope.Failure.MALFORMED_TASK,
                f"a {spec.name} task needs a reply_to: its answer carries data",
            )
        if spec.creates_value and message_id != task.task_id:
            return self._error(
                task,
                envelope.Failure.MALFORMED_TASK,
                f"a {spec.name} task's AMQP message_id must be its task id "
                f"({task.task_id!r}), which names the value it makes; got "
                f"{message_id!r}",
            )
        if envelope.deadline_passed(task):
            # Nobody awaits it any more (the coordinator gave up at the same
            # deadline): not run, not answered. The broker records it as
            # `rejected` (the `expired` reason is its own, for a task that
            # expired while queued); this reason is in the worker's log.
            reason = "expired: deadline passed before the task could run"
            return Outcome(
                (), OutcomeKind.EXPIRED, False, envelope.Failure.DEADLINE_EXCEEDED, reason
            )
        return self._results.get_or_run(
            task.task_id, lambda: self._execute(task, payload, sequence)
        )

    def unreadable(self, why: envelope.MalformedEnvelope, correlation_id: str | None) -> Outcome:
        """The outcome of a message that is not a readable Task or TaskBatch.

        With a `correlation_id`, it holds the result to tell the sender (if
        the message has a `reply_to`) rather than let it wait for its
        timeout: MALFORMED_TASK, or UNSUPPORTED_PROTOCOL for a batch of
        another version.
        """
        failure = envelope.Failure.MALFORMED_TASK
        if isinstance(why, batch.UnsupportedProtocol):
            failure = envelope.Failure.UNSUPPORTED_PROTOCOL
        messages: tuple[bytes, ...] = ()
        if correlation_id:
            error = envelope.result_error(
                task_id=correlation_id,
                silo_id=self.silo_id,
                kind=envelope.RequestKind.REQUEST_KIND_UNSPECIFIED,
                failure=failure,
                message=f"silo {self.silo_id!r} could not read the task: {why}",
                incarnation=self._incarnation.id,
            )
            messages = (error.SerializeToString(),)
        return Outcome(messages, OutcomeKind.MALFORMED, False, failure, str(why))

    def settle_value(self, value_id: str | None, outcome: Outcome | None) -> None:
        """Fails the value announced for a delivery, if the delivery did not make it.

        Every way a delivery can end comes through here (`outcome` None: the
        worker failed handling it), so no task waits for a value that will
        not come: the task failed, was refused, was answered from the cache
        after its value was disposed, or was not the Create* task its AMQP
        `type` said. Does nothing to a value made.
        """
        if not value_id:
            return
        if outcome is None:
            failure = envelope.Failure.EXECUTOR_UNAVAILABLE
            message = f"the worker of silo {self.silo_id!r} failed handling the task making it"
        elif outcome.failure is not None:
            failure, message = outcome.failure, outcome.value_error
        else:
            failure = envelope.Failure.STATE_LOST
            message = "the task announced as making it did not make it (disposed since?)"
        self._values.fail(value_id, failure, message)

    def _execute(self, task: task_pb2.Task, payload: Payload, sequence: int) -> Outcome:
        started = time.monotonic()
        spec = envelope.KINDS[task.kind]
        with self._executor_lock:
            if not self._executor.alive():
                if self._stopping_now():  # stopped on purpose: do not start another
                    return self._error(
                        task,
                        envelope.Failure.EXECUTOR_UNAVAILABLE,
                        f"the worker of silo {self.silo_id!r} is stopping",
                    )
                self._restart_executor()
            incarnation = self._incarnation
        try:
            executor_id, raw, request = read_request(task, spec, payload)
        except envelope.MalformedEnvelope as e:
            return self._error(task, envelope.Failure.MALFORMED_TASK, str(e))
        except chunking.ChunkError as e:
            self._log.warning("task_chunks_invalid", task_id=task.task_id, reason=str(e))
            return self._error(task, envelope.Failure.CHUNK_INVALID, str(e))
        try:
            incarnation.check(task)
        except StateLost as e:
            return self._error(task, envelope.Failure.STATE_LOST, str(e))
        timeout = deadline = None
        if task.deadline_unix_ms:
            timeout = max(0.001, task.deadline_unix_ms / 1000 - time.time())
            deadline = time.monotonic() + timeout
        if spec.disposes and not self._wait_for_earlier(sequence, deadline):
            return self._error(
                task,
                envelope.Failure.DEADLINE_EXCEEDED,
                f"{spec.name} on silo {self.silo_id!r}: tasks delivered before it were still "
                "running at its deadline",
                started,
            )
        try:
            if request is not None:
                raw = with_service_refs(task.kind, request, self._values, deadline)
        except ValueUnavailable as e:
            return self._error(
                task,
                e.failure,
                f"{spec.name} on silo {self.silo_id!r} uses value {e.value_id}, which could "
                f"not be made: {e.message}",
                started,
                value_error=e.message,
            )
        try:
            response = b""
            if raw is not None:
                response = self._executor.call(task.kind, raw, timeout_s=timeout)
                if len(raw) + len(response) >= TRIM_AFTER_BYTES:
                    raw = None  # the request's buffer is freed; give it back too
                    return_freed_memory()
        except ExecutorCallError as e:
            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                failure = envelope.Failure.DEADLINE_EXCEEDED
            elif e.unavailable or not self._executor.alive():
                failure = envelope.Failure.EXECUTOR_UNAVAILABLE
            else:
                failure = envelope.Failure.EXECUTOR_ERROR
            return self._error(task, failure, f"{spec.name} failed on silo {self.silo_id!r}: {e}")
        if spec.creates_value:
            made = spec.light_response_type.FromString(response).value_ref.id
            self._values.made(task.task_id, made, executor_id)
            # Answer with the value's name, the only ref the coordinator uses.
            response = spec.light_response_type(
                value_ref=tff_executor_pb2.ValueRef(id=task.task_id)
            ).SerializeToString()
        elif task.kind == envelope.RequestKind.DISPOSE_EXECUTOR:
            self._values.forget_executor(executor_id)
        result = envelope.result_ok(
            task,
            None,
            incarnation=incarnation.id,
            duration_us=int((time.monotonic() - started) * 1e6),
        )
        # A large response stays one object: its slices are made as they are
        # published (`TaskRequest._reply`), and cached as that object.
        messages = envelope.encode_result(result, response, self._chunk_bytes)
        return Outcome(messages, OutcomeKind.OK)

    def _restart_executor(self) -> None:
        """The executor died: start a fresh one under a new incarnation."""
        old = self._incarnation.id
        self._executor.close()
        self._incarnation = Incarnation()
        self._values.clear(
            envelope.Failure.STATE_LOST, f"the executor service of incarnation {old} died"
        )
        self._executor.start()
        self._log.warning(
            "executor_service_restarted", old_incarnation=old, incarnation=self._incarnation.id
        )

    def _error(
        self,
        task: task_pb2.Task,
        failure: envelope.Failure,
        message: str,
        started: float | None = None,
        *,
        value_error: str | None = None,
    ) -> Outcome:
        duration_us = int((time.monotonic() - started) * 1e6) if started else 0
        result = envelope.result_error(
            task_id=task.task_id,
            silo_id=self.silo_id,
            kind=task.kind,
            failure=failure,
            message=message,
            incarnation=self._incarnation.id,
            duration_us=duration_us,
        )
        return Outcome(
            (result.SerializeToString(),),
            OutcomeKind.of(failure),
            failure=failure,
            value_error=message if value_error is None else value_error,
        )


def read_request(
    task: task_pb2.Task, spec: envelope.KindSpec, received: Payload
) -> tuple[str, memoryview, protobuf_message.Message | None]:
    """The executor id, the raw request, and the request parsed if it names values.

    A request without value names (GetExecutor, CreateValue, however
    large) is only scanned for its executor id, and goes on untouched.
    The others are small, and parsed as the light messages
    (`tff_executor_pb2`): the worker never imports TensorFlow.
    Raises `MalformedEnvelope` for a request that is not one of its kind,
    `ChunkError` for slices that do not make a whole.
    """
    if isinstance(received, chunking.ChunkError):
        raise received
    # Not copied: the executor client sends from the buffer it arrived in.
    payload = received.view() if isinstance(received, collector.Parts) else received
    if task.kind == envelope.RequestKind.GET_EXECUTOR:
        envelope.decode_request(task, payload, light=True)
        return "", payload, None
    if not spec.names_values:
        return envelope.executor_id_of(spec, payload), payload, None
    request = envelope.decode_request(task, payload, light=True)
    return request.executor.id, payload, request


def with_service_refs(
    kind: int,
    request: protobuf_message.Message,
    values: ValueTable,
    deadline: float | None,
) -> bytes | None:
    """`request` with each value name replaced by the executor service's ref.

    Waits for values still being made. A Dispose forgets the names it
    disposes of; None when none of them was ever made (nothing to do).
    """
    refs = envelope.KINDS[kind].value_refs(request)
    if kind == envelope.RequestKind.DISPOSE:
        made = values.take([r.id for r in refs], deadline)
        if not made:
            return None
        del request.value_ref[:]
        request.value_ref.extend(tff_executor_pb2.ValueRef(id=ref) for ref in made)
    else:
        made_by_name = values.refs([r.id for r in refs], deadline)
        for ref in refs:
            ref.id = made_by_name[ref.id]
    return request.SerializeToString()
