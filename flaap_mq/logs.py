"""Structured logging for both sides: one event per task, JSON on request.

As a library, flaap-mq logs through the standard `logging` module, under
`flaap_mq.*` loggers, and installs no handler: its events follow whatever the
application configures, so by default nothing below WARNING shows, and
nothing ever goes to stdout. Each event stays structured (structlog's
standard-library integration): the record's `msg` is the event dict, which a
structlog `ProcessorFormatter` renders whole and any other formatter prints
as `event key=value ...`. `structlog.configure` is never called, so an
application may configure structlog for itself.

The `flaap-mq` command (`configure`) installs one stderr handler: readable
in a terminal, or one JSON object per line (`--log-format json`) for log
shippers. Nothing logs a broker URL except through `redact_url`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog
import structlog.stdlib

LIBRARY_LOGGER = "flaap_mq"

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def quiet_tensorflow() -> None:
    """TF and absl print start-up noise that hides our own events."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF errors still raise
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def quiet_pika() -> None:
    """Raises pika's logger to CRITICAL, unless the application set its level.

    pika logs every failed connection attempt at ERROR, with a traceback, and
    the link retries for up to its connect timeout: dozens of lines a minute
    with the broker down. The link's own events (`broker_unavailable`, ...)
    say the same once, with context. An application that wants pika's lines
    sets `logging.getLogger("pika")`'s level, before or after this.
    """
    pika_logger = logging.getLogger("pika")
    if pika_logger.level == logging.NOTSET:
        pika_logger.setLevel(logging.CRITICAL)


class _Event(dict[str, Any]):
    """An event dict that prints as `event key=value ...`.

    It is the stdlib record's `msg`: a structlog `ProcessorFormatter` copies
    it as the event dict (`dict.copy` gives a plain dict), a plain
    `logging.Formatter` calls `str()` on it.
    """

    def __str__(self) -> str:
        parts = [str(self.get("event", ""))]
        for key, value in self.items():
            if key in ("event", "exc_info", "stack_info") or key.startswith("_"):
                continue
            quoted = isinstance(value, str) and (not value or any(c.isspace() for c in value))
            parts.append(f"{key}={value!r}" if quoted else f"{key}={value}")
        return " ".join(parts)


def _exc_info(value: Any) -> _ExcInfo | None:
    """`exc_info=True` (as `log.exception` sets), an exception or a tuple, as a tuple."""
    if value is True:
        info = sys.exc_info()
        return info if info[1] is not None else None  # type: ignore[return-value]
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and value[1] is not None:
        return value  # type: ignore[return-value]
    return None


def _hand_to_stdlib(
    logger: logging.Logger, method_name: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[_Event], dict[str, Any]]:
    """The last processor: `logger.<method>(event_dict, exc_info=..., extra=...)`.

    `extra` carries what `ProcessorFormatter` looks for (as
    `ProcessorFormatter.wrap_for_formatter` would). The exception goes both
    ways: as the record's `exc_info` for plain formatters, and resolved in the
    event dict for `format_exc_info` (`ProcessorFormatter` drops the record's).
    """
    info = _exc_info(event_dict.pop("exc_info", None))
    if info is not None:
        event_dict["exc_info"] = info
    return (_Event(event_dict),), {
        "exc_info": info,
        "extra": {"_logger": logger, "_name": method_name},
    }


# Cheap for a disabled level: `filter_by_level` drops the event first.
_LIBRARY_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.contextvars.merge_contextvars,
    _hand_to_stdlib,
]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger over the stdlib logger `name` (a `flaap_mq.*` name).

    Its processors and wrapper are its own, not structlog's global
    configuration, which belongs to the application.
    """
    if name != LIBRARY_LOGGER and not name.startswith(LIBRARY_LOGGER + "."):
        raise ValueError(f"flaap-mq logs under {LIBRARY_LOGGER!r}, not {name!r}")
    return structlog.wrap_logger(  # type: ignore[no-any-return]
        logging.getLogger(name),
        processors=_LIBRARY_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=True,
    )


class _JsonLines(logging.Formatter):
    """Our events as JSON lines, on a short path; anything else as `fallback` renders it.

    The silo worker logs one event per task on the thread that runs the
    tasks, between two executor calls: structlog's `ProcessorFormatter`
    took twice as long as this for the same line (docs/benchmarks.md,
    eleventh session). The line is the one it writes (its keys, then
    `level` and an ISO `timestamp` in UTC; values JSON cannot hold as their
    `repr`), but the time is the event's rather than the formatting's. An
    event with an exception or a stack goes to `fallback`, which renders
    them.
    """

    def __init__(self, fallback: logging.Formatter) -> None:
        super().__init__()
        self._fallback = fallback

    def format(self, record: logging.LogRecord) -> str:
        event = record.msg
        if type(event) is not _Event or "exc_info" in event or record.stack_info:
            return self._fallback.format(record)
        line = dict(event)
        line["level"] = record.levelname.lower()
        line["timestamp"] = (
            datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat()
            .replace("+00:00", "Z")
        )
        return json.dumps(line, default=repr)


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time (pytest swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_cli_handler: logging.StreamHandler[Any] | None = None


def configure(log_format: str = "console", level: str = "info") -> None:
    """The CLI's output: one stderr handler on the root logger, at `level` for ours.

    Our events get `level` and `timestamp` and are rendered for a terminal or
    as JSON lines (keys: `event`, `level`, `timestamp` and the event's own).
    Other libraries' records go through the same handler at their usual
    WARNING, with a `logger` key. Calling it again replaces the handler.
    """
    global _cli_handler
    if log_format not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', got {log_format!r}")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    formatter: logging.Formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    if log_format == "json":
        formatter = _JsonLines(formatter)
    handler: logging.StreamHandler[Any] = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _cli_handler is not None:
        root.removeHandler(_cli_handler)
    root.addHandler(handler)
    _cli_handler = handler
    logging.getLogger(LIBRARY_LOGGER).setLevel(logging.getLevelNamesMapping()[level.upper()])
    quiet_pika()


def redirect_cli_output(stream: TextIO) -> None:
    """Sends the CLI's log lines to `stream` (e.g. above progress bars); no-op in library use."""
    if _cli_handler is not None:
        _cli_handler.setStream(stream)  # type: ignore[arg-type]
