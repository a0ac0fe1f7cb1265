"""The worker's table of value names (pure logic, threads but no broker)."""

from __future__ import annotations

import threading
import time

import pytest

from flaap_mq.protocol import envelope
from flaap_mq.worker.values import ValueTable, ValueUnavailable

LOST = envelope.Failure.STATE_LOST


def test_a_made_value_resolves_to_the_services_ref():
    table = ValueTable()
    table.announce("v")
    table.made("v", "7", "clients=1")
    assert table.refs(["v", "v"], deadline=None) == {"v": "7"}


def test_a_name_never_announced_is_state_lost_at_once():
    with pytest.raises(ValueUnavailable) as raised:
        ValueTable().refs(["ghost"], deadline=None)
    assert raised.value.failure is LOST
    assert "ghost" in raised.value.message


def test_a_value_being_made_is_waited_for():
    table = ValueTable()
    table.announce("v")
    threading.Timer(0.2, table.made, ("v", "1", "e")).start()
    started = time.monotonic()
    assert table.refs(["v"], deadline=time.monotonic() + 10) == {"v": "1"}
    assert time.monotonic() - started >= 0.15


def test_waiting_ends_at_the_deadline():
    table = ValueTable()
    table.announce("v")
    with pytest.raises(ValueUnavailable) as raised:
        table.refs(["v"], deadline=time.monotonic() + 0.1)
    assert raised.value.failure is envelope.Failure.DEADLINE_EXCEEDED


def test_a_failure_is_passed_on_with_its_first_cause():
    table = ValueTable()
    table.announce("a")
    table.fail("a", envelope.Failure.EXECUTOR_ERROR, "CreateValue failed: bad value")
    with pytest.raises(ValueUnavailable) as raised:
        table.refs(["a"], deadline=None)
    assert raised.value.failure is envelope.Failure.EXECUTOR_ERROR
    assert raised.value.message == "CreateValue failed: bad value"
    assert raised.value.value_id == "a"


def test_a_late_failure_does_not_take_back_a_made_value():
    table = ValueTable()
    table.announce("v")
    table.made("v", "1", "e")
    table.fail("v", LOST, "duplicate delivery")
    assert table.refs(["v"], deadline=None) == {"v": "1"}


def test_take_forgets_and_returns_only_values_made():
    table = ValueTable()
    for name in ("a", "b"):
        table.announce(name)
    table.made("a", "1", "e")
    table.fail("b", LOST, "gone")
    assert table.take(["a", "b", "never"], deadline=None) == ["1"]
    assert len(table) == 0


def test_forget_executor_drops_only_its_values():
    table = ValueTable()
    for name, executor in (("a", "e1"), ("b", "e2")):
        table.announce(name)
        table.made(name, name.upper(), executor)
    table.forget_executor("e1")
    assert table.refs(["b"], deadline=None) == {"b": "B"}
    with pytest.raises(ValueUnavailable):
        table.refs(["a"], deadline=None)


def test_clear_wakes_every_waiter_with_the_reason():
    table = ValueTable()
    table.announce("v")
    errors: list[ValueUnavailable] = []

    def wait() -> None:
        try:
            table.refs(["v"], deadline=None)
        except ValueUnavailable as e:
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    table.clear(envelope.Failure.EXECUTOR_UNAVAILABLE, "the worker is stopping")
    waiter.join(5)
    assert not waiter.is_alive()
    assert [e.message for e in errors] == ["the worker is stopping"]
    assert len(table) == 0


def test_made_after_clear_does_not_bring_a_value_back():
    table = ValueTable()
    table.announce("v")
    table.clear(LOST, "executor died")
    table.made("v", "1", "e")
    assert len(table) == 0


def test_failed_values_are_kept_only_up_to_a_bound():
    table = ValueTable(max_failed=2)
    for name in ("a", "b", "c"):
        table.announce(name)
        table.fail(name, LOST, f"{name} failed")
    assert len(table) == 2
    with pytest.raises(ValueUnavailable, match="not held"):
        table.refs(["a"], deadline=None)  # the oldest, forgotten
    with pytest.raises(ValueUnavailable, match="c failed"):
        table.refs(["c"], deadline=None)
