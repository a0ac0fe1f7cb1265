"""TLS for `amqps://` URLs: the certificate files, and a context that verifies the broker.

An `amqps://` URL always verifies the broker's certificate and host name,
against the system's CAs or the CA file given. The TLS files go in the URL's
query, with the names RabbitMQ's own URI spec uses, or come from the command
line (`--ca-file`, `--cert-file`, `--key-file`, see `with_tls_options`) or
the environment (`FLAAP_MQ_CA_FILE`, `FLAAP_MQ_CERT_FILE`, `FLAAP_MQ_KEY_FILE`):

    amqps://silo-a:PASSWORD@broker.example.org:5671/flaap?cacertfile=/etc/flaap-mq/ca.pem
    ...&certfile=/etc/flaap-mq/client.pem&keyfile=/etc/flaap-mq/client.key  (client certificate)
    ...&server_name_indication=broker.example.org  (the name to check, if not the host's)

A missing or unreadable file is a `ValueError` naming it, raised when the
URL is parsed (`verifying_ssl_options`, called by `BrokerAddress.parameters`), before
any connection is tried.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from collections.abc import Mapping

import pika

from flaap_mq.broker.urls import invalid_url_error, split_broker_urls

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
            raise invalid_url_error(url, e) from None
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


def verifying_ssl_options(options: Mapping[str, str], host: str) -> pika.SSLOptions:
    """TLS that verifies the broker: its certificate chain and its host name.

    `options` are a URL's TLS query options (`TLS_OPTIONS`); `host` is the
    name to check when `server_name_indication` does not give one.
    """
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
            raise ValueError(f"CA file {ca_file} holds no usable PEM certificate ({e})") from None
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


def _context_trusting(ca_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=ca_file)
    if not context.get_ca_certs():
        raise ValueError("no CA certificate in it")
    return context
