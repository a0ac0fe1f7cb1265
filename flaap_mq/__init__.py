"""flaap-mq: run TensorFlow Federated computations on silo workers through RabbitMQ.

Silo workers only dial out, to a shared broker; the coordinator publishes
each TFF executor request as a Task to the silo's queue and awaits the
result on its own reply queue.

    import flaap_mq
    # The URL from $FLAAP_MQ_BROKER_URL_FILE (or $FLAAP_MQ_BROKER_URL); or pass
    # flaap_mq.read_broker_url_file("/etc/flaap-mq/coordinator.url").
    flaap_mq.set_execution_context(None, ["a", "b", "c"])
    # ... any TFF program: its federated work now runs on the silos' workers

Most public names below load TensorFlow, so all are imported on first use:
`import flaap_mq` (and `flaap-mq --help`) stays instant.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "FederatedSilosContext": "flaap_mq.coordinator.context",
    "create_execution_context": "flaap_mq.coordinator.context",
    "set_execution_context": "flaap_mq.coordinator.context",
    "MessageTooLargeError": "flaap_mq.coordinator.errors",
    "NotEnoughSilosError": "flaap_mq.coordinator.errors",
    "SiloError": "flaap_mq.coordinator.errors",
    "SiloExecutionError": "flaap_mq.coordinator.errors",
    "SiloLostError": "flaap_mq.coordinator.errors",
    "SiloProtocolError": "flaap_mq.coordinator.errors",
    "SiloRetryableError": "flaap_mq.coordinator.errors",
    "SiloTimeoutError": "flaap_mq.coordinator.errors",
    "read_broker_url_file": "flaap_mq.broker.credentials",
    "load_config": "flaap_mq.config",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'flaap_mq' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
