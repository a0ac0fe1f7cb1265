"""TLS options of broker URLs, parsed without a broker."""

from __future__ import annotations

import ssl

import pytest
import trustme

from flaap_mq.broker.address import BrokerAddress, parse_broker_urls
from flaap_mq.broker.tls import with_tls_options


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    d = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    client = ca.issue_cert("silo")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    (d / "junk.pem").write_text("not a certificate\n")
    return d


def test_cli_files_go_into_every_url_and_replace_the_urls_own(pems):
    urls = with_tls_options(
        "amqps://u:p@n1:5671/v?cacertfile=/old.pem&heartbeat=10,amqps://u:p@n2:5671/v",
        ca_file=str(pems / "ca.pem"),
    )
    first, second = urls.split(",")
    assert first == f"amqps://u:p@n1:5671/v?heartbeat=10&cacertfile={pems}/ca.pem"
    assert second == f"amqps://u:p@n2:5671/v?cacertfile={pems}/ca.pem"
    assert with_tls_options("amqp://u:p@h/") == "amqp://u:p@h/"


def test_amqps_verifies_the_broker_against_the_given_ca_only(pems):
    address = BrokerAddress(f"amqps://silo-a:pw@broker:5671/fed?cacertfile={pems}/ca.pem")
    params = address.parameters()  # pika never sees our query options
    context = params.ssl_options.context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1
    assert params.ssl_options.server_hostname == "broker"
    assert (params.host, params.port, params.virtual_host) == ("broker", 5671, "fed")
    assert address.username == "silo-a"


def test_amqps_without_a_ca_file_uses_the_systems_cas():
    params = BrokerAddress("amqps://u:p@broker.example.org/v").parameters()
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED
    assert params.port == 5671


def test_client_certificate_and_server_name(pems):
    url = (
        f"amqps://u:p@10.0.0.5:5671/v?cacertfile={pems}/ca.pem&certfile={pems}/client.pem"
        f"&keyfile={pems}/client.key&server_name_indication=broker.example.org"
    )
    params = BrokerAddress(url).parameters()
    assert params.ssl_options.server_hostname == "broker.example.org"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("cacertfile={d}/nope.pem", "CA file {d}/nope.pem does not exist (--ca-file"),
        ("cacertfile={d}", "CA file {d} is not a file"),
        ("cacertfile={d}/junk.pem", "CA file {d}/junk.pem holds no usable PEM certificate"),
        ("certfile={d}/gone.pem", "client certificate file {d}/gone.pem does not exist"),
        ("keyfile={d}/client.key", "without a client certificate file"),
        ("certfile={d}/client.pem&keyfile={d}/ca.pem", "cannot be used together"),
    ],
)
def test_bad_tls_files_are_named(pems, query, message):
    url = "amqps://u:p@h:5671/v?" + query.format(d=pems)
    with pytest.raises(ValueError) as raised:
        parse_broker_urls(url)
    assert message.format(d=pems) in str(raised.value)
    assert ":p@" not in str(raised.value)  # the URL's password is never in an error


def test_tls_files_on_a_plain_url_are_refused(pems):
    with pytest.raises(ValueError, match=r"plain amqp:// URL .*use amqps://"):
        parse_broker_urls(f"amqp://u:secret@h:5672/v?cacertfile={pems}/ca.pem")


def test_environment_supplies_the_tls_files(pems, monkeypatch):
    monkeypatch.setenv("FLAAP_MQ_BROKER_URL", "amqps://u:p@h:5671/v")
    monkeypatch.setenv("FLAAP_MQ_CA_FILE", str(pems / "ca.pem"))
    (address,) = parse_broker_urls(None)
    assert f"cacertfile={pems}/ca.pem" in address.url
    monkeypatch.setenv("FLAAP_MQ_CA_FILE", str(pems / "missing.pem"))
    with pytest.raises(ValueError, match=r"missing\.pem does not exist"):
        parse_broker_urls(None)
