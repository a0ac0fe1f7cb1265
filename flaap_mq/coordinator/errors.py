"""What a silo's failure looks like to a TFF program on the coordinator.

Every error names the silo and the executor request, so that a user of a
ten-silo round knows where to look. Errors TFF may recover from by re-running
the invocation on a fresh executor derive from TFF's `RetryableError`; the
execution context retries those a bounded number of times.
"""

from __future__ import annotations

from tensorflow_federated.python.core.impl.executors import executors_errors

from flaap_mq.protocol import envelope
from flaap_mq.protocol.v1 import task_pb2


class SiloError(RuntimeError):
    """A request to a silo failed."""

    def __init__(self, silo_id: str, request: str, message: str) -> None:
        super().__init__(f"silo {silo_id!r}, {request}: {message}")
        self.silo_id = silo_id
        self.request = request


class SiloExecutionError(SiloError):
    """TFF's executor on the silo raised: the computation itself failed."""


class SiloProtocolError(SiloError):
    """The silo could not read the task (malformed, wrong version, wrong silo)."""


class SiloTimeoutError(SiloError, TimeoutError):
    """The silo did not answer within the task timeout."""


class SiloRetryableError(SiloError, executors_errors.RetryableError):
    """Lost executor state or an unavailable executor or broker: TFF may retry."""


class MessageTooLargeError(SiloError, ValueError):
    """A request was over the broker's message size limit and was not sent."""


def error_from_result(silo_id: str, request: str, error: task_pb2.Error) -> SiloError:
    """Maps a worker's structured error to the exception the caller sees."""
    code_name = task_pb2.ErrorCode.Name(error.code)
    message = f"{error.message} [{code_name}]"
    if error.retryable:
        return SiloRetryableError(silo_id, request, message)
    if error.code == envelope.ErrorCode.EXECUTOR_ERROR:
        return SiloExecutionError(silo_id, request, message)
    if error.code == envelope.ErrorCode.DEADLINE_EXCEEDED:
        return SiloTimeoutError(silo_id, request, message)
    return SiloProtocolError(silo_id, request, message)
