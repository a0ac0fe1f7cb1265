"""The silo watch's "no consumer since" bookkeeping: when a silo counts as lost (no broker)."""

from __future__ import annotations

import concurrent.futures

import pytest

from flaap_mq.broker.link import QueueCounts
from flaap_mq.coordinator.silo_watch import SiloState
from flaap_mq.coordinator.task_client import TaskClient


def _answer(client: TaskClient, silo: str, consumers: int, at: float) -> None:
    """The broker's answer to a consumer probe started at `at` (time.monotonic())."""
    client._watch._silos[silo].probed_at = at
    done: concurrent.futures.Future[QueueCounts] = concurrent.futures.Future()
    done.set_result(QueueCounts(messages=0, consumers=consumers))
    client._watch._on_checked(silo, done)


@pytest.fixture
def client() -> TaskClient:
    # Never started: nothing connects.
    return TaskClient("amqp://guest:guest@localhost:5672/", ["a", "b"], silo_grace_s=10)


def test_a_silo_is_lost_once_its_queue_has_had_no_consumer_for_the_grace(client, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("flaap_mq.coordinator.silo_watch.time.monotonic", lambda: now[0])
    assert client.lost_reason("a") is None  # nothing known yet
    _answer(client, "a", 0, at=1000.0)
    now[0] = 1009.0
    _answer(client, "a", 0, at=1009.0)  # still none: counted from the first answer
    assert client.lost_reason("a") is None
    now[0] = 1010.5
    assert client.lost_reason("a") == "no-consumer-10s"
    assert client.consumers("a") == 0
    assert client.lost_reason("b") is None


def test_a_consumer_seen_again_clears_it(client, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("flaap_mq.coordinator.silo_watch.time.monotonic", lambda: now[0])
    _answer(client, "a", 0, at=1000.0)
    now[0] = 1011.0
    assert client.lost_reason("a") == "no-consumer-10s"
    _answer(client, "a", 1, at=1011.0)  # a worker (or a standby taking over) consumes
    assert client.lost_reason("a") is None
    _answer(client, "a", 0, at=1012.0)  # gone again: the grace starts again
    now[0] = 1020.0
    assert client.lost_reason("a") is None


def test_the_probe_interval_fits_the_grace(client):
    assert client.check_interval_s == 2.5  # a quarter of a 10 s grace
    short = TaskClient("amqp://guest:guest@localhost:5672/", ["a"], silo_grace_s=0.4)
    assert short.check_interval_s == 0.25
    default = TaskClient("amqp://guest:guest@localhost:5672/", ["a"])
    assert default.check_interval_s == 5.0 and default.silo_grace_s == 60.0
    with pytest.raises(ValueError, match="silo_grace must be positive"):
        TaskClient("amqp://guest:guest@localhost:5672/", ["a"], silo_grace_s=0)


def test_a_silo_state_warns_once_per_absence_and_says_when_a_worker_is_back():
    state = SiloState(probed_at=5.0)
    assert state.answered(0) == (True, False)  # first "none": warn
    assert state.no_consumer_since == 5.0
    state.probed_at = 9.0
    assert state.answered(0) == (False, False)  # said once, not per check
    assert state.no_consumer_since == 5.0  # counted from the first answer
    assert state.answered(2) == (False, True)  # back
    assert (state.consumers, state.no_consumer_since, state.warned) == (2, None, False)
    assert state.answered(3) == (False, False)
