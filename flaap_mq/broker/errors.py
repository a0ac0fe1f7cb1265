"""The errors a `BrokerLink` reports (re-exported by `flaap_mq.broker.link`)."""

from __future__ import annotations


class BrokerError(Exception):
    """Base of the errors the link reports."""


class BrokerUnavailable(BrokerError, ConnectionError):
    """No broker could be reached for longer than the link waits."""


class BrokerRefused(BrokerError):
    """The broker refused us for a reason retrying will not change."""


class Unroutable(BrokerError):
    """The broker had no queue to route a mandatory message to."""


class MessageTooLarge(BrokerError, ValueError):
    """A message over the broker's size limit; it was not sent."""


class LinkClosed(BrokerError):
    """The link was closed while the operation was pending."""


def describe(error: BaseException) -> str:
    """`Type: text` of an error, for a log line or a message."""
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text


__all__ = [
    "BrokerError",
    "BrokerRefused",
    "BrokerUnavailable",
    "LinkClosed",
    "MessageTooLarge",
    "Unroutable",
    "describe",
]
