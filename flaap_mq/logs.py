"""Structured logging for both sides: one event per task, JSON on request.

Every event goes through structlog to stderr. `--log-format json` gives one
JSON object per line for log shippers; the default is readable in a terminal.
Nothing logs a broker URL except through `redact_url`.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def quiet_tensorflow() -> None:
    """TF and absl print start-up noise that hides our own events."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF errors still raise
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def configure(log_format: str = "console", level: str = "info") -> None:
    if log_format not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', got {log_format!r}")
    renderer = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # pika logs every reconnect attempt at ERROR with the full URL-less
    # traceback; our own events say the same once, with context.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
