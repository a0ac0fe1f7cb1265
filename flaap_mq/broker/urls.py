"""Broker URL text: lists of several nodes, and redaction for logs.

A broker URL may name several nodes of one cluster, separated by commas
(`amqp://u:p@node1:5672/,amqp://u:p@node2:5672/`); the link tries them in
turn (`split_broker_urls`). The password never appears in what `redact_url`
returns, and only redacted URLs are ever logged.

Redaction is conservative: a URL that does not parse (a password holding an
unencoded `#`, `/`, `?`, `,` or `@`) is redacted from the first `scheme://` to
its last `@`, and no error message repeats a parser's words about a URL that
holds a password (parsers quote the piece they choke on, which may be part of
the password): `invalid_url_error` and `check_unambiguous` say what is wrong
with a URL without quoting it.

This module works on text only (no pika, no files): the rest of the broker
package builds on it. Where a URL comes from is `credentials`; its TLS
options, `tls`; the connection parameters made of it, `address`.
"""

from __future__ import annotations

import re
import urllib.parse

# A URL starts with `scheme://`; RFC 3986's scheme characters.
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
STARTS_WITH_SCHEME = re.compile(_SCHEME)
# Only a comma before a new `scheme://` certainly separates two URLs of a list.
_URL_SEPARATOR = re.compile(r"\s*,[\s,]*(?=" + _SCHEME + ")")
_ENCODING_HINT = (
    "percent-encode / ? # [ ] @ , % in a user name, password, vhost or file path "
    "(# as %23, / as %2F, ? as %3F, @ as %40, , as %2C, % as %25)"
)


def split_broker_urls(urls: str) -> list[str]:
    """The URLs of a comma-separated list, each stripped, empty ones left out.

    A comma followed by a new `scheme://` separates two URLs, and so does a
    comma after the last `@` before the next `scheme://`; a comma before that
    `@` is inside the user info (a password holding a comma), as `redact_url`
    reads it: the user info runs to the last `@`.
    """
    out: list[str] = []
    for chunk in _URL_SEPARATOR.split(urls):
        pieces = chunk.split(",")
        last_at = max((i for i, piece in enumerate(pieces) if "@" in piece), default=0)
        merged = [",".join(pieces[: last_at + 1]), *pieces[last_at + 1 :]]
        out.extend(m.strip() for m in merged if m.strip())
    return out


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (one URL, or a comma-separated list).

    Never fails and never shows a password, even of a URL that does not
    parse: the user info runs from `scheme://` to the last `@` of each URL,
    whatever characters the password holds, and only the user name before
    its first `:` is kept. A URL without `@` whose "port" is not a number
    (`amqp://user:pa`, a list cut inside a password) loses everything after
    its host. The price is over-redaction of an `@` later in a URL (a
    `cacertfile` path holding one), never a leak.
    """
    out: list[str] = []
    pending: list[str] = []  # URLs without "@", until one with "@" follows
    for part in _URL_SEPARATOR.split(url):
        if "@" in part:
            if pending:
                # `amqp://u:12,amqp://x@host/`: a list, or one URL whose password
                # holds ",amqp://"? Assume the password: hide all up to the "@".
                out.append(_redact_one(",".join([*pending, part]), keep_user=False))
                pending = []
            else:
                out.append(_redact_one(part))
        else:
            pending.append(part)
    out.extend(_redact_one(part) for part in pending)
    return ",".join(out)


def _redact_one(url: str, *, keep_user: bool = True) -> str:
    scheme = STARTS_WITH_SCHEME.match(url.lstrip())
    start = len(url) - len(url.lstrip()) + scheme.end() if scheme else 0
    rest = url[start:]
    at = rest.rfind("@")
    if at >= 0:
        if not keep_user:
            return f"{url[:start]}***{rest[at:]}"
        username, colon, _ = rest[:at].partition(":")
        if not colon:
            return url  # a user name and no password
        return f"{url[:start]}{username}:***{rest[at:]}"
    if not scheme:
        return url
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if authority.startswith("[") and "]" in authority:
        host, _, tail = authority.partition("]")
        host += "]"
    else:
        host, colon, tail = authority.partition(":")
        tail = colon + tail
    if re.fullmatch(r"(:\d*)?", tail):
        return url  # host[:port]: nothing secret
    return f"{url[:start]}{host}:***"


def invalid_url_error(url: str, reason: BaseException | str) -> ValueError:
    """The error for a URL that does not parse: the URL redacted, and why, minus its password.

    A parser's message quotes the piece it could not read, which may be part
    of a password (`Port could not be cast to integer value as 'p'` for
    `amqp://user:p#ss@host/`): for a URL that holds a password only the kind
    of error is kept, with how to encode the password.
    """
    text = str(reason)
    redacted = redact_url(url)
    if redacted == url:
        return ValueError(f"not a valid AMQP URL: {url}: {text}")
    if text.startswith("Port could not be cast"):
        kind = "its port is not a number"
    elif text.startswith("Port out of range"):
        kind = "its port is out of range 0-65535"
    elif text.startswith("Invalid IPv6 URL"):
        kind = "an unbalanced [ or ] in its host"
    elif text.startswith("Unknown URL parameter"):
        kind = "an unknown query option"
    else:
        kind = re.split(r"['\"`:]", text, maxsplit=1)[0].strip() or "it does not parse"
    return ValueError(f"not a valid AMQP URL: {redacted}: {kind}; {_ENCODING_HINT}")


def check_unambiguous(url: str) -> None:
    """Refuses a URL whose password a parser would cut short (it then connects elsewhere).

    `amqp://user:1/x@host/` parses as host `user`, port 1 and vhost `x@host/`:
    the password holds an unencoded `/`. AMQP URLs have no `#fragment`.
    """
    try:
        netloc = urllib.parse.urlsplit(url).netloc
    except ValueError as e:
        raise invalid_url_error(url, e) from None
    slashes = url.find("//")
    after_host = url[slashes + 2 + len(netloc) :] if slashes >= 0 else url
    if "#" in url or ("@" not in netloc and "@" in after_host):
        raise ValueError(
            f"not a valid AMQP URL: {redact_url(url)}: it has a # or an @ after the host "
            f"(what a password holding an unencoded / ? or # looks like); {_ENCODING_HINT}"
        )
