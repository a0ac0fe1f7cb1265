"""redact_url hides the password, and only the password, of an AMQP URL, parsed or not.

The hypothesis test runs without its pytest plugin (disabled in pyproject.toml).
"""

from __future__ import annotations

import ssl
import urllib.parse
from unittest import mock

import pika
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.tls import with_tls_options
from flaap_mq.broker.urls import redact_url


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


# --- URLs that do not parse, and lists: the password never shows -------------

# Only passwords hold these letters (no message or host name does), so finding
# a whole password in an output is a leak, not a coincidence.
_MARKERS = "ΩЖß"
_PASSWORD_CHARS = _MARKERS + "09az#/?,@%:[]&=;!$'()*+ ~"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://user:p#ssQ@localhost:1/", "amqp://user:***@localhost:1/"),
        ("amqp://user:p/ssQ@localhost:1/", "amqp://user:***@localhost:1/"),
        ("amqp://user:p?ssQ@localhost:1/", "amqp://user:***@localhost:1/"),
        ("amqp://user:p,ssQ@localhost:1/", "amqp://user:***@localhost:1/"),
        ("amqp://user:p%ssQ@localhost:1/", "amqp://user:***@localhost:1/"),
        ("amqp://user:pssQ@[::1/", "amqp://user:***@[::1/"),
        # Cut by a comma inside the password: the "port" is not a number.
        ("amqp://user:pQ", "amqp://user:***"),
        # A list, or one URL whose password holds ",amqp://"? Assumed the password.
        ("amqp://user:12,amqp://Q@host/", "amqp://***@host/"),
        (
            "amqp://a:pQ1@h1:5672/,amqp://a:p,Q2@h2:5672/",
            "amqp://a:***@h1:5672/,amqp://a:***@h2:5672/",
        ),
        ("user:pQ@host", "user:***@host"),  # no scheme at all
    ],
)
def test_password_of_a_url_that_does_not_parse_is_replaced(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["amqp://h1:5672/,amqp://h2:5672/", "amqp://[::1]:5672/", "amqp://[::1]/", "amqp://host:"],
)
def test_lists_and_hosts_without_password_are_unchanged(url: str) -> None:
    assert redact_url(url) == url


@st.composite
def _url_with_passwords(draw: st.DrawFn) -> tuple[str, list[str]]:
    """One URL or a comma-separated list, each with a password, raw or percent-encoded."""
    name = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
    urls, secrets = [], []
    for _ in range(draw(st.integers(1, 3))):
        password = draw(st.text(_PASSWORD_CHARS, max_size=12)) + draw(st.sampled_from(_MARKERS))
        password += draw(st.text(_PASSWORD_CHARS, max_size=12))
        encoded = draw(st.booleans())
        written = urllib.parse.quote(password, safe="") if encoded else password
        scheme = draw(st.sampled_from(["amqp", "amqps", "AMQP", "http"]))
        user = draw(st.one_of(st.just(""), name))
        host = draw(st.sampled_from(["localhost", "127.0.0.1", "[::1]", "broker.example.org"]))
        port = draw(st.sampled_from(["", ":5672", ":1", ":99999"]))
        path = draw(st.sampled_from(["", "/", "/federation", "/%2F"]))
        query = draw(st.sampled_from(["", "?heartbeat=30", "?cacertfile=/etc/flaap-mq/ca.pem"]))
        urls.append(f"{scheme}://{user}:{written}@{host}{port}{path}{query}")
        secrets += [password, written]
    separator = draw(st.sampled_from([",", ", ", " ,"]))
    return separator.join(urls), secrets


def _assert_hidden(output: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in output, f"password {secret!r} shown in {output!r}"


def _trust_nothing(context: ssl.SSLContext, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH) -> None:
    """In place of `SSLContext.load_default_certs`: the system's CAs left unread."""


@settings(max_examples=800, deadline=None, database=None)
@given(_url_with_passwords())
@example(("amqp://u:1,amqp://Q@h/", ["1,amqp://Q"]))
@example(("amqp://u:p#Q@localhost:1/", ["p#Q"]))
@example(("amqp://u:1/Q@localhost/", ["1/Q"]))
@example(("amqp://u:Q@x,amqps://u:Z@y/", ["Q@x", "Z"]))
# Empty pieces between commas inside a password (found by this test, 2026-11-30).
@example(("amqp://:Ω@localhost,amqp://:@,,Ω@localhost", ["Ω", "Ω", "@,,Ω", "@,,Ω"]))
def test_no_output_shows_a_password(case: tuple[str, list[str]]) -> None:
    """redact_url, and every error parsing or TLS options give, never hold a password."""
    text, secrets = case
    _assert_hidden(redact_url(text), secrets)
    # pika builds a TLS context for each amqps:// URL it parses, and reading the
    # system's CA bundle into it took 30 ms an example here: nearly all of this
    # test's 30 s. What is trusted has no bearing on what any output shows.
    with mock.patch.object(ssl.SSLContext, "load_default_certs", _trust_nothing):
        try:
            addresses = parse_broker_urls(text)
        except ValueError as e:
            _assert_hidden(str(e), secrets)
        else:
            for address in addresses:
                _assert_hidden(address.redacted, secrets)
            _assert_hidden(", ".join(a.redacted for a in addresses), secrets)
        try:
            with_tls_options(text, ca_file="/nonexistent/ca.pem")
        except ValueError as e:
            _assert_hidden(str(e), secrets)


@pytest.mark.parametrize(
    "url", ["amqp://user:1/xQ@host:5672/", "amqp://user:1?xQ@host/", "amqp://user:1#xQ@host/"]
)
def test_a_password_a_parser_would_cut_short_is_refused(url: str) -> None:
    """Not silently host `user`, port 1 (a piece of the password) and vhost `xQ@host`."""
    with pytest.raises(ValueError, match="percent-encode") as refused:
        parse_broker_urls(url)
    assert "1/xQ" not in str(refused.value) and "xQ" not in str(refused.value)
    assert "amqp://user:***@host" in str(refused.value)


def test_a_comma_inside_a_password_keeps_one_url() -> None:
    [address] = parse_broker_urls("amqp://user:p,ss@host:5672/")
    assert address.parameters().credentials.password == "p,ss"
    assert address.redacted == "amqp://user:***@host:5672/"
