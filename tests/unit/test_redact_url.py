"""redact_url hides the password, and only the password, of an AMQP URL."""

from __future__ import annotations

import pika
import pytest

from flaap_mq.testing.broker import redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        (
            "amqps://silo-7:s3cr%40t@broker.example.org:5671/flaap?heartbeat=30",
            "amqps://silo-7:***@broker.example.org:5671/flaap?heartbeat=30",
        ),
        ("amqp://:only-a-password@host/", "amqp://:***@host/"),
        ("amqp://user:p@ss:w@rd@host:5672/%2F", "amqp://user:***@host:5672/%2F"),
        ("amqp://user:@host/", "amqp://user:***@host/"),
    ],
)
def test_password_is_replaced(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["amqp://localhost:5672/", "amqp://user@localhost/", "amqp:///", "not a url"],
)
def test_urls_without_password_are_unchanged(url: str) -> None:
    assert redact_url(url) == url


def test_hides_exactly_what_pika_would_send_as_password() -> None:
    url = "amqp://coordinator:Zq%3A9%2Fx%40y@127.0.0.1:5672/%2F"
    password = pika.URLParameters(url).credentials.password
    redacted = redact_url(url)
    assert password == "Zq:9/x@y"
    assert "Zq" not in redacted
    # Still a usable description of where the broker is.
    assert pika.URLParameters(redacted).port == 5672
    assert pika.URLParameters(redacted).credentials.username == "coordinator"
