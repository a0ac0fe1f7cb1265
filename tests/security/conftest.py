"""One private broker node for the security tests, set up as docs/deploy.md says.

It boots with `deploy/rabbitmq/rabbitmq.conf` itself (TLS only, plaintext
off), certificates made on the fly with trustme, and a definitions document
from `flaap-mq admin definitions` loaded with `rabbitmqctl
import_definitions`. Every client here logs in with the generated
credentials over TLS. The node is shared by the whole package and stopped at
the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import portpicker
import pytest

from flaap_mq.broker.address import BrokerAddress
from flaap_mq.local.private_node import PrivateBrokerNode
from flaap_mq.testing import cli

REPO = Path(__file__).resolve().parents[2]
DEPLOY_CONF = REPO / "deploy" / "rabbitmq" / "rabbitmq.conf"
DEPLOY_ADVANCED_CONFIG = REPO / "deploy" / "rabbitmq" / "advanced.config"
VHOST = "federation"
PREFIX = "flaap"
COORDINATOR = "coordinator"
SILOS = ["a", "b", "c"]  # served by workers in the round
IDLE_SILO = "d"  # never served: tests play it by hand


@dataclasses.dataclass
class TlsFiles:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing of this broker's


@dataclasses.dataclass
class SecureBroker:
    node: PrivateBrokerNode
    tls_port: int
    tls: TlsFiles
    secrets_dir: Path
    definitions: Path

    def password(self, user: str) -> str:
        return (self.secrets_dir / f"{user}.password").read_text().strip()

    def url(
        self,
        user: str,
        *,
        password: str | None = None,
        vhost: str = VHOST,
        ca: Path | bool = True,
        **query: str,
    ) -> str:
        """An amqps:// URL; `ca=True` trusts the broker's CA, `False` leaves it out."""
        password = self.password(user) if password is None else password
        options = dict(query)
        if ca is True:
            options["cacertfile"] = str(self.tls.ca)
        elif ca:
            options["cacertfile"] = str(ca)
        q = urllib.parse.urlencode(options, safe="/")
        return (
            f"amqps://{user}:{urllib.parse.quote(password, safe='')}@localhost:{self.tls_port}/"
            f"{urllib.parse.quote(vhost, safe='')}" + (f"?{q}" if q else "")
        )

    def admin_url(self) -> str:
        # guest, given full rights on the vhost by the fixture: the administrator.
        return self.url("guest", password="guest")

    def connect(self, url: str) -> pika.BlockingConnection:
        return pika.BlockingConnection(BrokerAddress(url).parameters())


def _make_tls_files() -> TlsFiles:
    import trustme

    # Under /tmp and world-searchable: the node runs as the rabbitmq user.
    directory = Path(tempfile.mkdtemp(prefix="flaap-tls-", dir="/tmp"))
    directory.chmod(0o755)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("flaap-client")
    files = TlsFiles(
        directory=directory,
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    trustme.CA().cert_pem.write_to_path(str(files.other_ca))
    for f in directory.iterdir():
        f.chmod(0o644)  # test keys; the node's user must read the server's
    return files


def deploy_conf_for(tls: TlsFiles, tls_port: int) -> str:
    """deploy/rabbitmq/rabbitmq.conf with this test's certificate paths and port."""
    conf = DEPLOY_CONF.read_text()
    replacements = {
        "listeners.ssl.default = 5671": f"listeners.ssl.default = 127.0.0.1:{tls_port}",
        "/etc/rabbitmq/tls/ca.pem": str(tls.ca),
        "/etc/rabbitmq/tls/server.pem": str(tls.server_cert),
        "/etc/rabbitmq/tls/server.key": str(tls.server_key),
    }
    for old, new in replacements.items():
        assert old in conf, f"{DEPLOY_CONF} no longer has {old!r}; update this fixture"
        conf = conf.replace(old, new)
    assert "listeners.tcp = none" in conf
    return conf


def generate_definitions(
    secrets_dir: Path, out: Path, silos: tuple[str, ...] = (*SILOS, IDLE_SILO)
) -> None:
    """Runs `flaap-mq admin definitions` as an operator would."""
    cmd = [
        sys.executable,
        "-m",
        "flaap_mq.cli",
        "admin",
        "definitions",
        "--vhost",
        VHOST,
        "--coordinator",
        COORDINATOR,
        *(a for s in silos for a in ("--silo", s)),
        "--secrets-dir",
        str(secrets_dir),
        "--prefix",
        PREFIX,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    out.write_text(result.stdout)
    out.chmod(0o644)


def _wait_for_login(broker: SecureBroker, user: str, timeout_s: float = 30.0) -> None:
    # import_definitions returns before the import is done.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            broker.connect(broker.url(user)).close()
            return
        except pika.exceptions.AMQPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture(scope="package")
def secure_broker() -> Iterator[SecureBroker]:
    if shutil.which("rabbitmq-server", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        pytest.skip("rabbitmq-server (Debian's package) is not installed: no private node")
    tls = _make_tls_files()
    tls_port = portpicker.pick_unused_port()
    secrets_dir = tls.directory / "secrets"
    definitions = tls.directory / "definitions.json"
    generate_definitions(secrets_dir, definitions)
    node = PrivateBrokerNode(
        rabbitmq_conf=deploy_conf_for(tls, tls_port),
        advanced_config=DEPLOY_ADVANCED_CONFIG.read_text(),
    )
    try:
        node.start()
        node.rabbitmqctl("import_definitions", str(definitions))
        broker = SecureBroker(node, tls_port, tls, secrets_dir, definitions)
        _wait_for_login(broker, COORDINATOR)
        node.rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
        print(
            f"\nsecurity tests use private node {node.node_name}, TLS on {tls_port} "
            f"(started in {node.last_start_seconds:.1f} s)"
        )
        yield broker
    finally:
        node.close()
        shutil.rmtree(tls.directory, ignore_errors=True)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0):
    """`flaap-mq ARGS` without this run's FLAAP_MQ_* settings, plus `env`."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("FLAAP_MQ_")}
    run_env["FLAAP_MQ_EXECUTOR_ENV"] = os.environ.get("FLAAP_MQ_EXECUTOR_ENV", "")
    run_env.update(env or {})
    return cli.run_cli(*args, env=run_env, timeout=timeout)
