"""No `flaap-mq` command prints a broker password, whatever characters it holds.

Each password holds a character that breaks URL parsing when it is not
percent-encoded (`#`, `/`, `?`, `,`, `@`, `%`, `:`, `[`), and two markers,
first and last, that nothing else prints: finding either marker in stdout or
stderr means at least part of the password leaked (a parser quoting the piece
it choked on, a URL cut at a comma). Every URL is tried as written and
percent-encoded, against a host that refuses connections and against a real
broker that refuses the password; on the command line, in a
`--broker-url-file`, and in the environment.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.link import BrokerLink, BrokerUnavailable
from tests.security.conftest import run_cli

HEAD, TAIL = "Zq9", "Wv8"  # in every password, in no message
PASSWORDS = [f"{HEAD}{c}x{TAIL}" for c in ("#", "/", "?", ",", "@", "%", ":", "[", "%41")]
UNREACHABLE = "127.0.0.1:1"  # refused at once


def _url(password: str, hostport: str, *, encoded: bool, user: str = "guest") -> str:
    written = urllib.parse.quote(password, safe="") if encoded else password
    return f"amqp://{user}:{written}@{hostport}/"


def _assert_no_password(result, what: str) -> None:
    output = result.stdout + result.stderr
    assert HEAD not in output and TAIL not in output, f"{what} printed the password:\n{output}"
    assert "Traceback" not in output, f"{what}:\n{output}"


@pytest.fixture(scope="module")
def broker_hostport(broker_url: str) -> str:
    """host:port of the test broker, which refuses these passwords."""
    parts = urllib.parse.urlsplit(broker_url.split(",")[0])
    return f"{parts.hostname}:{parts.port or 5672}"


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("encoded", [False, True], ids=["raw", "encoded"])
def test_topology_and_status_never_print_the_password(
    password: str, encoded: bool, broker_hostport: str, tmp_path: Path
) -> None:
    for hostport in (UNREACHABLE, broker_hostport):
        url = _url(password, hostport, encoded=encoded)
        for command in ("topology", "status"):
            result = run_cli(command, "--broker-url", url, "--silo", "a", timeout=60)
            assert result.returncode != 0, result.stdout
            _assert_no_password(result, f"{command} --broker-url {url}")
        url_file = tmp_path / "broker-url"
        url_file.write_text(url + "\n")
        url_file.chmod(0o600)
        result = run_cli("topology", "--broker-url-file", str(url_file), timeout=60)
        assert result.returncode != 0
        _assert_no_password(result, f"topology --broker-url-file holding {url}")
        result = run_cli("status", "--silo", "a", env={"FLAAP_MQ_BROKER_URL": url}, timeout=60)
        assert result.returncode != 0
        _assert_no_password(result, f"status with FLAAP_MQ_BROKER_URL={url}")


def test_a_cluster_list_cut_inside_a_password_never_prints_it(broker_hostport: str) -> None:
    password = f"{HEAD}1,amqp://x{TAIL}"
    url = f"amqp://guest:{password}@{broker_hostport}/,amqp://guest:{HEAD}2{TAIL}@{UNREACHABLE}/"
    for command in ("topology", "status"):
        result = run_cli(command, "--broker-url", url, timeout=60)
        assert result.returncode != 0
        _assert_no_password(result, f"{command} --broker-url {url}")


@pytest.mark.parametrize(
    ("password", "encoded", "exit_code"),
    [
        (f"{HEAD}#x{TAIL}", False, 2),  # does not parse: a usage error
        (f"{HEAD}/x{TAIL}", True, 1),  # the broker refuses the login
        (f"{HEAD}@x{TAIL}", False, 1),  # parses (the last @ ends the password); refused
    ],
)
def test_worker_that_cannot_log_in_never_prints_the_password(
    password: str, encoded: bool, exit_code: int, broker_hostport: str
) -> None:
    """A URL that does not parse (exit 2, a usage error), or a password the broker refuses
    (exit 1): one line either way."""
    url = _url(password, broker_hostport, encoded=encoded)
    result = run_cli("worker", "--silo-id", "a", "--broker-url", url, timeout=120)
    assert result.returncode == exit_code, result.stderr
    _assert_no_password(result, f"worker --broker-url {url}")


def test_an_unreachable_broker_never_shows_the_password(tmp_path: Path) -> None:
    """The worker command fails at once in one line; the library retries and logs: neither leaks."""
    url = _url(f"{HEAD}@,x{TAIL}", UNREACHABLE, encoded=False)
    result = run_cli("worker", "--silo-id", "a", "--broker-url", url, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "cannot connect to the broker at 127.0.0.1:1" in result.stderr
    _assert_no_password(result, f"worker --broker-url {url}")
    # The library's link (a coordinator's; a worker's once started) retries
    # instead; what it logs while retrying (`broker_reconnecting`'s error) is
    # part of the error it ends with.
    link = BrokerLink(parse_broker_urls(url), name="leak")
    with pytest.raises(BrokerUnavailable) as raised:
        link.start(timeout=1.5)
    assert "cannot connect to the broker at 127.0.0.1:1" in str(raised.value)
    assert HEAD not in str(raised.value) and TAIL not in str(raised.value), raised.value


@pytest.mark.parametrize(
    ("password", "encoded"), [(f"{HEAD}?x{TAIL}", False), (f"{HEAD}%x{TAIL}", True)]
)
def test_train_never_prints_the_password(
    password: str, encoded: bool, broker_hostport: str, tmp_path: Path
) -> None:
    test_set = tmp_path / "test.npz"
    np.savez(test_set, x=np.zeros((2, 64), np.float32), y=np.zeros(2, np.int32))
    url = _url(password, broker_hostport, encoded=encoded, user="coordinator")
    result = run_cli(
        "train",
        "--broker-url",
        url,
        "--silo",
        "a",
        "--test-set",
        str(test_set),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        timeout=180,
    )
    assert result.returncode == (1 if encoded else 2), result.stdout  # 2: does not parse
    _assert_no_password(result, f"train --broker-url {url}")
