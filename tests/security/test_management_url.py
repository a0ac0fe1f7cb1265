"""`flaap-mq status --management-url`: where the broker password may go, and where not.

Real HTTP(S) servers on 127.0.0.1 (threaded `http.server`, TLS from trustme)
record every request and its `Authorization` header. The password travels
only over https to a server the given CA vouches for, or over plain http to
this host; never to a redirect's other origin, never through a proxy for a
loopback URL; and a URL that would expose it fails before anything is sent.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from flaap_mq.admin.management_api import ManagementApi, ManagementRedirected
from flaap_mq.broker.address import BrokerAddress
from tests.security.conftest import run_cli

PASSWORD = "Zq9-management-Wv8"
ADDRESS = BrokerAddress(f"amqp://coordinator:{PASSWORD}@127.0.0.1:1/federation")
EXPECTED_AUTH = "Basic " + base64.b64encode(f"coordinator:{PASSWORD}".encode()).decode()


@dataclass
class Server:
    url: str
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # path, Authorization

    @property
    def authorizations(self) -> list[str | None]:
        return [auth for _, auth in self.requests]


@contextlib.contextmanager
def serve(
    respond: Callable[[str], tuple[int, dict[str, str], bytes]] | None = None,
    *,
    tls: ssl.SSLContext | None = None,
) -> Iterator[Server]:
    """An HTTP(S) server on 127.0.0.1 that records requests; `respond(path)` answers."""
    server_record = Server("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server_record.requests.append((self.path, self.headers.get("Authorization")))
            code, headers, body = respond(self.path) if respond else (200, {}, b"[]")
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # refused TLS handshakes are expected here

    httpd = Quiet(("127.0.0.1", 0), Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    scheme = "https" if tls is not None else "http"
    server_record.url = f"{scheme}://{'localhost' if tls else '127.0.0.1'}:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_record
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, object]:
    directory: Path = tmp_path_factory.mktemp("mgmt-tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(context)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(directory / "other-ca.pem"))
    return {
        "server": context,
        "ca": str(directory / "ca.pem"),
        "other_ca": str(directory / "other-ca.pem"),
    }


def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_plain_http_to_this_host_sends_the_login(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_proxy(monkeypatch)
    with serve() as api_server:
        assert ManagementApi(api_server.url, ADDRESS).reply_queues("flaap.reply.") == []
    assert api_server.authorizations == [EXPECTED_AUTH]
    assert api_server.requests[0][0] == "/api/queues/federation"


@pytest.mark.parametrize(
    "url",
    ["http://192.0.2.10:15672", "http://broker.example.org:15672", "http://localhost.evil.test"],
)
def test_plain_http_elsewhere_is_refused_before_sending(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        ManagementApi(url, ADDRESS)
    message = str(refused.value)
    assert "use https://" in message and "plain http" in message
    assert PASSWORD not in message


@pytest.mark.parametrize("url", ["http://localhost:15672", "http://127.8.9.10", "http://[::1]:1"])
def test_loopback_names_are_allowed_over_plain_http(url: str) -> None:
    ManagementApi(url, ADDRESS)


def test_credentials_in_the_management_url_are_refused_unprinted() -> None:
    with pytest.raises(ValueError, match="holds a user name or password") as refused:
        ManagementApi(f"https://admin:{PASSWORD}@broker.example.org:15671", ADDRESS)
    assert PASSWORD not in str(refused.value)


def test_urllib_alone_forwards_the_password_across_a_redirect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack, with urllib's default handler: why status has its own."""
    _no_proxy(monkeypatch)
    with serve() as elsewhere:
        redirect = (302, {"Location": f"{elsewhere.url}/steal"}, b"")
        with serve(lambda _: redirect) as api_server:
            request = urllib.request.Request(
                f"{api_server.url}/api/queues", headers={"Authorization": EXPECTED_AUTH}
            )
            urllib.request.urlopen(request, timeout=10).close()
    assert elsewhere.authorizations == [EXPECTED_AUTH]


