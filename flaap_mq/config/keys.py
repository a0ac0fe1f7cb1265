"""Every key a config file may hold, and the check of each value (pure; no I/O).

One table says which keys there are and what each must be, so that an unknown
key is an error with the nearest known key as a hint (a misspelt `silo` must
not silently mean "no silos"), and an error names the file and the key but
never quotes a value that may hold a password (`broker_url`,
`management_url`).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.urls import redact_url, split_broker_urls
from flaap_mq.protocol.topology import QueueType, validate_id

# Every key a config file may hold, and what it is (for errors).
STRING_KEYS = {
    "broker_url": "an AMQP URL (or several, comma-separated)",
    "broker_url_file": "the path of a file holding the broker URL",
    "prefix": "the topology prefix",
    "queue_type": "'quorum' or 'classic'",
    "ca_file": "the path of a PEM CA file",
    "cert_file": "the path of a PEM client certificate",
    "key_file": "the path of a PEM client key",
    "management_url": "the RabbitMQ management API's URL",
    "silo_id": "this worker's silo id",
}
PATH_KEYS = ("broker_url_file", "ca_file", "cert_file", "key_file")
# Values never quoted in an error: they may hold a password.
SECRET_KEYS = ("broker_url", "management_url")
# Numbers: silos that drop out (`create_execution_context`'s `min_silos`, `silo_grace`).
NUMBER_KEYS = {
    "min_silos": "a whole number of silos, at least 1",
    "silo_grace": "a positive number of seconds",
}
KEYS = (*STRING_KEYS, "silos", *NUMBER_KEYS)
_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
_GUEST_LOGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://guest:guest@", re.IGNORECASE)


def check_value(path: Path, dotted: str, key: str, value: Any) -> Any:
    """`value` if it fits `key`; else a `ValueError` naming file and key (never a secret)."""
    if key not in KEYS:
        near = difflib.get_close_matches(key.replace("-", "_"), KEYS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(KEYS)}"
        raise ValueError(f"config file {path}: unknown key {dotted!r}{hint}")
    if key == "silos":
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError(f"config file {path}: {dotted} must be a list of silo id strings")
        try:
            silos = [validate_id("silo", s) for s in value]
        except ValueError as e:
            raise ValueError(f"config file {path}: {dotted}: {e}") from None
        if len(set(silos)) != len(silos):
            raise ValueError(f"config file {path}: {dotted} names a silo twice")
        return tuple(silos)
    if key in NUMBER_KEYS:
        whole = isinstance(value, int) and not isinstance(value, bool)
        number = whole or isinstance(value, float)
        if (key == "min_silos" and not (whole and value >= 1)) or not number or value <= 0:
            raise ValueError(
                f"config file {path}: {dotted} must be {NUMBER_KEYS[key]}, got {value!r}"
            )
        return value
    if not isinstance(value, str) or not value.strip():
        shown = "" if key in SECRET_KEYS else f", got {value!r}"
        raise ValueError(
            f"config file {path}: {dotted} must be a non-empty string, {STRING_KEYS[key]}{shown}"
        )
    if key == "queue_type" and value not in {q.value for q in QueueType}:
        raise ValueError(f"config file {path}: {dotted} must be {STRING_KEYS[key]}, got {value!r}")
    try:
        if key == "silo_id":
            validate_id("silo", value)
        elif key == "prefix" and not _PREFIX.fullmatch(value):
            raise ValueError(f"prefix {value!r} must be 1 to 100 letters, digits, ., - or _")
        elif key == "broker_url":
            parse_broker_urls(value)
    except ValueError as e:
        raise ValueError(f"config file {path}: {dotted}: {e}") from None
    return value


def holds_password(urls: str) -> bool:
    """Whether any URL of `urls` holds a password (RabbitMQ's local guest:guest aside)."""
    return any(
        redact_url(url) != url and not _GUEST_LOGIN.match(url) for url in split_broker_urls(urls)
    )
