"""flaap_mq.logs: structured events through stdlib `logging`, rendered by the CLI.

The library side hands each event to a `flaap_mq.*` stdlib logger (the record's
`msg` is the event dict); the CLI's handler renders it as before, so the
worker's JSON lines keep their keys for the tests and log shippers that
parse them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from flaap_mq import logs


@pytest.fixture
def cli_json() -> Iterator[None]:
    """The CLI's JSON output at DEBUG; the test session's set-up afterwards."""
    logs.configure("json", "debug")
    yield
    logs.configure("console", "warning")  # as tests/conftest.py has it


def test_json_lines_keep_their_keys(cli_json: None, capsys: pytest.CaptureFixture) -> None:
    log = logs.get_logger("flaap_mq.test").bind(silo="a")
    log.debug("task_done", task_id="t1", duration_s=0.5)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.exception("task_handler_failed")
    captured = capsys.readouterr()
    assert captured.out == ""
    first, second = (json.loads(line) for line in captured.err.splitlines())
    assert set(first) == {"event", "level", "timestamp", "silo", "task_id", "duration_s"}
    assert (first["event"], first["level"], first["task_id"]) == ("task_done", "debug", "t1")
    assert (second["event"], second["level"]) == ("task_handler_failed", "error")
    assert "ZeroDivisionError: boom" in second["exception"]


def test_json_lines_of_events_are_what_structlog_renders(cli_json: None) -> None:
    """The short path for our events (`_JsonLines`) writes structlog's line, time apart."""
    records: list[logging.LogRecord] = []
    keep = logging.Handler()
    keep.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(keep)
    try:
        log = logs.get_logger("flaap_mq.test").bind(silo="a")
        log.info("task", task_id="t1", cached=False, none=None, odd=object(), ms=1.5)
        log.warning("reply_not_confirmed", error="a b")
    finally:
        logging.getLogger().removeHandler(keep)
    formatter = logs._cli_handler.formatter
    for record in records:
        ours = json.loads(formatter.format(record))
        structlogs = json.loads(formatter._fallback.format(record))
        assert ours.pop("timestamp")[:16] == structlogs.pop("timestamp")[:16]
        assert list(ours.items()) == list(structlogs.items())


def test_a_plain_formatter_prints_the_event_and_its_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="flaap_mq")
    logs.get_logger("flaap_mq.test").info("worker_started", queue="q", detail="two words", n=3)
    (record,) = [r for r in caplog.records if r.name == "flaap_mq.test"]
    assert record.getMessage() == "worker_started queue=q detail='two words' n=3"
    assert record.msg["event"] == "worker_started"  # the event dict, for structlog formatters


def test_below_warning_is_dropped_by_default(caplog: pytest.LogCaptureFixture) -> None:
    """No level of its own (only the CLI sets one): the root's WARNING decides."""
    library = logging.getLogger("flaap_mq")
    saved = library.level
    library.setLevel(logging.NOTSET)
    try:
        logs.get_logger("flaap_mq.test").info("not_shown")
        logs.get_logger("flaap_mq.test").warning("shown")
    finally:
        library.setLevel(saved)
    assert logging.getLogger().level == logging.WARNING
    assert [r.getMessage() for r in caplog.records if r.name == "flaap_mq.test"] == ["shown"]


def test_loggers_are_under_flaap_mq() -> None:
    with pytest.raises(ValueError, match="flaap_mq"):
        logs.get_logger("worker")
