"""The silo worker: consumes its silo's queue and runs each task on TFF's executor.

The worker only ever dials out: to the broker, and to its own executor
service on loopback. For each delivered task it

1. checks the envelope (a malformed task is rejected, so that the broker
   dead-letters it, its reason logged, and answered with an error where the
   sender can be told);
2. answers a task it has already run from a bounded cache of recent results
   instead of running it twice (redelivery after a lost ack);
3. checks the task is for this incarnation's executors (`incarnation`);
4. replaces the coordinator's value names in the request by the executor
   service's refs, waiting for values still being made (`values`), and
   forwards it to the executor service;
5. with a `reply_to`, publishes the `TaskResult` to the coordinator's reply
   queue with the task's `correlation_id`, and acks the task only once the
   broker has confirmed the reply, so a task is never lost between the
   broker and the worker. A one-way task (a Create* or Dispose* sent without
   `reply_to`) is acked once run; a failure is kept with the value it should
   have made, and reaches the coordinator with the task that uses it.

Tasks run on a first-in first-out thread pool as large as the prefetch
window, so a `Compute` that waits does not hold up the others, a task never
starts before the tasks delivered ahead of it, and memory is bounded by the
window.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import cachetools
import grpc
from google.protobuf import message as protobuf_message

from flaap_mq.broker.link import (
    BrokerLink,
    Delivery,
    Unroutable,
    all_confirmed,
    default_properties,
)
from flaap_mq.broker.urls import credential_files, parse_broker_urls
from flaap_mq.executor import (
    HOST_NETWORK_MARK,
    ExecutorCallError,
    ExecutorNetwork,
    ExecutorService,
)
from flaap_mq.logs import get_logger
from flaap_mq.protocol import chunking, envelope, topology
from flaap_mq.protocol.v1 import task_pb2, tff_executor_pb2
from flaap_mq.worker.incarnation import Incarnation, StateLost
from flaap_mq.worker.values import ValueTable, ValueUnavailable

log = get_logger("flaap_mq.worker")

RESULT_CONTENT_TYPE = "application/x-protobuf; proto=flaap_mq.v1.TaskResult"
# A task whose reply the broker did not confirm (nacked: the coordinator's
# reply queue is over its max-length-bytes; or the link lost) goes back to the
# silo queue after this pause, doubled at each redelivery the queue counts
# (`x-delivery-count`), up to the cap: a full reply queue gets time to drain,
# and the task ends at its deadline or at the delivery limit, never spinning.
REQUEUE_FIRST_PAUSE_S = 1.0
REQUEUE_MAX_PAUSE_S = 30.0
# How long a draining worker waits for the broker to confirm the replies of
# the tasks it finished before it closes its link (see `shutdown`).
CONFIRM_TIMEOUT_S = 10.0
# Exit code after a Ctrl-C (SIGINT), as shells report an interrupted command
# and as `flaap-mq train` returns.
EXIT_INTERRUPTED = 130
# Outcomes of a task no worker can run as it was sent; see `_refuse`.
_REFUSED = frozenset({"unsupported_protocol", "wrong_silo", "malformed_task"})


class Outcome(NamedTuple):
    """A TaskResult, serialized (one message per slice), and what it says."""

    messages: tuple[bytes, ...]
    name: str
    # True when answered from the results cache (or from the run of a
    # duplicate still in progress) rather than run: the `task` log line says
    # so, which is how duplicate executions are counted (docs/reliability.md).
    cached: bool = False
    failure: envelope.Failure | None = None
    # Why a value this task should have made cannot be used, for the tasks
    # that name it: the first cause, not wrapped again at every link.
    value_error: str = ""

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.messages)


# A task's request as received: a view of the message, every slice of it, or
# why its slices do not make a whole.
_Payload = memoryview | chunking.Parts | chunking.ChunkError
# A task read from its message(s), request apart.
_Read = tuple[task_pb2.Task, _Payload]


class SiloWorker:
    """Serves one silo's tasks until `stop()`; see the module docstring."""

    def __init__(
        self,
        broker_url: str | None,
        silo_id: str,
        *,
        prefetch: int = 8,
        names: topology.Names | None = None,
        queue_type: topology.QueueType = topology.QueueType.QUORUM,
        data_dir: str | None = None,
        executor_network: ExecutorNetwork = ExecutorNetwork.SANDBOX,
        secret_paths: Sequence[str] = (),
        result_cache_bytes: int = 256 * 1024 * 1024,
        drain_timeout_s: float = 60.0,
        connect_timeout_s: float = 30.0,
        chunk_bytes: int = chunking.DEFAULT_CHUNK_BYTES,
        chunk_limits: chunking.Limits | None = None,
    ) -> None:
        self.silo_id = topology.validate_id("silo", silo_id)
        self._names = names or topology.Names()
        self._queue_type = queue_type
        self._prefetch = max(1, prefetch)
        self._drain_timeout_s = drain_timeout_s
        self._connect_timeout_s = connect_timeout_s
        # The connection's name shows in the management API and `flaap-mq
        # status`: an executor on the host's network must be visible there.
        connection_name = f"flaap-worker-{silo_id}"
        if ExecutorNetwork(executor_network) is ExecutorNetwork.HOST:
            connection_name += f" {HOST_NETWORK_MARK}"
        self._addresses = parse_broker_urls(broker_url, connection_name=connection_name)
        # The executor must not read what gives this worker its broker login.
        self._service = ExecutorService(
            network=executor_network,
            data_dir=data_dir,
            hidden_paths=[*secret_paths, *credential_files(self._addresses)],
        )
        self._chunk_bytes = chunk_bytes
        # What coordinators' chunked tasks may make this process hold (`chunking`).
        self._collector = chunking.Collector(chunk_limits)
        self._incarnation = Incarnation()
        self._values = ValueTable()
        self._service_lock = threading.Lock()
        self._results: cachetools.LRUCache[str, Outcome] = cachetools.LRUCache(
            maxsize=result_cache_bytes, getsizeof=lambda outcome: outcome.size
        )
        self._running: dict[str, concurrent.futures.Future[Outcome]] = {}
        self._results_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._prefetch, thread_name_prefix=f"task-{silo_id}"
        )
        # Delivery sequence numbers of the tasks not yet finished.
        self._in_flight: set[int] = set()
        self._in_flight_cv = threading.Condition()
        self._sequence = itertools.count()
        self._stop = threading.Event()  # set once shutting down
        # What `stop` was asked with, one entry per request (the signal, or
        # None): the first drains, a second stops at once. Appended to
        # without a lock, so that a signal handler can.
        self._stop_requests: list[signal.Signals | None] = []
        # Stopping at once: tasks still running are left to the broker.
        self._stopping_now = False
        self._active_generation = -1  # channel generation of the first task seen
        self._link: BrokerLink | None = None
        self._log = log.bind(silo=self.silo_id)
        self.tasks_handled = 0

    @property
    def incarnation_id(self) -> str:
        return self._incarnation.id

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Starts the executor service, connects and begins consuming."""
        self._service.start()
        try:
            self._link = BrokerLink(
                self._addresses,
                name=f"worker-{self.silo_id}",
                declarations=self._declarations,
                prefetch=self._prefetch,
            )
            self._link.start(self._connect_timeout_s)
        except BaseException:
            self._service.close()
            raise
        self._link.consume(self._names.silo_queue(self.silo_id), self._on_delivery)
        self._log.info(
            "worker_started",
            queue=self._names.silo_queue(self.silo_id),
            broker=self._link.describe_addresses(),
            incarnation=self._incarnation.id,
            prefetch=self._prefetch,
        )
        # The silo queue has a single active consumer: the broker delivers to
        # one worker of the silo at a time. RabbitMQ 3.10 does not tell a
        # consumer which it is, so a worker says only what it knows until its
        # first task arrives ("worker_active" from then on); a lone worker is
        # the active consumer at once, a second one is a standby.
        self._log.info(
            "worker_standby",
            detail="consuming; receives tasks when it is its silo's active consumer",
        )

    def _declarations(self) -> list[topology.Declaration]:
        return topology.shared_declarations(self._names) + topology.silo_declarations(
            self._names, [self.silo_id], self._queue_type
        )

    def stop(self, signum: int | None = None) -> None:
        """Asks `run_until_stopped` to stop: the first request drains, a second stops at once.

        `signum` is the signal that asked (SIGINT or SIGTERM), which sets the
        exit code and the wording of the `worker_draining` line. Safe in a
        signal handler: it only appends to a list. Setting a
        `threading.Event` there (as this did) can deadlock, for the handler
        runs on the main thread, which may hold that event's lock just then.
        """
        self._stop_requests.append(signal.Signals(signum) if signum is not None else None)

    @property
    def _stop_now_asked(self) -> bool:
        return len(self._stop_requests) > 1

    def run_until_stopped(self, install_signal_handlers: bool = True) -> int:
        """Serves until SIGTERM/SIGINT or `stop()`, then shuts down; returns the exit code.

        The first SIGINT (Ctrl-C) or SIGTERM drains, a second stops at once
        (`shutdown`). The executor runs in its own session, so a terminal's
        Ctrl-C reaches this process alone, which decides when the executor
        stops. Exit code: 130 after a Ctrl-C, 0 after SIGTERM (systemd's
        stop) or `stop()`, 1 when the broker refused the worker for good.
        """
        previous: dict[signal.Signals, signal.Handlers | Callable[..., object] | int | None] = {}
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda signum, _frame: self.stop(signum))
        try:
            self.start()
            exit_code = 0
            try:
                # Polled: a signal handler may not wake a waiting Event (see `stop`).
                while not self._stop_requests:
                    failure = self._link.failure if self._link else None
                    if failure is not None:
                        # Retrying cannot fix this (a refused login or topology):
                        # exit non-zero so the operator, or systemd, sees it.
                        self._log.error("worker_giving_up", error=str(failure))
                        exit_code = 1
                        break
                    time.sleep(0.2)
            finally:
                self.shutdown()
        finally:
            # Handlers stay during `shutdown`, for the second Ctrl-C.
            for sig, handler in previous.items():
                if handler is not None:
                    signal.signal(sig, handler)
        if exit_code == 0 and signal.SIGINT in self._stop_requests:
            return EXIT_INTERRUPTED
        return exit_code

    def shutdown(self) -> None:
        """Stops consuming, drains unless asked to stop now, and stops everything.

        Draining finishes the tasks in flight, then waits (at most
        `CONFIRM_TIMEOUT_S`) until the broker has confirmed their replies and
        so the tasks are acked, and only then closes the link: closing at
        once failed a reply its coordinator did receive
        (`reply_not_confirmed ... is closed`) and left its task unacked, to
        run again. A second stop request, or a drain past
        `drain_timeout_s`, stops at once instead (`_stop_at_once`).
        """
        self._stop.set()
        link = self._link
        drained = True
        if link is not None and not self._stop_now_asked:
            drained = self._drain(link)
        if self._stop_now_asked or not drained:
            self._stop_at_once(link)
        else:
            # Wakes any task still waiting for a value, so the pool can stop.
            self._values.clear(envelope.Failure.EXECUTOR_UNAVAILABLE, "the worker is stopping")
            self._pool.shutdown(wait=True, cancel_futures=True)
            if link is not None:
                link.close()
            self._service.close()
        self._link = None
        self._log.info("worker_stopped", tasks_handled=self.tasks_handled)

    def _drain(self, link: BrokerLink) -> bool:
        """Stops consuming, finishes the tasks in flight and awaits their confirms.

        False when a stop-now request or the drain timeout cut it short.
        """
        cancelled = link.stop_consuming()
        if self._wait_unless_stopped_now(cancelled.done, 10.0) and cancelled.exception():
            self._log.warning("stop_consuming_failed", error=str(cancelled.exception()))
        elif not cancelled.done() and not self._stop_now_asked:
            self._log.warning("stop_consuming_failed", error="no answer from the broker in 10 s")
        count = len(self._in_flight)
        again = (
            "Ctrl-C again to stop now"
            if self._stop_requests and self._stop_requests[0] is signal.SIGINT
            else "SIGINT or SIGTERM again to stop now"
        )
        self._log.info(
            "worker_draining",
            in_flight=count,
            detail=f"draining {count} task{'' if count == 1 else 's'}; {again}",
        )
        if not self._wait_unless_stopped_now(lambda: not self._in_flight, self._drain_timeout_s):
            if not self._stop_now_asked:
                self._log.warning("drain_timed_out", in_flight=len(self._in_flight))
            return False
        settled = link.all_settled()
        if not self._wait_unless_stopped_now(settled.done, CONFIRM_TIMEOUT_S):
            if self._stop_now_asked:
                return False
            # Closed anyway: those tasks are redelivered, and run again.
            self._log.warning("replies_unconfirmed_at_stop", timeout_s=CONFIRM_TIMEOUT_S)
        return True

    def _stop_at_once(self, link: BrokerLink | None) -> None:
        """Returns the tasks in flight to the broker and stops the executor.

        The link closes first, without acking them, so that the broker
        requeues them for a standby or the next start; then the executor
        stops, which fails the calls still running, and the pool ends.
        Nothing those tasks still do reaches the broker.
        """
        self._stopping_now = True
        count = len(self._in_flight)
        self._log.warning(
            "worker_stopping_now",
            in_flight=count,
            detail=f"returning {count} task{'' if count == 1 else 's'} to the queue unanswered",
        )
        if link is not None:
            link.close()
        self._values.clear(envelope.Failure.EXECUTOR_UNAVAILABLE, "the worker is stopping")
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._service_lock:  # see `_execute`: no restart after this
            self._service.close()
        self._pool.shutdown(wait=True)

    def _wait_unless_stopped_now(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Waits until `done()`: True, or False after `timeout_s` or a stop-now request.

        Polls, so that a second Ctrl-C cuts the wait short: its handler may
        not notify a condition (see `stop`).
        """
        deadline = time.monotonic() + timeout_s
        while not done():
            if self._stop_now_asked or time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # ----------------------------------------------------------- task handling

    def _on_delivery(self, delivery: Delivery) -> None:
        """Runs on the I/O thread: hand the task to the pool and return."""
        if delivery.generation != self._active_generation:
            self._active_generation = delivery.generation
            self._log.info("worker_active", detail="this worker now receives the silo's tasks")
        # The envelope is read here (its request stays a view of the body), so
        # that a slice is told by its `Chunk`, as the coordinator tells its
        # replies, and collected on the I/O thread in delivery order; only the
        # whole task goes on to the pool, which joins the slices.
        self._collector.expire()
        whole: _Read | None = None
        try:
            whole = envelope.read_task(delivery.body)
        except envelope.MalformedEnvelope:
            pass  # _handle reads it again, and dead-letters it with the reason
        else:
            if chunking.is_chunked(whole[0].chunk):
                whole = self._collect_slice(delivery, *whole)
                if whole is None:
                    return
        # Announced here, in delivery order, before any later task can name it;
        # a sliced task once its last slice is in, so that slices that never
        # make a whole leave nothing behind (the coordinator sends every slice
        # of a task before any task that names its value).
        spec = envelope.spec_named(delivery.properties.type)
        if spec is not None and spec.creates_value and delivery.properties.message_id:
            self._values.announce(delivery.properties.message_id)
        sequence = next(self._sequence)
        with self._in_flight_cv:
            self._in_flight.add(sequence)
        self._pool.submit(self._handle, delivery, sequence, whole)

    def _collect_slice(
        self, delivery: Delivery, task: task_pb2.Task, payload: memoryview
    ) -> _Read | None:
        """Stores one slice of a large task; the task and all its slices once complete.

        Slices before the last are acked once stored: holding them unacked
        would stall the silo on its prefetch window. If this process dies
        before the last slice, the last one reaches the next worker without
        its predecessors, which answers CHUNK_INVALID (retryable) rather than
        running half a request.

        The collector bounds what coordinators' slices can make this process
        hold (`chunking.Limits`, `--max-pending-transfer-bytes`), and drops a
        partial task at its deadline. A task refused there (declared too
        large, slices that lie) is answered CHUNK_INVALID like any bad slices.
        """
        try:
            parts = self._collector.add(
                task.task_id,
                task.chunk,
                payload,
                expires_at=chunking.monotonic_deadline(task.deadline_unix_ms),
            )
        except chunking.ChunkError as e:
            task.ClearField("chunk")
            return task, e  # answered CHUNK_INVALID by the pool, like any task
        if parts is None:
            self._link.ack(delivery)
            return None
        task.ClearField("chunk")
        return task, parts

    def _handle(self, delivery: Delivery, sequence: int, whole: _Read | None) -> None:
        started = time.monotonic()
        task: task_pb2.Task | None = None
        result: Outcome | None = None
        try:
            try:
                task, payload = whole or envelope.read_task(delivery.body)
            except envelope.MalformedEnvelope as e:
                self._reject_malformed(delivery, str(e))
                result = Outcome((), "malformed", False, envelope.Failure.MALFORMED_TASK, str(e))
                return
            result = self._result_for(task, payload, delivery, sequence)
            if result.name == "expired":
                return  # dead-lettered by _result_for
            self._answer(delivery, task, result)
        except Exception:
            # A bug here must not kill the worker: the task goes back to the
            # queue (and to the dead-letter queue after the delivery limit).
            self._log.exception("task_handler_failed")
            if self._link is not None:
                self._link.reject(delivery, requeue=True)
        finally:
            self._settle_value(delivery, result)
            self.tasks_handled += 1
            self._log.info(
                "task",
                task_id=task.task_id if task else None,
                job=task.job_id if task else None,
                kind=envelope.kind_name(task.kind) if task else None,
                attempt=task.attempt if task else None,
                outcome=result.name if result else "error",
                cached=result.cached if result else False,
                one_way=not delivery.properties.reply_to,
                incarnation=self._incarnation.id,
                redelivered=delivery.redelivered,
                bytes_in=len(delivery.body),
                duration_ms=round((time.monotonic() - started) * 1000, 2),
            )
            with self._in_flight_cv:
                self._in_flight.discard(sequence)
                self._in_flight_cv.notify_all()

    def _answer(self, delivery: Delivery, task: task_pb2.Task, result: Outcome) -> None:
        """Replies (or not, one-way) and settles the delivery."""
        if result.name in _REFUSED:
            self._refuse(delivery, task, result)
        elif delivery.properties.reply_to:
            self._reply(delivery, task, result.messages)
        else:
            if result.failure is not None:
                self._log.warning(
                    "one_way_task_failed",
                    task_id=task.task_id,
                    kind=envelope.kind_name(task.kind),
                    error=result.value_error,
                )
            self._link.ack(delivery)

    def _settle_value(self, delivery: Delivery, result: Outcome | None) -> None:
        """Fails the value announced for a delivery, if the delivery did not make it.

        Every way a delivery can end comes through here, so no task waits
        for a value that will not come: the task failed, was refused, was
        answered from the cache after its value was disposed, or was not the
        Create* task its AMQP `type` said. Does nothing to a value made.
        """
        value_id = delivery.properties.message_id
        if not value_id:
            return
        if result is None:
            failure = envelope.Failure.EXECUTOR_UNAVAILABLE
            message = f"the worker of silo {self.silo_id!r} failed handling the task making it"
        elif result.failure is not None:
            failure, message = result.failure, result.value_error
        else:
            failure = envelope.Failure.STATE_LOST
            message = "the task announced as making it did not make it (disposed since?)"
        self._values.fail(value_id, failure, message)

    def _result_for(
        self, task: task_pb2.Task, payload: _Payload, delivery: Delivery, sequence: int
    ) -> Outcome:
        """The serialized TaskResult for `task` ("expired": it was dead-lettered)."""
        if task.protocol_version != envelope.PROTOCOL_VERSION:
            return self._error(
                task,
                envelope.Failure.UNSUPPORTED_PROTOCOL,
                f"protocol version {task.protocol_version} is not supported by this worker "
                f"(it speaks {envelope.PROTOCOL_VERSION}); upgrade the worker or coordinator",
            )
        if task.silo_id != self.silo_id:
            return self._error(
                task,
                envelope.Failure.WRONG_SILO,
                f"task for silo {task.silo_id!r} reached silo {self.silo_id!r}",
            )
        spec = envelope.KINDS[task.kind]  # known: parse_task checked it
        if spec.answers_with_data and not delivery.properties.reply_to:
            return self._error(
                task,
                envelope.Failure.MALFORMED_TASK,
                f"a {spec.name} task needs a reply_to: its answer carries data",
            )
        if spec.creates_value and delivery.properties.message_id != task.task_id:
            return self._error(
                task,
                envelope.Failure.MALFORMED_TASK,
                f"a {spec.name} task's AMQP message_id must be its task id "
                f"({task.task_id!r}), which names the value it makes; got "
                f"{delivery.properties.message_id!r}",
            )
        if envelope.deadline_passed(task):
            # Nobody awaits it any more (the coordinator gave up at the same
            # deadline): not run, not answered. The broker records it as
            # `rejected` (the `expired` reason is its own, for a task that
            # expired while queued); this reason is in the worker's log.
            reason = "expired: deadline passed before the task could run"
            self._dead_letter(delivery, reason)
            return Outcome((), "expired", False, envelope.Failure.DEADLINE_EXCEEDED, reason)
        # Run each task id once: a redelivered task gets the cached result,
        # a duplicate that arrives while the first still runs waits for it.
        with self._results_lock:
            cached = self._results.get(task.task_id)
            if cached is not None:
                return cached._replace(cached=True)
            running = self._running.get(task.task_id)
            if running is None:
                running = concurrent.futures.Future()
                self._running[task.task_id] = running
                owner = True
            else:
                owner = False
        if not owner:
            return running.result()._replace(cached=True)
        try:
            result = self._execute(task, payload, sequence)
            running.set_result(result)
            return result
        except BaseException as e:
            running.set_exception(e)
            raise
        finally:
            with self._results_lock:
                self._running.pop(task.task_id, None)
                if running.done() and not running.exception():
                    outcome = running.result()
                    # A result larger than the whole cache is not kept: a
                    # redelivery of that task runs it again (Compute and
                    # CreateValue are safe to repeat; a duplicate value is
                    # only memory until its executor is disposed).
                    if outcome.size <= self._results.maxsize:
                        self._results[task.task_id] = outcome

    def _execute(self, task: task_pb2.Task, payload: _Payload, sequence: int) -> Outcome:
        started = time.monotonic()
        spec = envelope.KINDS[task.kind]
        with self._service_lock:
            if not self._service.alive():
                if self._stopping_now:  # stopped on purpose: do not start another
                    return self._error(
                        task,
                        envelope.Failure.EXECUTOR_UNAVAILABLE,
                        f"the worker of silo {self.silo_id!r} is stopping",
                    )
                self._restart_service()
            incarnation = self._incarnation
        try:
            executor_id, raw, request = self._read_request(task, spec, payload)
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
        if spec.disposes and not self._wait_for_earlier_tasks(sequence, deadline):
            return self._error(
                task,
                envelope.Failure.DEADLINE_EXCEEDED,
                f"{spec.name} on silo {self.silo_id!r}: tasks delivered before it were still "
                "running at its deadline",
                started,
            )
        try:
            if request is not None:
                raw = self._with_service_refs(task.kind, request, self._values, deadline)
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
                response = self._service.call(task.kind, raw, timeout_s=timeout)
        except ExecutorCallError as e:
            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                failure = envelope.Failure.DEADLINE_EXCEEDED
            elif e.unavailable or not self._service.alive():
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
        return Outcome(tuple(envelope.encode_result(result, response, self._chunk_bytes)), "ok")

    def _wait_for_earlier_tasks(self, sequence: int, deadline: float | None) -> bool:
        """Waits until every task delivered before `sequence` has finished.

        A disposal must not overtake a task sent before it, which may still
        be about to use the value (or executor) disposed of. Those tasks only
        ever wait for tasks delivered before them, so this cannot deadlock.
        """
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        with self._in_flight_cv:
            return self._in_flight_cv.wait_for(
                lambda: all(s >= sequence for s in self._in_flight), timeout
            )

    @staticmethod
    def _read_request(
        task: task_pb2.Task, spec: envelope.KindSpec, received: _Payload
    ) -> tuple[str, bytes, protobuf_message.Message | None]:
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
        # The one copy of the request the worker makes: gRPC sends bytes.
        payload = received.join() if isinstance(received, chunking.Parts) else bytes(received)
        if task.kind == envelope.RequestKind.GET_EXECUTOR:
            envelope.decode_request(task, payload, light=True)
            return "", payload, None
        if not spec.names_values:
            return envelope.executor_id_of(spec, payload), payload, None
        request = envelope.decode_request(task, payload, light=True)
        return request.executor.id, payload, request

    @staticmethod
    def _with_service_refs(
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

    def _restart_service(self) -> None:
        """The executor died: start a fresh one under a new incarnation."""
        old = self._incarnation.id
        self._service.close()
        self._incarnation = Incarnation()
        self._values.clear(
            envelope.Failure.STATE_LOST, f"the executor service of incarnation {old} died"
        )
        self._service.start()
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
            failure.name.lower(),
            failure=failure,
            value_error=message if value_error is None else value_error,
        )

    # ----------------------------------------------------- replies, dead letters

    def _reply(self, delivery: Delivery, task: task_pb2.Task, messages: tuple[bytes, ...]) -> None:
        props = delivery.properties
        futures = [
            self._link.publish(
                self._names.replies_exchange,
                props.reply_to,
                message,
                default_properties(
                    correlation_id=props.correlation_id or task.task_id,
                    message_id=task.task_id,
                    content_type=RESULT_CONTENT_TYPE,
                    # Checked by the broker against our login, so the coordinator
                    # can trust which silo a result came from.
                    user_id=self._addresses[0].username,
                    headers=chunking.headers(i, len(messages)),
                ),
            )
            for i, message in enumerate(messages)
        ]
        self._ack_when_confirmed(delivery, all_confirmed(futures), what="reply")

    def _reject_malformed(self, delivery: Delivery, reason: str) -> None:
        """Answers a task whose envelope cannot be read (where it says whom), and rejects it."""
        props = delivery.properties
        answered = None
        if props.reply_to and props.correlation_id:
            # Tell the sender now rather than letting it wait for a timeout.
            error = envelope.result_error(
                task_id=props.correlation_id,
                silo_id=self.silo_id,
                kind=envelope.RequestKind.REQUEST_KIND_UNSPECIFIED,
                failure=envelope.Failure.MALFORMED_TASK,
                message=f"silo {self.silo_id!r} could not read the task: {reason}",
                incarnation=self._incarnation.id,
            )
            answered = self._link.publish(
                self._names.replies_exchange,
                props.reply_to,
                error.SerializeToString(),
                default_properties(
                    correlation_id=props.correlation_id,
                    content_type=RESULT_CONTENT_TYPE,
                    user_id=self._addresses[0].username,
                ),
            )
        self._dead_letter(delivery, f"malformed: {reason}", after=answered)

    def _refuse(self, delivery: Delivery, task: task_pb2.Task, result: Outcome) -> None:
        """Answers a task no worker can run as sent, and rejects it to the dead-letter queue.

        A wrong protocol version, another silo's task or an unreadable request
        is poison like an unreadable envelope: the sender is told at once, and
        the task goes to the dead-letter queue for an operator instead of
        vanishing with an ack (found by tests/faults/test_poison.py).
        """
        props = delivery.properties
        answered = None
        if props.reply_to:
            answered = self._link.publish(
                self._names.replies_exchange,
                props.reply_to,
                result.messages[0],
                default_properties(
                    correlation_id=props.correlation_id or task.task_id,
                    message_id=task.task_id or None,
                    content_type=RESULT_CONTENT_TYPE,
                    user_id=self._addresses[0].username,
                ),
            )
        error = task_pb2.TaskResult.FromString(result.messages[0]).error
        self._dead_letter(delivery, f"{result.name}: {error.message}", after=answered)

    def _dead_letter(
        self,
        delivery: Delivery,
        reason: str,
        *,
        after: concurrent.futures.Future[None] | None = None,
    ) -> None:
        """Rejects a task without requeueing it, so that the broker dead-letters it.

        The silo queue's dead-letter exchange takes the task as it was sent,
        with `x-death` reason `rejected`: the silo's broker user needs no
        permission on the dead-letter exchange, so a silo can put nothing
        there but tasks it was sent (deploy/rabbitmq/README.md). A reject
        carries no headers, so `reason` is in this worker's
        `task_dead_lettered` log line (with the task's message and
        correlation ids), not in the message.

        `after` is the error reply to the task's sender: the task is rejected
        once the broker has settled that reply either way, so that a
        connection lost in between redelivers the task and the sender is
        answered again, rather than left waiting for its timeout.
        """
        props = delivery.properties
        self._log.warning(
            "task_dead_lettered",
            reason=reason,
            message_id=props.message_id,
            correlation_id=props.correlation_id,
            queue=delivery.queue,
            redelivered=delivery.redelivered,
        )
        if after is None:
            self._link.reject(delivery, requeue=False)
            return

        def reject(done: concurrent.futures.Future[None]) -> None:
            error = done.exception()
            if error is not None and not isinstance(error, Unroutable):
                self._log.warning(
                    "error_reply_not_confirmed",
                    message_id=props.message_id,
                    correlation_id=props.correlation_id,
                    error=str(error),
                )
            # Dead-lettered either way: a poison task is never worth a retry.
            self._link.reject(delivery, requeue=False)

        after.add_done_callback(reject)

    def _ack_when_confirmed(
        self, delivery: Delivery, future: concurrent.futures.Future[None], *, what: str
    ) -> None:
        """Acks the task once the broker confirmed its reply; see the cases below."""

        def requeue() -> None:
            # A worker stopping meanwhile closes its channel, which requeues
            # the task anyway.
            link = self._link
            if link is not None and not self._stop.is_set():
                try:
                    link.reject(delivery, requeue=True)
                except Exception as e:  # the link closed under us: same as above
                    self._log.debug("requeue_skipped", error=str(e))

        def settle(done: concurrent.futures.Future[None]) -> None:
            error = done.exception()
            if error is None:
                self._link.ack(delivery)
            elif isinstance(error, Unroutable):
                # The coordinator is gone and its reply queue expired with it:
                # nobody will read this result, so the task is done.
                self._log.warning(f"{what}_unroutable", reason=str(error))
                self._link.ack(delivery)
            elif self._stopping_now:
                # Stopping at once: the link closed without acking the task,
                # so the broker has requeued it, as intended.
                self._log.debug(f"{what}_abandoned", error=str(error))
            else:
                # Not confirmed: nacked (the reply queue is over its
                # max-length-bytes, overflow reject-publish), or the link was
                # lost. Give the task back after a pause; the redelivery is
                # answered from the results cache, not run again. Each
                # requeue counts towards the silo queue's delivery limit,
                # and a redelivery after the deadline is dead-lettered, so a
                # reply queue that stays full ends the task, never a spin.
                # (A classic silo queue has no delivery limit and counts
                # nothing: one retry a second until the deadline. With the
                # link lost, the broker has requeued it already and the
                # reject is dropped as stale.)
                try:
                    headers = delivery.properties.headers or {}
                    count = max(0, int(headers.get("x-delivery-count", 0)))
                except (TypeError, ValueError):
                    count = 0
                pause = min(REQUEUE_MAX_PAUSE_S, REQUEUE_FIRST_PAUSE_S * 2 ** min(count, 16))
                self._log.warning(
                    f"{what}_not_confirmed",
                    error=str(error),
                    message_id=delivery.properties.message_id,
                    delivery_count=count,
                    requeue_in_s=pause,
                )
                timer = threading.Timer(pause, requeue)
                timer.daemon = True
                timer.start()

        future.add_done_callback(settle)
