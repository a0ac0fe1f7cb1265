"""The TFF execution context that spreads a computation over silo workers.

`create_execution_context(broker_url, silos)` builds, over one `TaskClient`
(one AMQP connection):

* one asynchronous TFF context per silo, backed by a `SiloExecutor`;
* a mergeable-computation context on top, which compiles each computation
  to TFF's mergeable form, runs `up_to_merge` on every silo side by side with
  its share of the clients, merges the partial results on the coordinator
  (in a `LocalMergeContext` over a `worker_binary` it owns, so that no silo
  sees another silo's partial aggregate), and runs `after_merge` there too,
  unless its result has a per-client part: then on the silos, which hold the
  CLIENTS-placed values, with only the merged result. The clients are split
  by `partitioning`, not by TFF 0.87's own splitter, which silently gives
  wrong answers for some argument shapes.

Retries: TFF's `AsyncExecutionContext` retries an invocation that raises
`RetryableError` forever (30 s apart at most); a silo that is gone for good
would hang the program. `SiloExecutionContext` retries a bounded number of
times, 1, 2, 4 ... (at most 10) s apart, and then raises the silo's error:
long enough to wait out a quorum queue electing a new leader when a broker
node stops (it refuses publishes meanwhile), which retries 0.1, 0.2 and
0.4 s apart did not (a rolling restart failed on it). A silo *lost* to an invocation (no
consumer on its queue for `silo_grace` seconds, or no answer by the
invocation's deadline) raises `SiloLostError`, which is never retried:
`flaap_mq.coordinator.participation` then completes the invocation over the
silos that answered (`min_silos`), or fails it naming the lost silo.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Mapping, Sequence

import tenacity

from flaap_mq import config as federation_config
from flaap_mq.broker.credentials import resolve_broker_url
from flaap_mq.broker.link import DEFAULT_MAX_MESSAGE_BYTES
from flaap_mq.broker.tls import with_tls_options
from flaap_mq.coordinator.local_merge import LocalMergeContext, create_local_merge_context
from flaap_mq.coordinator.participation import Participation, ParticipationPolicy
from flaap_mq.coordinator.partitioning import SiloSplittingContext
from flaap_mq.coordinator.silo_executor import SiloExecutor
from flaap_mq.coordinator.silo_users import SiloUsers, reply_users
from flaap_mq.coordinator.task_client import DEFAULT_SILO_GRACE_S, TaskClient
from flaap_mq.executor import ExecutorNetwork
from flaap_mq.logs import get_logger
from flaap_mq.protocol import chunking, collector, topology
from flaap_mq.tff_internals import (
    async_execution_context,
    compiler,
    context_stack_impl,
    executors_errors,
    invoke_once,
    mergeable_comp_compiler,
    placements,
    python_executor_stacks,
    tensorflow_computation,
)

log = get_logger("flaap_mq.coordinator")


class SiloExecutionContext(async_execution_context.AsyncExecutionContext):
    """TFF's async context for one silo, with a bounded number of retries."""

    def __init__(self, silo_id: str, *args: object, max_attempts: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.silo_id = silo_id
        self._max_attempts = max_attempts

    async def invoke(self, comp: object, arg: object) -> object:
        if hasattr(arg, "__await__"):
            arg = await arg  # TFF passes a coroutine when called from its own __call__
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(executors_errors.RetryableError),
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=tenacity.wait_exponential(multiplier=1.0, max=10.0),
            before_sleep=self._log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await invoke_once(self, comp, arg)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        log.warning(
            "invocation_retrying",
            silo=self.silo_id,
            attempt=state.attempt_number,
            error=str(state.outcome.exception()) if state.outcome else None,
        )


def _close_all(client: TaskClient, merge_context: LocalMergeContext) -> None:
    try:
        merge_context.close()
    finally:
        client.close()


class FederatedSilosContext(SiloSplittingContext):
    """Runs TFF computations across silo workers; close it (or use `with`) when done.

    Creating it starts the coordinator's own `worker_binary`, where `merge`
    runs (see `flaap_mq.coordinator.local_merge`); `close()` stops it.  Create
    it from a long-lived thread: the binary dies with the thread that started it.
    """

    def __init__(
        self,
        client: TaskClient,
        silo_contexts: Sequence[SiloExecutionContext],
        executor_network: ExecutorNetwork = ExecutorNetwork.SANDBOX,
        participation: ParticipationPolicy | None = None,
    ) -> None:
        try:
            merge_context = create_local_merge_context(
                executor_network, hidden_paths=client.credential_files
            )
        except BaseException:
            client.close()
            raise
        try:
            super().__init__(
                silo_contexts,
                compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form,
                transform_result=tensorflow_computation.transform_result,
                merge_context=merge_context,
                participation=participation or ParticipationPolicy(client),
            )
        except BaseException:
            _close_all(client, merge_context)
            raise
        self.client = client
        self.silo_ids = list(client.silo_ids)
        self._finalizer = weakref.finalize(self, _close_all, client, merge_context)
        atexit.register(self._finalizer)

    @property
    def job_id(self) -> str:
        return self.client.job_id

    @property
    def min_silos(self) -> int:
        """How many silos must answer for an invocation to complete."""
        return self._participation.min_silos

    @property
    def last_participation(self) -> Participation | None:
        """Who took part in the last invocation that completed here (None: it failed,
        or none has run): the silos that answered, and those dropped with the reason."""
        return self._participation.last

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> FederatedSilosContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _silo_context(
    client: TaskClient, silo_id: str, default_clients: int, max_attempts: int
) -> SiloExecutionContext:
    def executor_for(cardinalities: dict[placements.PlacementLiteral, int]) -> SiloExecutor:
        if cardinalities.get(placements.CLIENTS) is None:
            # No CLIENTS-placed argument to count: the silo hosts its own.
            cardinalities[placements.CLIENTS] = default_clients
        return SiloExecutor(client, silo_id, cardinalities)

    return SiloExecutionContext(
        silo_id,
        python_executor_stacks.ResourceManagingExecutorFactory(executor_for),
        compiler.desugar_and_transform_to_native,
        transform_args=tensorflow_computation.transform_args,
        transform_result=tensorflow_computation.transform_result,
        max_attempts=max_attempts,
    )


def create_execution_context(
    broker_url: str | None = None,
    silos: Sequence[str] | None = None,
    *,
    config: str | os.PathLike[str] | federation_config.Settings | None = None,
    task_timeout: float = 600.0,
    clients_per_silo: int | Mapping[str, int] = 1,
    job_id: str | None = None,
    topology_prefix: str | None = None,
    queue_type: str | None = None,
    max_attempts: int = 4,
    connect_timeout: float = 30.0,
    chunk_bytes: int = chunking.DEFAULT_CHUNK_BYTES,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    chunk_limits: collector.Limits | None = None,
    silo_users: SiloUsers = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    executor_network: str = "sandbox",
    min_silos: int | None = None,
    silo_grace: float | None = None,
    invocation_timeout: float | None = None,
    reply_queue_expires: float | None = None,
) -> FederatedSilosContext:
    """A TFF context that runs computations on the given silos' workers.

    Args:
      broker_url: AMQP URL of the broker (several, comma-separated, for a
        cluster); `None` reads the file named by `FLAAP_MQ_BROKER_URL_FILE`,
        else `FLAAP_MQ_BROKER_URL` (`flaap_mq.broker.credentials.resolve_broker_url`;
        `read_broker_url_file(path)` reads any other file).
      silos: the silo ids; each must have a worker (`flaap-mq worker`).
        Tasks for a silo whose worker is not up yet wait in its queue.
        None: the config file's `silos`.
      config: the federation's config file (`flaap_mq.config`), or the
        `Settings` `flaap_mq.load_config()` returned: the broker URL (or
        its file), silos, prefix, queue type and TLS files not given here
        come from it. An argument given here wins, then the environment
        (`FLAAP_MQ_BROKER_URL_FILE`, ...), then the file. None (default):
        no config file is read, not even `$FLAAP_MQ_CONFIG`; pass
        `config=flaap_mq.load_config()` to look for one as the CLI does.
      task_timeout: seconds a silo may take to answer one executor request
        before the call fails with `SiloTimeoutError` naming the silo.
      clients_per_silo: how many clients each silo hosts when a computation's
        argument does not say (no CLIENTS-placed argument); one number for all
        silos or a mapping silo id -> number.
      job_id: names this coordinator's reply queue; random by default.
      topology_prefix: prefix of every exchange and queue name (default: the
        config's `prefix`, else "flaap").
      queue_type: "quorum" or "classic" silo queues (default: the config's
        `queue_type`, else "quorum").
      max_attempts: how often an invocation that failed with a retryable
        error (lost worker state, broker unavailable) is run in all.
      connect_timeout: seconds to wait for the broker at start.
      chunk_bytes: requests larger than this travel as several messages;
        keep it below the broker's `max_message_size`.
      max_message_bytes: the broker's `max_message_size`; a message over it
        is refused before sending with `MessageTooLargeError`.
      chunk_limits: what silos' chunked results may make this process hold
        (`flaap_mq.protocol.collector.Limits`; by default a result of at most
        1 GiB, and 2 GiB of slices in all); a result over them fails its
        call with a retryable `SiloRetryableError` saying which limit.
      silo_users: silo id -> the broker user that silo's worker logs in as.
        A reply is accepted only from the user of the silo the task was
        sent to (its `user_id`, which the broker checks against the login);
        any other is logged (`reply_from_wrong_user`) and dropped. By default
        (None) each silo's user is its silo id, as `flaap-mq admin
        definitions` makes them, unless the coordinator logs in as `guest`
        (local development, everyone shares that login: any user is
        accepted). `"any"` turns the check off, for a broker where every
        party shares one login (see `flaap_mq.coordinator.silo_users`).
      ca_file, cert_file, key_file: TLS for an `amqps://` URL: the CA to
        trust for the broker (default: the system's), and a client
        certificate and key; the same as the URL's `cacertfile`, `certfile`
        and `keyfile` query options (see `flaap_mq.broker.tls`).
      executor_network: "sandbox" (default): the coordinator's own TFF
        executor, where `merge` runs, has no network and is reached through
        a Unix socket (`flaap_mq.executor`). "host" runs it on a TCP port of
        every interface, as TFF does; only for hosts that forbid the
        sandbox's namespaces, and logged as a warning.
      min_silos: how many silos must answer for an invocation to complete.
        None (default): every silo. Below the number of silos, an invocation
        whose computation may do without a silo (no per-client part in its
        argument or result: the clients' data lives on the silos, see
        `flaap_mq.coordinator.participation` for the rule) runs on the silos
        whose queue has a consumer at its start and completes over those
        that answer, as if the others held no clients; with fewer than
        `min_silos` it fails with `NotEnoughSilosError` naming the lost silos
        and why. `context.last_participation` tells who took part. A
        computation that breaks the rule needs every silo, and fails
        clearly when one is lost. None also takes the config's `min_silos`.
      silo_grace: seconds a silo's queue may have no consumer (its worker
        gone; a standby taking over is no loss) before the silo is lost to
        the invocations waiting for it: with every silo required, they fail
        then with `SiloLostError` naming it, instead of after
        `task_timeout`. None: the config's `silo_grace`, else 60.
      invocation_timeout: seconds an invocation may take; every task it
        sends expires (in the broker too) by then, and a silo that has not
        answered is lost to it (`SiloLostError`, reason `deadline-<T>s`).
        None (default): only `task_timeout` per request.
      reply_queue_expires: seconds the broker keeps this coordinator's reply
        queue once nothing consumes it (the coordinator died): then the queue
        and any replies in it are deleted (`x-expires`). None (default):
        `topology.DEFAULT_REPLY_QUEUE_EXPIRES_MS`, 120 s, long enough to ride
        out a broker restart.
    """
    network = ExecutorNetwork(executor_network)
    if config is not None:
        if not isinstance(config, federation_config.Settings):
            # The arguments given win; the rest: environment, then the file.
            config = federation_config.load_config(
                config,
                broker_url=broker_url,
                silos=silos or None,
                prefix=topology_prefix,
                queue_type=queue_type,
                ca_file=ca_file,
                cert_file=cert_file,
                key_file=key_file,
            )
        broker_url = broker_url if broker_url is not None else config.broker_url
        silos = silos if silos else config.silos
        min_silos = min_silos if min_silos is not None else config.min_silos
        silo_grace = silo_grace if silo_grace is not None else config.silo_grace
        topology_prefix = topology_prefix or config.prefix
        queue_type = queue_type or config.queue_type
        ca_file, cert_file, key_file = (
            ca_file or config.ca_file,
            cert_file or config.cert_file,
            key_file or config.key_file,
        )
    if silos is None or (config is not None and not silos):
        raise ValueError("no silos given (silos=, or silos = [...] in the config file)")
    topology_prefix = topology_prefix or federation_config.DEFAULT_PREFIX
    queue_type = queue_type or federation_config.DEFAULT_QUEUE_TYPE
    if isinstance(clients_per_silo, Mapping):
        missing = [s for s in silos if s not in clients_per_silo]
        if missing:
            raise ValueError(f"clients_per_silo has no entry for silos {missing}")
        per_silo = {s: int(clients_per_silo[s]) for s in silos}
    else:
        per_silo = {s: int(clients_per_silo) for s in silos}
    if any(n < 0 for n in per_silo.values()):
        raise ValueError(f"clients_per_silo must not be negative, got {per_silo}")
    if task_timeout <= 0:
        raise ValueError(f"task_timeout must be positive, got {task_timeout}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    if ca_file or cert_file or key_file:
        broker_url = with_tls_options(
            broker_url if broker_url is not None else resolve_broker_url().url,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )
    client = TaskClient(
        broker_url,
        list(silos),
        job_id=job_id,
        names=topology.Names(topology_prefix),
        queue_type=topology.QueueType(queue_type),
        task_timeout_s=task_timeout,
        connect_timeout_s=connect_timeout,
        chunk_bytes=chunk_bytes,
        max_message_bytes=max_message_bytes,
        chunk_limits=chunk_limits,
        silo_users=reply_users(broker_url, list(silos), silo_users),
        silo_grace_s=DEFAULT_SILO_GRACE_S if silo_grace is None else silo_grace,
        reply_queue_expires_ms=(
            topology.DEFAULT_REPLY_QUEUE_EXPIRES_MS
            if reply_queue_expires is None
            else round(reply_queue_expires * 1000)
        ),
    )
    try:
        participation = ParticipationPolicy(
            client, min_silos=min_silos, invocation_timeout=invocation_timeout
        )
    except ValueError:
        client.close()
        raise
    client.start()
    contexts = [_silo_context(client, s, per_silo[s], max_attempts) for s in client.silo_ids]
    return FederatedSilosContext(client, contexts, network, participation)


def set_execution_context(
    broker_url: str | None = None, silos: Sequence[str] | None = None, **options: object
) -> FederatedSilosContext:
    """Like `create_execution_context`, and installs it as TFF's default context."""
    context = create_execution_context(broker_url, silos, **options)  # type: ignore[arg-type]
    context_stack_impl.context_stack.set_default_context(context)
    return context
