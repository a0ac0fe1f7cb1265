"""A silo with no worker: warned about at once, and named, with what to run, in the timeout.

Against a real broker, through `TaskClient` (what the execution context runs
on); `tests/e2e/test_silo_without_worker.py` does it through a TFF program.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
import structlog
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import placements

from flaap_mq.broker.declare import declare_blocking
from flaap_mq.coordinator import errors
from flaap_mq.coordinator.task_client import TaskClient
from flaap_mq.protocol import topology

Events = Callable[[], list[dict[str, Any]]]


@contextlib.contextmanager
def flaap_events(caplog: pytest.LogCaptureFixture) -> Iterator[Events]:
    """flaap-mq's structured events, however logging is set up.

    Through stdlib `logging` (the record's `msg` is the event dict) or
    structlog's own processors: both are captured.
    """
    caplog.set_level(logging.INFO, logger="flaap_mq")
    with structlog.testing.capture_logs() as captured:

        def events() -> list[dict[str, Any]]:
            from_stdlib = [
                {"log_level": r.levelname.lower(), **r.msg}
                for r in caplog.records
                if isinstance(r.msg, dict)
            ]
            return list(captured) + from_stdlib

        yield events


def _named(events: Events, name: str) -> list[dict[str, Any]]:
    return [e for e in events() if e.get("event") == name]


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _get_executor() -> executor_pb2.GetExecutorRequest:
    return executor_pb2.GetExecutorRequest(
        cardinalities=value_serialization.serialize_cardinalities({placements.CLIENTS: 1})
    )


def test_no_worker_is_warned_at_start_and_named_in_the_timeout(
    broker_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with flaap_events(caplog) as events:
        client = TaskClient(broker_url, ["ghost"], names=topology.Names(prefix), task_timeout_s=2)
        try:
            started = time.monotonic()
            client.start()
            _wait_for(lambda: bool(_named(events, "silo_has_no_worker")), 5)
            print(f"\nwarned {time.monotonic() - started:.2f} s after start")
            (warning,) = _named(events, "silo_has_no_worker")
            assert warning["log_level"] == "warning"
            assert warning["queue"] == f"{prefix}.silo.ghost"
            assert f"flaap-mq worker --silo-id ghost --prefix {prefix}" in warning["fix"]
            started = time.monotonic()
            with pytest.raises(errors.SiloTimeoutError) as raised:
                asyncio.run(client.ask("ghost", _get_executor()))
            waited = time.monotonic() - started
        finally:
            client.close()
    message = str(raised.value)
    print(message)
    assert message.startswith("silo 'ghost', GetExecutor: no answer within the task timeout of 2 s")
    assert f"no worker is consuming {prefix}.silo.ghost" in message
    assert f"flaap-mq worker --silo-id ghost --prefix {prefix}" in message
    assert f"flaap-mq status --silo ghost --prefix {prefix}" in message
    assert 2 <= waited < 5  # the timeout, and at most a moment to ask the broker
    assert len(_named(events, "silo_has_no_worker")) == 1  # said once, not per check


def test_a_worker_that_goes_away_while_a_task_waits_is_warned_about(
    broker_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    names = topology.Names(prefix)
    # A "worker" that consumes the silo's queue and never answers.
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        declare_blocking(
            channel,
            topology.shared_declarations(names) + topology.silo_declarations(names, ["quiet"]),
        )
        channel.basic_consume(names.silo_queue("quiet"), lambda *_: None)
        with flaap_events(caplog) as events:
            client = TaskClient(broker_url, ["quiet"], names=names, task_timeout_s=2)
            client.consumer_check_interval_s = 0.5
            try:
                client.start()
                # Someone consumes: no warning, and a timeout does not blame the worker's absence.
                with pytest.raises(errors.SiloTimeoutError) as raised:
                    asyncio.run(client.ask("quiet", _get_executor()))
                assert "no worker is consuming" not in str(raised.value)
                assert not _named(events, "silo_has_no_worker")
                connection.close()  # the worker goes away
                started = time.monotonic()

                async def wait_and_watch() -> float:
                    call = asyncio.ensure_future(client.ask("quiet", _get_executor(), timeout_s=4))
                    while not _named(events, "silo_has_no_worker"):
                        assert not call.done(), call
                        await asyncio.sleep(0.05)
                    warned_after = time.monotonic() - started
                    with pytest.raises(errors.SiloTimeoutError) as late:
                        await call
                    assert f"no worker is consuming {prefix}.silo.quiet" in str(late.value)
                    return warned_after

                warned_after = asyncio.run(wait_and_watch())
            finally:
                client.close()
        print(f"\nwarned {warned_after:.2f} s into the wait")
        assert warned_after < 2  # within a check interval or so, not at the timeout
        (warning,) = _named(events, "silo_has_no_worker")
        assert warning["queue"] == names.silo_queue("quiet")
    finally:
        if connection.is_open:
            connection.close()
