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
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import ssl
import urllib.parse

import pika
import pika.exceptions

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
BROKER_URL_ENV = "FLAAP_MQ_BROKER_URL"
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


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (one URL, or a comma-separated list).

    The URL is split the way pika splits it (`urllib.parse`), so what gets
    hidden is exactly what a client would send as the password.
    """
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    username = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{username}:***@{hostinfo}"))


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
    for url in (u.strip() for u in urls.split(",")):
        if not url:
            continue
        parts = urllib.parse.urlsplit(url)
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
        return urllib.parse.urlsplit(self.url).scheme == "amqps"

    @functools.cached_property
    def username(self) -> str:
        """The login, as pika sends it (the broker checks replies' user_id against it)."""
        return self._pika_parameters().credentials.username

    def _pika_parameters(self) -> pika.URLParameters:
        pika_url, _ = self._split
        try:
            return pika.URLParameters(pika_url)
        except Exception as e:
            raise ValueError(f"not a valid AMQP URL: {self.redacted}: {e}") from None

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


def parse_broker_urls(
    urls: str | None, *, connection_name: str = "flaap-mq"
) -> list[BrokerAddress]:
    """Parses one URL or a comma-separated list; `None` reads the environment.

    From the environment, `FLAAP_MQ_CA_FILE`, `FLAAP_MQ_CERT_FILE` and
    `FLAAP_MQ_KEY_FILE` are applied too (as `with_tls_options`).
    """
    if urls is None:
        urls = with_tls_options(
            os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL),
            ca_file=os.environ.get(CA_FILE_ENV),
            cert_file=os.environ.get(CERT_FILE_ENV),
            key_file=os.environ.get(KEY_FILE_ENV),
        )
    addresses = []
    for url in (u.strip() for u in urls.split(",")):
        if not url:
            continue
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("amqp", "amqps"):
            raise ValueError(
                f"broker URL must start with amqp:// or amqps://, got {redact_url(url)}"
            )
        address = BrokerAddress(url, connection_name=connection_name)
        address.parameters()  # raises a clear ValueError now rather than on connect
        addresses.append(address)
    if not addresses:
        raise ValueError("no broker URL given")
    return addresses
