"""Operator mistakes end in one line naming what is wrong and exit 1, never a traceback.

Runs `flaap-mq worker` and `flaap-mq topology` as subprocesses against the
package's TLS broker. The worker checks its login before it loads
TensorFlow, so each of these takes about a second.
"""

from __future__ import annotations

import pytest

from tests.security.conftest import PREFIX, SecureBroker, run_cli

pytestmark = pytest.mark.broker_node


def _cases(broker: SecureBroker) -> dict[str, tuple[list[str], str]]:
    tls = broker.tls
    missing = str(tls.directory / "no-such-ca.pem")
    return {
        "wrong password": (
            ["--broker-url", broker.url("a", password="not-the-password")],
            "refused the login of user 'a': wrong user name or password",
        ),
        "unknown vhost": (
            ["--broker-url", broker.url("a", vhost="no-such-vhost")],
            "has no vhost 'no-such-vhost'",
        ),
        "missing CA file": (
            ["--broker-url", broker.url("a", ca=False), "--ca-file", missing],
            f"CA file {missing} does not exist",
        ),
        "missing client certificate": (
            [
                "--broker-url",
                broker.url("a"),
                "--cert-file",
                str(tls.directory / "gone.pem"),
                "--key-file",
                str(tls.client_key),
            ],
            f"client certificate file {tls.directory / 'gone.pem'} does not exist",
        ),
        "untrusted CA": (
            ["--broker-url", broker.url("a", ca=False), "--ca-file", str(tls.other_ca)],
            "presented a certificate this client does not trust",
        ),
    }


@pytest.mark.parametrize("command", ["worker", "topology"])
def test_bad_input_gives_one_line_and_exit_1(secure_broker: SecureBroker, command: str):
    extra = ["--silo-id", "a"] if command == "worker" else ["--silo", "a"]
    failures = []
    for case, (args, expected) in _cases(secure_broker).items():
        result = run_cli(command, "--prefix", PREFIX, *extra, *args, timeout=60)
        stderr = result.stderr.strip()
        ok = (
            result.returncode == 1
            and "Traceback" not in stderr
            and len(stderr.splitlines()) == 1
            and stderr.startswith(f"flaap-mq {command}: ")
            and expected in stderr
            and "not-the-password" not in stderr
        )
        if not ok:
            failures.append(f"{case}: exit {result.returncode}, stderr:\n{result.stderr}")
    assert not failures, "\n\n".join(failures)
