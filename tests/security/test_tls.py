"""TLS: the broker listens on TLS only; clients verify it, and may show a certificate.

The round itself runs over TLS in test_permissions.py; an untrusted CA from
the command line is in test_bad_input.py.
"""

from __future__ import annotations

import pika
import pika.exceptions
import pytest

from flaap_mq.broker.address import BrokerAddress, parse_broker_urls
from flaap_mq.broker.connect import check_login
from flaap_mq.broker.link import BrokerLink, BrokerRefused
from tests.security.conftest import COORDINATOR, SecureBroker

pytestmark = pytest.mark.broker_node


def test_plaintext_listener_is_off(secure_broker: SecureBroker):
    # The node's plain AMQP port, which deploy/rabbitmq/rabbitmq.conf turns off.
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(secure_broker.node.url))


def test_link_connects_over_tls(secure_broker: SecureBroker):
    link = BrokerLink(parse_broker_urls(secure_broker.url(COORDINATOR)), name="tls-check")
    link.start(20)
    try:
        assert link.connected
    finally:
        link.close()


def test_client_certificate_is_optional_and_sent_when_given(secure_broker: SecureBroker):
    tls = secure_broker.tls
    url = secure_broker.url(COORDINATOR, certfile=str(tls.client_cert), keyfile=str(tls.client_key))
    secure_broker.connect(url).close()
    # A key that is not the certificate's is caught before connecting.
    bad = secure_broker.url(COORDINATOR, certfile=str(tls.client_cert), keyfile=str(tls.server_key))
    with pytest.raises(ValueError, match="cannot be used together"):
        BrokerAddress(bad).parameters()


def test_untrusted_ca_is_refused_at_once_by_the_link(secure_broker: SecureBroker):
    url = secure_broker.url(COORDINATOR, ca=secure_broker.tls.other_ca)
    link = BrokerLink(parse_broker_urls(url), name="untrusted")
    with pytest.raises(BrokerRefused, match="does not trust") as refused:
        link.start(20)  # no retrying for 20 s: retrying cannot help
    assert str(secure_broker.tls.other_ca) in str(refused.value)


def test_broker_host_name_is_verified(secure_broker: SecureBroker):
    url = secure_broker.url(COORDINATOR, server_name_indication="broker.elsewhere.example")
    with pytest.raises(ValueError, match="Hostname mismatch"):
        check_login(parse_broker_urls(url))


def test_system_cas_are_the_default_and_do_not_trust_a_private_ca(
    secure_broker: SecureBroker,
):
    with pytest.raises(ValueError, match="trusted: the system's CAs"):
        check_login(parse_broker_urls(secure_broker.url(COORDINATOR, ca=False)))
