"""Running a TFF round in the background while a test breaks something under it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import tensorflow_federated as tff

from flaap_mq.coordinator.context import FederatedSilosContext


class BackgroundRound:
    """Runs `fn(*args)` under `context` on its own thread (TFF contexts are per thread)."""

    def __init__(self, context: FederatedSilosContext, fn: Callable[..., Any], *args: Any) -> None:
        self.context = context
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        started = time.monotonic()
        try:
            with tff.framework.get_context_stack().install(self.context):
                self.result = fn(*args)
        except BaseException as e:
            self.error = e
        finally:
            self.seconds = time.monotonic() - started

    def wait(self, timeout_s: float) -> Any:
        """The round's answer; raises its error, or TimeoutError if it hangs."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the round did not finish within {timeout_s:g} s: it hangs")
        if self.error is not None:
            raise self.error
        return self.result

    def done(self) -> bool:
        return not self._thread.is_alive()


def pending_requests(context: FederatedSilosContext) -> list[tuple[str, str]]:
    """(silo, request) of every call the coordinator is waiting on right now."""
    return [(p.silo_id, p.request) for p in context.client._calls.waiting()]


def wait_for_pending(
    context: FederatedSilosContext, silo_id: str, request: str, timeout_s: float = 60.0
) -> None:
    """Blocks until the coordinator waits on `request` from `silo_id`."""
    deadline = time.monotonic() + timeout_s
    while (silo_id, request) not in pending_requests(context):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the coordinator never waited on {request} from {silo_id}")
        time.sleep(0.01)
