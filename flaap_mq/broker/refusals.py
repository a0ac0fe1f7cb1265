"""What a broker's close of a channel or connection means, and what to do about it.

RabbitMQ says why it closed a channel (or, for a few errors, the whole
connection) with an AMQP reply code and a text. Those are all a client gets
to tell apart causes that need opposite handling: a queue whose cluster node
is down comes back by itself (wait and retry), a permission the user lacks
never does (stop and say which), a message over the broker's size limit must
not be sent again. `classify` turns a close into one `Refusal`, a pure
function of the code and the text, so that the link's handling reads as one
`match` and each cause is unit-tested on the broker's exact words.

A broker that does not answer at all (connection refused, unknown host,
timeout) and a refused login, vhost or TLS handshake are connection
failures, told apart by `flaap_mq.broker.connect` (`describe_unreachable`,
`explain_connect_failure`): they never reach a channel.
"""

from __future__ import annotations

import dataclasses
import enum
import re

import pika.exceptions

# Texts of RabbitMQ 3.10-3.13 for each cause (see tests/unit/test_refusals.py).
# 404 for a durable classic queue whose node is down, or still stopping.
_HOME_NODE_DOWN = re.compile(
    r"home node '([^']+)' of durable queue '([^']+)'.*is down or inaccessible"
    r"|process is stopped by supervisor"
)
# A quorum queue (or Raft-replicated metadata) with no majority of its nodes
# up, as a 541 INTERNAL_ERROR: `cluster_not_formed` on declaring a new one,
# "timed out"/"timeout" on operations (the metadata store's, too).
_NO_QUORUM = re.compile(r"cluster_not_formed|no_quorum|timed? ?out")
# 406 when a message is over `max_message_size`.
_TOO_LARGE = re.compile(r"larger than configured max size (\d+)")
# 406 when a queue or exchange exists with other arguments or type.
_INEQUIVALENT = re.compile(r"inequivalent arg")
_QUEUE_NAME = re.compile(r"queue '([^']+)'")


class Cause(enum.Enum):
    """Why the broker closed a channel or connection."""

    QUEUE_HOME_DOWN = "queue_home_down"  # a classic queue's node is down: back with it
    NO_QUORUM = "no_quorum"  # a quorum queue lost its majority: back with a node
    PERMISSION = "permission"  # 403: this user may not do that; never changes by itself
    NOT_FOUND = "not_found"  # 404: no such queue or exchange
    MISMATCH = "mismatch"  # 406: exists with other settings (type, arguments)
    TOO_LARGE = "too_large"  # 406: a message over the broker's max_message_size
    OTHER = "other"  # anything else: a new channel may do


@dataclasses.dataclass(frozen=True)
class Refusal:
    """One close by the broker, classified."""

    cause: Cause
    code: int
    text: str
    limit_bytes: int | None = None  # the broker's max_message_size, for TOO_LARGE

    @property
    def is_outage(self) -> bool:
        """True when the cluster will answer differently once its nodes are back."""
        return self.cause in (Cause.QUEUE_HOME_DOWN, Cause.NO_QUORUM)

    @property
    def queue(self) -> str | None:
        """The queue the broker's text names, if it names one."""
        match = _HOME_NODE_DOWN.search(self.text)
        if match and match.group(2):
            return match.group(2)
        match = _QUEUE_NAME.search(self.text)
        return match.group(1) if match else None

    def explain(self) -> str:
        """One line for an operator: what the broker said it cannot do, and why."""
        queue = f"queue {self.queue!r}" if self.queue else "a queue"
        match self.cause:
            case Cause.QUEUE_HOME_DOWN:
                match = _HOME_NODE_DOWN.search(self.text)
                node = match.group(1) if match and match.group(1) else "its node"
                return (
                    f"the broker answers, but {queue} is unavailable: its home node {node} is "
                    f"down ({self.code} {self.text}); it comes back with that node"
                )
            case Cause.NO_QUORUM:
                return (
                    f"the broker answers, but {queue} has no quorum: a majority of the cluster's "
                    f"nodes is down ({self.code} {self.text}); it resumes when enough nodes "
                    "are back (see docs/deploy.md, 'A broker cluster')"
                )
            case _:
                return f"{self.code} {self.text}"


def classify(code: int | None, text: str | None) -> Refusal:
    """The `Refusal` for a broker close with this reply code and text."""
    code = code or 0
    text = text or ""
    if code == 404 and _HOME_NODE_DOWN.search(text):
        return Refusal(Cause.QUEUE_HOME_DOWN, code, text)
    if code == 541 and _NO_QUORUM.search(text):
        return Refusal(Cause.NO_QUORUM, code, text)
    if code == 403:
        return Refusal(Cause.PERMISSION, code, text)
    if code == 404:
        return Refusal(Cause.NOT_FOUND, code, text)
    if code == 406:
        size = _TOO_LARGE.search(text)
        if size:
            return Refusal(Cause.TOO_LARGE, code, text, limit_bytes=int(size.group(1)))
        if _INEQUIVALENT.search(text):
            return Refusal(Cause.MISMATCH, code, text)
    return Refusal(Cause.OTHER, code, text)


def from_close(reason: BaseException) -> Refusal | None:
    """The `Refusal` for a pika close reason, or None when the broker did not close it.

    A close by the client itself, or a lost socket, is not a refusal.
    """
    if isinstance(
        reason, pika.exceptions.ChannelClosedByBroker | pika.exceptions.ConnectionClosedByBroker
    ):
        return classify(reason.reply_code, reason.reply_text)
    return None


__all__ = ["Cause", "Refusal", "classify", "from_close"]