def test_redirect_to_another_origin_is_not_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_proxy(monkeypatch)
    with serve() as elsewhere:
        redirect = (302, {"Location": f"{elsewhere.url}/steal"}, b"")
        with serve(lambda _: redirect) as api_server:
            api = ManagementApi(api_server.url, ADDRESS)
            with pytest.raises(ManagementRedirected) as refused:
                api.reply_queues("flaap.reply.")
    assert elsewhere.requests == []  # the other port never heard from us
    message = str(refused.value)
    assert elsewhere.url in message and "not followed" in message
    assert PASSWORD not in message


def test_https_redirect_down_to_http_is_not_followed(
    tls: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_proxy(monkeypatch)
    with serve() as plain:
        downgrade = plain.url.replace("127.0.0.1", "localhost")
        redirect = (301, {"Location": f"{downgrade}/api/queues/federation"}, b"")
        with serve(lambda _: redirect, tls=tls["server"]) as api_server:
            api = ManagementApi(api_server.url, ADDRESS, ca_file=tls["ca"])
            with pytest.raises(ManagementRedirected):
                api.reply_queues("flaap.reply.")
    assert api_server.authorizations == [EXPECTED_AUTH]
    assert plain.requests == []


def test_redirect_within_the_same_origin_is_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_proxy(monkeypatch)

    def respond(path: str) -> tuple[int, dict[str, str], bytes]:
        if path == "/api/queues/federation":
            return 307, {"Location": "/api/v2/queues/federation"}, b""
        return 200, {}, json.dumps([{"name": "flaap.reply.j1"}]).encode()

    with serve(respond) as api_server:
        queues = ManagementApi(api_server.url, ADDRESS).reply_queues("flaap.reply.")
    assert [q["queue"] for q in queues] == ["flaap.reply.j1"]
    assert api_server.authorizations == [EXPECTED_AUTH, EXPECTED_AUTH]


def test_https_with_the_federation_ca(tls: dict[str, object]) -> None:
    with serve(tls=tls["server"]) as api_server:
        assert ManagementApi(api_server.url, ADDRESS, ca_file=tls["ca"]).reply_queues("x") == []
    assert api_server.authorizations == [EXPECTED_AUTH]


@pytest.mark.parametrize("trusted", ["other_ca", None], ids=["other-ca", "system-cas"])
def test_https_server_the_ca_does_not_vouch_for_gets_nothing(
    tls: dict[str, object], trusted: str | None
) -> None:
    with serve(tls=tls["server"]) as api_server:
        api = ManagementApi(api_server.url, ADDRESS, ca_file=tls[trusted] if trusted else None)
        with pytest.raises(ValueError, match="certificate this client does not trust"):
            api.reply_queues("x")
    assert api_server.requests == []


def test_loopback_http_never_goes_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib would hand the request, password and all, to $http_proxy."""
    with serve() as proxy, serve() as api_server:
        for name in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        ManagementApi(api_server.url, ADDRESS).reply_queues("x")
    assert proxy.requests == []
    assert api_server.authorizations == [EXPECTED_AUTH]


def test_ca_file_of_the_broker_url_is_the_management_api_s(tls: dict[str, object]) -> None:
    """`--ca-file` (put in the broker URL's query by the CLI) is what status trusts."""
    address = BrokerAddress(f"amqps://coordinator:pw@localhost:1/?cacertfile={tls['ca']}")
    assert address.ca_file == tls["ca"]


def test_status_refuses_plain_http_before_connecting_anywhere() -> None:
    result = run_cli(
        "status",
        "--broker-url",
        f"amqp://coordinator:{PASSWORD}@127.0.0.1:1/",
        "--silo",
        "a",
        "--management-url",
        "http://192.0.2.10:15672",
        timeout=60,
    )
    assert result.returncode == 1
    assert "refusing to send the broker password over plain http" in result.stderr
    assert "no broker answered" not in result.stderr  # refused before the AMQP connection
    assert PASSWORD not in result.stdout + result.stderr
