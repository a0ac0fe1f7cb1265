"""Connecting to a broker, and one line that says why a connection failed.

`explain_connect_failure` tells a refusal that retrying cannot fix (login,
vhost, TLS) from a broker that may yet answer; `describe_unreachable` says why
no connection opened (unknown host, refused port, no answer). The library's
`BrokerLink` retries with them; commands connect once, through
`open_connection` (or `check_login`), and fail at once with the same words.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Sequence

import pika
import pika.exceptions
from pika.adapters.utils import connection_workflow

from flaap_mq.broker.address import BrokerAddress


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what pika wrapped in it (connection workflow, phases, args)."""
    seen: list[BaseException] = []
    stack = [error]
    while stack:
        e = stack.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        inner = [
            *getattr(e, "exceptions", ()),
            getattr(e, "exception", None),
            e.__cause__,
            *(a for a in getattr(e, "args", ()) if isinstance(a, BaseException)),
        ]
        stack.extend(x for x in inner if isinstance(x, BaseException))
    return seen


def root_cause(error: BaseException) -> BaseException:
    """The innermost error pika wrapped, for a log line that says something."""
    return _causes(error)[-1]


# TLS failures that a retry cannot fix (a transient EOF during a broker
# restart is not among them).
_FATAL_TLS_REASONS = ("CERTIFICATE", "UNKNOWN_CA", "WRONG_VERSION_NUMBER", "HANDSHAKE_FAILURE")


def explain_connect_failure(address: BrokerAddress, error: BaseException) -> str | None:
    """One line naming what is wrong, when retrying cannot help; None when it may.

    Covers a wrong user or password, an unknown vhost or one the user may not
    use, a broker certificate this client does not trust, and a TLS handshake
    the broker refused (e.g. it requires a client certificate).
    """
    try:
        params = address.url_parameters()
        user, vhost = params.credentials.username, params.virtual_host
        where = f"{params.host}:{params.port}"
    except ValueError:
        user, vhost, where = "?", "?", address.redacted
    causes = _causes(error)
    for e in causes:
        if isinstance(e, ssl.SSLCertVerificationError):
            ca = address.ca_file or "the system's CAs"
            return (
                f"TLS: the broker at {where} presented a certificate this client does not "
                f"trust ({e.verify_message}); trusted: {ca} (--ca-file or ?cacertfile=)"
            )
        if isinstance(e, ssl.SSLError):
            reason = str(e.reason or e)
            if not any(r in reason.upper() for r in _FATAL_TLS_REASONS):
                return None
            hint = ""
            if "WRONG_VERSION_NUMBER" in reason.upper():
                hint = " (is that port a TLS listener? RabbitMQ's is 5671)"
            elif "CERTIFICATE" in reason.upper() or "UNKNOWN_CA" in reason.upper():
                hint = (
                    " (the broker wants a client certificate it trusts: "
                    "--cert-file/--key-file or ?certfile=&keyfile=)"
                )
            return f"TLS handshake with the broker at {where} failed: {reason}{hint}"
    for e in causes:
        if isinstance(
            e, pika.exceptions.ProbableAuthenticationError | pika.exceptions.AuthenticationError
        ):
            return (
                f"the broker at {where} refused the login of user {user!r}: wrong user name "
                "or password"
            )
    for e in causes:
        if isinstance(e, pika.exceptions.ProbableAccessDeniedError):
            # pika keeps only the text of the broker's close: "...: (530) 'NOT_ALLOWED - ...'".
            found = re.search(r"\(\d+\) ['\"](.*)['\"]", str(e))
            text = found.group(1) if found else str(e)
            if "not found" in text:
                return f"the broker at {where} has no vhost {vhost!r} ({text})"
            return f"the broker at {where} refused user {user!r} on vhost {vhost!r} ({text})"
    return None


def describe_unreachable(
    address: BrokerAddress, error: BaseException, *, timeout_s: float | None = None
) -> str:
    """One line saying why no connection to `address` opened, naming its host and port.

    The same words on every command and in the library's `BrokerUnavailable`,
    so that an operator recognises the failure whichever command met it: an
    unknown host name, a port where nothing listens, a host that does not
    answer in time, or the error the system gave.
    """
    try:
        params = address.url_parameters()
        host, where = params.host, f"{params.host}:{params.port}"
    except ValueError:
        host, where = "?", address.redacted
    prefix = f"cannot connect to the broker at {where}"
    for e in _causes(error):
        if isinstance(e, socket.gaierror):
            return (
                f"{prefix}: unknown host {host!r} ({e.strerror or e}); check the host name "
                "in the broker URL"
            )
        if isinstance(e, ConnectionRefusedError):
            return (
                f"{prefix}: connection refused (nothing listens on that port: is RabbitMQ "
                "running there, and is that its AMQP port, 5672, or 5671 for amqps?)"
            )
        if isinstance(e, TimeoutError | connection_workflow.AMQPConnectorStackTimeout):
            return (
                f"{prefix}: no answer within {timeout_s or address.socket_timeout_s:g} s "
                "(is the host up, "
                "and does a firewall let the port through?)"
            )
    cause = root_cause(error)
    if isinstance(cause, OSError) and cause.strerror:
        return f"{prefix}: {cause.strerror}"
    text = str(cause) or type(cause).__name__
    return f"{prefix}: {text}"


def connect_failure_message(address: BrokerAddress, error: BaseException) -> str:
    """What to tell an operator when a connection to `address` failed: refused, or unreachable."""
    return explain_connect_failure(address, error) or describe_unreachable(address, error)


def open_connection(
    addresses: Sequence[BrokerAddress], timeout_s: float = 10.0
) -> pika.BlockingConnection:
    """A blocking connection to the first node that answers, or a `ValueError` saying why none did.

    For commands, which fail at once (one line, from `connect_failure_message`)
    rather than retry: a refusal (login, vhost, TLS) stops at its node; an
    unreachable node moves on to the next; when none answers, the error names
    every node tried. The library's `BrokerLink` retries instead, for a bounded
    time.
    """
    connection, failures = _first_connection(addresses, timeout_s)
    if connection is not None:
        return connection
    if not failures:
        raise ValueError("no broker URL given")
    raise ValueError("; ".join(failures))


def check_login(addresses: Sequence[BrokerAddress], timeout_s: float = 10.0) -> None:
    """Opens and closes one connection, to fail fast on what retrying cannot fix.

    Raises `ValueError` with `explain_connect_failure`'s line when a broker
    refuses (login, vhost, TLS); returns quietly once one connection opened,
    or when no broker answers at all (the caller's reconnect loop then waits
    for one and reports it).
    """
    connection, _ = _first_connection(addresses, timeout_s)
    if connection is not None:
        connection.close()


def _first_connection(
    addresses: Sequence[BrokerAddress], timeout_s: float
) -> tuple[pika.BlockingConnection | None, list[str]]:
    """The first node's connection that opens (None if none did), and why each one before failed.

    A refusal (login, vhost, TLS: `explain_connect_failure`) is a `ValueError`
    at once; an unreachable node is noted and the next one tried.
    """
    failures: list[str] = []
    for address in addresses:
        params = address.parameters()
        params.socket_timeout = params.stack_timeout = timeout_s
        try:
            return pika.BlockingConnection(params), failures
        except (pika.exceptions.AMQPError, OSError) as e:
            refusal = explain_connect_failure(address, e)
            if refusal is not None:
                raise ValueError(refusal) from None
            failures.append(describe_unreachable(address, e, timeout_s=timeout_s))
    return None, failures
