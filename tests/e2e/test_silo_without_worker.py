"""A TFF program over a silo with no worker: warned at once, and told what to run."""

from __future__ import annotations

import time

import pytest
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.examples import temperature_average
from tests.integration.test_silo_without_worker import _named, _wait_for, flaap_events


def test_a_context_over_a_silo_without_a_worker_says_so_and_what_to_run(
    broker_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with flaap_events(caplog) as events:
        started = time.monotonic()
        context = flaap_mq.create_execution_context(
            broker_url, ["ghost"], topology_prefix=prefix, task_timeout=3, max_attempts=1
        )
        try:
            # Said while the context starts, long before any timeout.
            _wait_for(lambda: bool(_named(events, "silo_has_no_worker")), 5)
            print(f"\nwarned {time.monotonic() - started:.1f} s after the context was asked for")
            with (
                tff.framework.get_context_stack().install(context),
                pytest.raises(flaap_mq.SiloTimeoutError) as raised,
            ):
                temperature_average([[1.0], [2.0]])
        finally:
            context.close()
    (warning,) = _named(events, "silo_has_no_worker")
    assert warning["queue"] == f"{prefix}.silo.ghost"
    message = str(raised.value)
    print(message)
    assert "silo 'ghost', GetExecutor: no answer within the task timeout of 3 s" in message
    assert f"no worker is consuming {prefix}.silo.ghost" in message
    assert f"flaap-mq worker --silo-id ghost --prefix {prefix}" in message
    assert "flaap-mq status --silo ghost" in message
