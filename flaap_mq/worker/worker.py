"""The silo worker: consumes its silo's queue and runs each task on TFF's executor.

The worker only ever dials out: to the broker, and to its own executor
service, through a Unix socket into the executor's sandbox (on loopback
with `--executor-network host`). `SiloWorker` wires the parts and owns the
lifecycle (start, serve, drain, stop):

* `intake`: on the link's I/O thread, each delivery becomes a
  `request.TaskRequest`; slices of a large task are collected, values
  announced and tasks numbered in delivery order;
* `pipeline`: on a first-in first-out thread pool as large as the prefetch
  window, each task becomes an `outcome.Outcome`, run on the executor at
  most once (`cache`), so a `Compute` that waits does not hold up the
  others, a task never starts before the tasks delivered ahead of it, and
  memory is bounded by the window;
* `request`: the delivery's `TaskRequest` answers, refuses or dead-letters
  it and acks it, a task with a `reply_to` only once the broker has
  confirmed its reply, so a task is never lost between the broker and the
  worker (the ack policy, in one place).
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from collections.abc import Callable, Sequence

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.credentials import credential_files
from flaap_mq.broker.link import BrokerLink
from flaap_mq.executor import HOST_NETWORK_MARK, ExecutorNetwork, ExecutorService
from flaap_mq.logs import get_logger
from flaap_mq.protocol import amqp, chunking, collector, envelope, topology
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.worker.intake import Entry, InFlight, Intake, Received
from flaap_mq.worker.outcome import Outcome
from flaap_mq.worker.pipeline import Pipeline
from flaap_mq.worker.request import Replies, TaskRequest
from flaap_mq.worker.values import ValueTable

log = get_logger("flaap_mq.worker")

# How long a draining worker waits for the broker to confirm the replies of
# the tasks it finished before it closes its link (see `shutdown`).
CONFIRM_TIMEOUT_S = 10.0
# Exit code after a Ctrl-C (SIGINT), as shells report an interrupted command
# and as `flaap-mq train` returns.
EXIT_INTERRUPTED = 130


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
        chunk_limits: collector.Limits | None = None,
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
        self._values = ValueTable()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._prefetch, thread_name_prefix=f"task-{silo_id}"
        )
        self._in_flight = InFlight()
        self._stop = threading.Event()  # set once shutting down
        # What `stop` was asked with, one entry per request (the signal, or
        # None): the first drains, a second stops at once. Appended to
        # without a lock, so that a signal handler can.
        self._stop_requests: list[signal.Signals | None] = []
        # Stopping at once: tasks still running are left to the broker.
        self._stopping_now = False
        self._link: BrokerLink | None = None
        self._log = log.bind(silo=self.silo_id)
        self.tasks_handled = 0
        self._pipeline = Pipeline(
            self.silo_id,
            self._service,
            self._values,
            wait_for_earlier=self._in_flight.wait_for_earlier,
            stopping_now=lambda: self._stopping_now,
            result_cache_bytes=result_cache_bytes,
            chunk_bytes=chunk_bytes,
        )
        self._replies = Replies(
            exchange=self._names.replies_exchange,
            user_id=self._addresses[0].username,
            log=self._log,
            shutting_down=self._stop.is_set,
            stopping_now=lambda: self._stopping_now,
        )
        self._intake = Intake(
            replies=self._replies,
            submit=lambda entries: self._pool.submit(self._handle_in_order, entries),
            # What coordinators' chunked tasks may make this process hold (`chunking`).
            collector=collector.Collector(chunk_limits),
            values=self._values,
            in_flight=self._in_flight,
            log=self._log,
        )

    @property
    def incarnation_id(self) -> str:
        return self._pipeline.incarnation_id

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
        self._replies.link = self._link
        self._link.consume(
            self._names.silo_queue(self.silo_id),
            lambda delivery: self._intake.on_delivery(delivery),
        )
        self._log.info(
            "worker_started",
            queue=self._names.silo_queue(self.silo_id),
            broker=self._link.describe_addresses(),
            incarnation=self.incarnation_id,
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
            self._pipeline.close_executor()
        self._link = None
        self._replies.link = None
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

        def finished() -> bool:
            # Run, and their replies handed over whole (a sliced one goes a
            # window at a time): only then can the link's confirms tell the rest.
            return not self._in_flight and not self._replies.replying

        if not self._wait_unless_stopped_now(finished, self._drain_timeout_s):
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
        self._pipeline.close_executor()  # no restart after this: `_stopping_now`
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

    def _handle_in_order(self, entries: list[Entry]) -> None:
        """Runs on the pool: a delivery's task(s), one after another (`Intake`).

        `_handle` settles every task; should it raise all the same, the
        batch's later tasks still run, so that none is left in flight.
        """
        for request, sequence, received in entries:
            try:
                self._handle(request, sequence, received)
            except Exception:
                self._log.exception("task_handler_failed")

    def _handle(self, request: TaskRequest, sequence: int, received: Received) -> None:
        """Runs on the pool: the task's outcome, settled by its request, and logged."""
        started = time.monotonic()
        delivery = request.delivery
        task: task_pb2.Task | None = None
        outcome: Outcome | None = None
        try:
            if isinstance(received, envelope.MalformedEnvelope):
                outcome = self._pipeline.unreadable(received, request.correlation_id)
            else:
                task, payload = received
                outcome = self._pipeline.outcome_for(
                    task,
                    payload,
                    reply_to=request.reply_to,
                    message_id=request.message_id,
                    sequence=sequence,
                )
            request.settle(task, outcome)
        except Exception:
            # A bug here must not kill the worker: the task goes back to the
            # queue (and to the dead-letter queue after the delivery limit).
            self._log.exception("task_handler_failed")
            request.give_back()
        finally:
            self._pipeline.settle_value(request.message_id, outcome)
            self.tasks_handled += 1
            self._log.info(
                "task",
                task_id=task.task_id if task else None,
                job=task.job_id if task else None,
                kind=envelope.kind_name(task.kind) if task else None,
                outcome=outcome.kind.value if outcome else "error",
                cached=outcome.cached if outcome else False,
                one_way=not request.reply_to,
                incarnation=self.incarnation_id,
                redelivered=delivery.redelivered,
                batched=delivery.properties.type == amqp.BATCH_TYPE,
                bytes_in=len(delivery.body),
                duration_ms=round((time.monotonic() - started) * 1000, 2),
            )
            self._in_flight.leave(sequence)
