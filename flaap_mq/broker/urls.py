"""Broker URLs: parsing, TLS, several nodes for fail-over, and redaction for logs.

A broker URL may name several nodes of one cluster, separated by commas
(`amqp://u:p@node1:5672/,amqp://u:p@node2:5672/`); the link tries them in
turn. The password never appears in what `redacted` returns, and only
`redacted` is ever logged.

TLS: an `amqps://` URL always verifies the broker's certificate and host
name, against the system's CAs or the CA file given. The TLS files go in the
URL's query, with the names RabbitMQ's own URI spec uses, or come from the
command line (`--ca-file`, `--cert-file`, `--key-file`, see
`with_tls_options`):

    amqps://silo-a:PASSWORD@broker.example.org:5671/flaap?cacertfile=/etc/flaap-mq/ca.pem
    ...&certfile=/etc/flaap-mq/client.pem&keyfile=/etc/flaap-mq/client.key  (client certificate)
    ...&server_name_indication=broker.example.org  (the name to check, if not the host's)

A missing or unreadable file is a `ValueError` naming it, raised when the
URL is parsed, before any connection is tried.

Where the URL comes from (`resolve_broker_url`), first found wins:
`--broker-url`, `--broker-url-file PATH`, `$FLAAP_MQ_BROKER_URL_FILE`,
`$FLAAP_MQ_BROKER_URL`, then the local default. A file keeps the password out
of `argv` (which `ps` shows to every local user) and out of the environment;
under systemd, `LoadCredential=` provides one.

Redaction is conservative: a URL that does not parse (a password holding an
unencoded `#`, `/`, `?`, `,` or `@`) is redacted from the first `scheme://` to
its last `@`, and no error message repeats a parser's words about a URL that
holds a password (parsers quote the piece they choke on, which may be part of
the password).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
import ssl
import stat
import urllib.parse
from collections.abc import Mapping, Sequence

import pika
import pika.exceptions
from pika.adapters.utils import connection_workflow

from flaap_mq.logs import get_logger

log = get_logger("flaap_mq.broker")

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
BROKER_URL_ENV = "FLAAP_MQ_BROKER_URL"
BROKER_URL_FILE_ENV = "FLAAP_MQ_BROKER_URL_FILE"
# A URL file holds a few URLs; anything bigger is the wrong file.
MAX_BROKER_URL_FILE_BYTES = 64 * 1024
CA_FILE_ENV = "FLAAP_MQ_CA_FILE"
CERT_FILE_ENV = "FLAAP_MQ_CERT_FILE"
KEY_FILE_ENV = "FLAAP_MQ_KEY_FILE"

# Query options of ours (RabbitMQ URI spec names); pika never sees them.
CA_FILE_OPTION = "cacertfile"
CERT_FILE_OPTION = "certfile"
KEY_FILE_OPTION = "keyfile"
SNI_OPTION = "server_name_indication"
TLS_OPTIONS = (CA_FILE_OPTION, CERT_FILE_OPTION, KEY_FILE_OPTION, SNI_OPTION)
# What each option is called on the command line, for error messages.
_OPTION_FLAGS = {
    CA_FILE_OPTION: "--ca-file",
    CERT_FILE_OPTION: "--cert-file",
    KEY_FILE_OPTION: "--key-file",
}


# A URL starts with `scheme://`; RFC 3986's scheme characters.
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_STARTS_WITH_SCHEME = re.compile(_SCHEME)
# Only a comma before a new `scheme://` certainly separates two URLs of a list.
_URL_SEPARATOR = re.compile(r"\s*,[\s,]*(?=" + _SCHEME + ")")
_ENCODING_HINT = (
    "percent-encode / ? # [ ] @ , % in a user name, password, vhost or file path "
    "(# as %23, / as %2F, ? as %3F, @ as %40, , as %2C, % as %25)"
)


def split_broker_urls(urls: str) -> list[str]:
    """The URLs of a comma-separated list, each stripped, empty ones left out.

    A comma followed by a new `scheme://` separates two URLs, and so does a
    comma whose next piece has no `@`; a comma inside a password (the piece
    after it holds the `@` that ends the password) keeps both pieces in one URL.
    """
    out: list[str] = []
    for chunk in _URL_SEPARATOR.split(urls):
        pieces = chunk.split(",")
        merged = [pieces[0]]
        for piece in pieces[1:]:
            if "@" in piece:
                merged[-1] += "," + piece  # the comma was inside the user info
            else:
                merged.append(piece)
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
    scheme = _STARTS_WITH_SCHEME.match(url.lstrip())
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


def _url_error(url: str, reason: BaseException | str) -> ValueError:
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


def _check_unambiguous(url: str) -> None:
    """Refuses a URL whose password a parser would cut short (it then connects elsewhere).

    `amqp://user:1/x@host/` parses as host `user`, port 1 and vhost `x@host/`:
    the password holds an unencoded `/`. AMQP URLs have no `#fragment`.
    """
    try:
        netloc = urllib.parse.urlsplit(url).netloc
    except ValueError as e:
        raise _url_error(url, e) from None
    slashes = url.find("//")
    after_host = url[slashes + 2 + len(netloc) :] if slashes >= 0 else url
    if "#" in url or ("@" not in netloc and "@" in after_host):
        raise ValueError(
            f"not a valid AMQP URL: {redact_url(url)}: it has a # or an @ after the host "
            f"(what a password holding an unencoded / ? or # looks like); {_ENCODING_HINT}"
        )


def with_tls_options(
    urls: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> str:
    """`urls` (comma-separated) with the given TLS files set in each URL's query.

    A file given here replaces the same option in a URL. Paths are made
    absolute, so a worker that changes its directory still finds them.
    """
    given = {
        CA_FILE_OPTION: ca_file,
        CERT_FILE_OPTION: cert_file,
        KEY_FILE_OPTION: key_file,
    }
    given = {k: os.path.abspath(v) for k, v in given.items() if v}
    if not given:
        return urls
    out = []
    for url in split_broker_urls(urls):
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as e:
            raise _url_error(url, e) from None
        query = [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k not in given
        ]
        query.extend(given.items())
        out.append(
            urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe="/")))
        )
    return ",".join(out)


def _readable_file(option: str, path: str) -> str:
    what = {
        CA_FILE_OPTION: "CA file",
        CERT_FILE_OPTION: "client certificate file",
        KEY_FILE_OPTION: "client key file",
    }[option]
    where = f"({_OPTION_FLAGS[option]} or ?{option}=)"
    if not os.path.exists(path):
        raise ValueError(f"{what} {path} does not exist {where}")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} is not a file {where}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} {path} is not readable by this user {where}")
    return path


@dataclasses.dataclass(frozen=True)
class BrokerAddress:
    """One broker node to connect to, with the client options we always set."""

    url: str
    connection_name: str = "flaap-mq"
    socket_timeout_s: float = 10.0
    heartbeat_s: int = 30

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    @functools.cached_property
    def _split(self) -> tuple[str, dict[str, str]]:
        """The URL for pika (our TLS options taken out) and those options."""
        _check_unambiguous(self.url)
        parts = urllib.parse.urlsplit(self.url)
        ours: dict[str, str] = {}
        rest = []
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key in TLS_OPTIONS:
                if key in ours:
                    raise ValueError(f"{key} given twice in {self.redacted}")
                ours[key] = value
            else:
                rest.append((key, value))
        pika_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
        return pika_url, ours

    @property
    def tls(self) -> bool:
        return self.url.lower().startswith("amqps://")

    @property
    def key_file(self) -> str | None:
        """The TLS client key this address logs in with, if any (a secret)."""
        return self._split[1].get(KEY_FILE_OPTION)

    @property
    def ca_file(self) -> str | None:
        """The CA file this URL trusts (`?cacertfile=`, or `--ca-file` put there)."""
        return self._split[1].get(CA_FILE_OPTION)

    @functools.cached_property
    def username(self) -> str:
        """The login, as pika sends it (the broker checks replies' user_id against it)."""
        return self._pika_parameters().credentials.username

    def _pika_parameters(self) -> pika.URLParameters:
        pika_url, _ = self._split
        try:
            return pika.URLParameters(pika_url)
        except Exception as e:
            raise _url_error(self.url, e) from None

    def parameters(self) -> pika.URLParameters:
        """Fresh pika parameters (and TLS context: certificates are read again)."""
        _, tls_options = self._split
        params = self._pika_parameters()
        if self.tls:
            params.ssl_options = self.ssl_options(params.host)
        elif any(k in tls_options for k in (CA_FILE_OPTION, CERT_FILE_OPTION, KEY_FILE_OPTION)):
            raise ValueError(
                f"TLS files given for a plain amqp:// URL ({self.redacted}); "
                "use amqps:// and the broker's TLS port (5671)"
            )
        params.connection_attempts = 1
        params.socket_timeout = self.socket_timeout_s
        params.stack_timeout = self.socket_timeout_s * 2
        params.blocked_connection_timeout = 120
        params.heartbeat = self.heartbeat_s
        params.client_properties = {"connection_name": self.connection_name}
        return params

    def ssl_options(self, host: str) -> pika.SSLOptions:
        """TLS that verifies the broker: its certificate chain and its host name."""
        _, options = self._split
        ca_file = options.get(CA_FILE_OPTION)
        cert_file = options.get(CERT_FILE_OPTION)
        key_file = options.get(KEY_FILE_OPTION)
        if ca_file:
            _readable_file(CA_FILE_OPTION, ca_file)
            try:
                # Only this CA: a broker of the federation is trusted for being
                # signed by the federation's CA, not by any public one.
                context = _context_trusting(ca_file)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(
                    f"CA file {ca_file} holds no usable PEM certificate ({e})"
                ) from None
        else:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system's CAs
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        if key_file and not cert_file:
            raise ValueError(
                f"a client key file ({key_file}) without a client certificate file; "
                "give --cert-file (or ?certfile=) too"
            )
        if cert_file:
            _readable_file(CERT_FILE_OPTION, cert_file)
            if key_file:
                _readable_file(KEY_FILE_OPTION, key_file)
            try:
                context.load_cert_chain(cert_file, key_file)
            except ssl.SSLError as e:
                raise ValueError(
                    f"client certificate {cert_file} and key {key_file or '(in the same file)'} "
                    f"cannot be used together: {e.reason or e}"
                ) from None
        return pika.SSLOptions(context, server_hostname=options.get(SNI_OPTION) or host)


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
        params = address._pika_parameters()
        user, vhost = params.credentials.username, params.virtual_host
        where = f"{params.host}:{params.port}"
    except ValueError:
        user, vhost, where = "?", "?", address.redacted
    causes = _causes(error)
    for e in causes:
        if isinstance(e, ssl.SSLCertVerificationError):
            ca = address._split[1].get(CA_FILE_OPTION) or "the system's CAs"
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
        params = address._pika_parameters()
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
    failures: list[str] = []
    for address in addresses:
        params = address.parameters()
        params.socket_timeout = params.stack_timeout = timeout_s
        try:
            return pika.BlockingConnection(params)
        except (pika.exceptions.AMQPError, OSError) as e:
            refusal = explain_connect_failure(address, e)
            if refusal is not None:
                raise ValueError(refusal) from None
            failures.append(describe_unreachable(address, e, timeout_s=timeout_s))
    if not failures:
        raise ValueError("no broker URL given")
    raise ValueError("; ".join(failures))


def check_login(addresses: list[BrokerAddress], timeout_s: float = 10.0) -> None:
    """Opens and closes one connection, to fail fast on what retrying cannot fix.

    Raises `ValueError` with `explain_connect_failure`'s line when a broker
    refuses (login, vhost, TLS); returns quietly once one connection opened,
    or when no broker answers at all (the caller's reconnect loop then waits
    for one and reports it).
    """
    for address in addresses:
        params = address.parameters()
        params.socket_timeout = params.stack_timeout = timeout_s
        try:
            pika.BlockingConnection(params).close()
            return
        except (pika.exceptions.AMQPError, OSError) as e:
            refusal = explain_connect_failure(address, e)
            if refusal is not None:
                raise ValueError(refusal) from None


def _context_trusting(ca_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=ca_file)
    if not context.get_ca_certs():
        raise ValueError("no CA certificate in it")
    return context


@dataclasses.dataclass(frozen=True)
class BrokerUrlSource:
    """A broker URL and where it came from (`resolve_broker_url`)."""

    url: str
    # The file it was read from, absolute (so that the worker can hide it from
    # the processes it starts); None when it came from no file.
    file: str | None
    # "--broker-url", "--broker-url-file", "$FLAAP_MQ_BROKER_URL_FILE",
    # "$FLAAP_MQ_BROKER_URL" or "default": for messages.
    origin: str


def read_broker_url_file(path: str, *, origin: str = "--broker-url-file") -> str:
    """The broker URL held in the file `path`: one URL, or several (comma- or line-separated).

    Whitespace around each line is trimmed; lines are joined with commas. A
    file that is missing, unreadable, not a file, empty, not UTF-8 or larger
    than 64 KiB is a `ValueError` that names the file and `origin` (the flag
    or variable that named it) and never quotes what the file holds. A file
    that other users may read, or that its group may write, is logged as a
    warning (`broker_url_file_not_private`): the password is as safe as the
    file's mode (0600 or 0400; 0640 with a group only the worker's user is in).
    """
    where = f"broker URL file {path} ({origin})"
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ValueError(f"{where} is not a regular file")
            data = f.read(MAX_BROKER_URL_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{where} is a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"{where} is not readable by this user (uid {os.getuid()})") from None
    except OSError as e:
        raise ValueError(f"{where} cannot be read: {e.strerror or type(e).__name__}") from None
    if len(data) > MAX_BROKER_URL_FILE_BYTES:
        raise ValueError(
            f"{where} is larger than {MAX_BROKER_URL_FILE_BYTES // 1024} KiB; "
            "it should hold only the broker URL"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    url = ",".join(line.strip() for line in text.splitlines() if line.strip())
    if not url:
        raise ValueError(f"{where} is empty; it should hold the broker URL")
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        log.warning(
            "broker_url_file_not_private",
            path=path,
            mode=f"{stat.S_IMODE(mode):04o}",
            fix=f"chmod 600 {path} (or 640 with a group only the worker's user is in)",
        )
    return url


def resolve_broker_url(
    url: str | None = None,
    url_file: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> BrokerUrlSource:
    """The broker URL to use, and where it came from; the first found wins.

    1. `url` (`--broker-url`);
    2. `url_file` (`--broker-url-file`), read with `read_broker_url_file`;
    3. the file named by `$FLAAP_MQ_BROKER_URL_FILE` (systemd's
       `LoadCredential=`: `FLAAP_MQ_BROKER_URL_FILE=%d/broker-url`);
    4. `$FLAAP_MQ_BROKER_URL`;
    5. `DEFAULT_BROKER_URL` (local development's guest login).

    Giving both `url` and `url_file` is a `ValueError`: one of them would be
    ignored. Both variables set is allowed (the file wins, logged as
    `broker_url_env_ignored`): a unit that loads a credential may still
    inherit an old environment file.
    """
    env = os.environ if environ is None else environ
    if url is not None and url_file is not None:
        raise ValueError("give --broker-url or --broker-url-file, not both")
    if url is not None:
        return BrokerUrlSource(url, None, "--broker-url")
    if url_file is not None:
        path = os.path.abspath(url_file)
        return BrokerUrlSource(
            read_broker_url_file(path, origin="--broker-url-file"), path, "--broker-url-file"
        )
    if env.get(BROKER_URL_FILE_ENV):
        origin = f"${BROKER_URL_FILE_ENV}"
        path = os.path.abspath(env[BROKER_URL_FILE_ENV])
        if env.get(BROKER_URL_ENV):
            log.warning(
                "broker_url_env_ignored",
                used=origin,
                ignored=f"${BROKER_URL_ENV}",
                note="the file wins; unset the variable",
            )
        return BrokerUrlSource(read_broker_url_file(path, origin=origin), path, origin)
    if env.get(BROKER_URL_ENV):
        return BrokerUrlSource(env[BROKER_URL_ENV], None, f"${BROKER_URL_ENV}")
    return BrokerUrlSource(DEFAULT_BROKER_URL, None, "default")


def parse_broker_urls(
    urls: str | None, *, connection_name: str = "flaap-mq"
) -> list[BrokerAddress]:
    """Parses one URL or a comma-separated list; `None` reads the environment.

    From the environment (`resolve_broker_url`: `FLAAP_MQ_BROKER_URL_FILE`,
    else `FLAAP_MQ_BROKER_URL`), `FLAAP_MQ_CA_FILE`, `FLAAP_MQ_CERT_FILE`
    and `FLAAP_MQ_KEY_FILE` are applied too (as `with_tls_options`).
    """
    if urls is None:
        urls = with_tls_options(
            resolve_broker_url().url,
            ca_file=os.environ.get(CA_FILE_ENV),
            cert_file=os.environ.get(CERT_FILE_ENV),
            key_file=os.environ.get(KEY_FILE_ENV),
        )
    addresses = []
    listed = split_broker_urls(urls)
    if len({"@" in url for url in listed}) > 1:
        raise ValueError(
            f"broker URLs {redact_url(urls)}: some name a user and some do not; give every "
            "node of the cluster the same login (a password holding a comma must be "
            "percent-encoded, as %2C)"
        )
    for url in listed:
        if not _STARTS_WITH_SCHEME.match(url) or url.split(":", 1)[0].lower() not in (
            "amqp",
            "amqps",
        ):
            raise ValueError(
                f"broker URL must start with amqp:// or amqps://, got {redact_url(url)}"
            )
        address = BrokerAddress(url, connection_name=connection_name)
        address.parameters()  # raises a clear ValueError now rather than on connect
        addresses.append(address)
    if not addresses:
        raise ValueError("no broker URL given")
    return addresses


def credential_files(addresses: Sequence[BrokerAddress]) -> list[str]:
    """Files that hold a client's broker credentials: TLS keys, systemd's credentials.

    What a process that runs untrusted computations must not be able to
    read (`flaap_mq.executor` hides them from TFF's executor).
    """
    files = [a.key_file for a in addresses if a.key_file]
    for variable in (BROKER_URL_FILE_ENV, "CREDENTIALS_DIRECTORY"):  # the latter: LoadCredential=
        if os.environ.get(variable):
            files.append(os.environ[variable])
    return files
