"""What a silo's failure looks like to a TFF program on the coordinator.

Every error names the silo and the executor request, so that a user of a
ten-silo round knows where to look. Errors TFF may recover from by re-running
the invocation on a fresh executor derive from TFF's `RetryableError`; the
execution context retries those a bounded number of times.
"""

from __future__ import annotations

from flaap_mq.protocol import envelope
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.tff_internals import executors_errors


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


class SiloLostError(SiloError):
    """A silo was lost to an invocation: no consumer on its queue for `silo_grace`
    seconds, or no answer by the invocation's deadline.

    Never retried (it is not a `RetryableError`): the silo is gone for this
    invocation. `reason` is short and stable, for logs and `metrics.csv`:
    `no-consumer-60s` or `deadline-30s`.
    """

    def __init__(self, silo_id: str, request: str, reason: str, message: str) -> None:
        super().__init__(silo_id, request, message)
        self.reason = reason


class NotEnoughSilosError(SiloLostError):
    """Fewer silos than `min_silos` answered, or a lost silo's part could not be dropped.

    `lost` maps every silo lost to the invocation to its reason; `answered`
    lists those that answered. `silo_id` is the first silo lost.
    """

    def __init__(
        self, lost: dict[str, str], answered: list[str], message: str, request: str = "invocation"
    ) -> None:
        first = next(iter(lost), "")
        super().__init__(first, request, lost.get(first, ""), message)
        self.lost = dict(lost)
        self.answered = list(answered)


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
