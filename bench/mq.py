"""The flaap-mq side: real `flaap-mq worker` processes under a topology of their own.

`MqSilos` starts one worker per silo (`WorkerFleet`) under a topology prefix
unique to this run, hands out flaap-mq contexts whose requests are counted,
and on exit stops the workers (SIGTERM) and deletes every queue and exchange
of that prefix.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import tensorflow_federated as tff

import flaap_mq
from bench.wire import WireCount, count_task_client
from flaap_mq.broker.declare import delete_topology
from flaap_mq.coordinator.silo_executor import SiloExecutor
from flaap_mq.local.workers import WorkerFleet
from flaap_mq.protocol import topology

TASK_TIMEOUT_S = 300.0
# Eight workers importing TensorFlow at once on a busy 2-core machine can take minutes.
WORKER_START_TIMEOUT_S = 300.0


class MqSilos:
    """Workers for `num_silos` silos; a context manager that stops and cleans up."""

    def __init__(self, broker_url: str, num_silos: int, log_dir: Path) -> None:
        self.broker_url = broker_url
        self.prefix = f"flaapbench-{uuid.uuid4().hex[:8]}"
        self.silo_ids = [f"s{i}" for i in range(num_silos)]
        self.count = WireCount()
        self.executor_pids: list[int] = []
        self._job_ids: list[str] = []
        self._fleet = WorkerFleet(
            broker_url,
            self.silo_ids,
            prefix=self.prefix,
            log_dir=log_dir,
            start_timeout_s=WORKER_START_TIMEOUT_S,
        )

    def __enter__(self) -> MqSilos:
        try:
            self._fleet.start()
        except BaseException:
            self._delete_topology()
            raise
        for worker in self._fleet.workers.values():
            self.executor_pids.extend(worker.executor_pids())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._fleet.close()
        finally:
            self._delete_topology()

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._fleet.workers.values()]

    def context(self, num_silos: int) -> flaap_mq.FederatedSilosContext:
        """A flaap-mq context over the first `num_silos` silos, one client each."""
        context = flaap_mq.create_execution_context(
            self.broker_url,
            self.silo_ids[:num_silos],
            task_timeout=TASK_TIMEOUT_S,
            clients_per_silo=1,
            topology_prefix=self.prefix,
        )
        self._job_ids.append(context.job_id)
        count_task_client(context.client, self.count)
        return context

    def executor(self, context: flaap_mq.FederatedSilosContext) -> SiloExecutor:
        """A bare executor on the context's first silo, for single-request timing."""
        return SiloExecutor(context.client, context.silo_ids[0], {tff.CLIENTS: 1})

    def _delete_topology(self) -> None:
        delete_topology(
            self.broker_url,
            topology.Names(self.prefix),
            silos=self.silo_ids,
            jobs=self._job_ids,
        )
