"""Every command says the same one line, at once, when the broker cannot be reached.

An unknown host is named; a port where nothing listens says so. The library
(`BrokerLink`) keeps its bounded retry and then says the same words.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import portpicker
import pytest

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.link import BrokerLink, BrokerUnavailable
from flaap_mq.testing.cli import run_cli

COMMANDS = {
    "worker": ["worker", "--silo-id", "a"],
    "status": ["status", "--silo", "a"],
    "topology": ["topology", "--silo", "a"],
    "train": ["train", "--silo", "a"],
    "dead-letters show": ["dead-letters", "show"],
    "admin remove-silo": ["admin", "remove-silo", "a"],
}
UNKNOWN_HOST = "no-such-broker.invalid"
# Python's start-up and the imports a command needs before it connects; a
# retry loop would take 30 s.
QUICKLY_S = 15.0


def _unreachable(where: str) -> tuple[str, str]:
    """A broker URL nobody answers at, and what the error must say of it."""
    if where == "unknown host":
        return (
            f"amqp://guest:guest@{UNKNOWN_HOST}:5672/",
            f"cannot connect to the broker at {UNKNOWN_HOST}:5672: unknown host {UNKNOWN_HOST!r}",
        )
    port = portpicker.pick_unused_port()
    return (
        f"amqp://guest:guest@127.0.0.1:{port}/",
        f"cannot connect to the broker at 127.0.0.1:{port}: connection refused",
    )


@pytest.mark.parametrize("where", ["unknown host", "closed port"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unreachable_broker_fails_every_command_at_once_in_one_line(
    command: str, where: str, tmp_path: Path
) -> None:
    url, expected = _unreachable(where)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAAP_MQ_")}
    env["FLAAP_MQ_EXECUTOR_ENV"] = os.environ.get("FLAAP_MQ_EXECUTOR_ENV", "")
    started = time.monotonic()
    done = run_cli(*COMMANDS[command], "--broker-url", url, env=env, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"flaap-mq {command}: {expected}"), lines[0]
    assert done.stdout == ""
    assert "guest:guest" not in done.stderr
    assert elapsed < QUICKLY_S, f"took {elapsed:.1f} s"


def test_the_library_retries_for_its_bound_then_says_the_same() -> None:
    url, expected = _unreachable("closed port")
    link = BrokerLink(parse_broker_urls(url), name="unreachable")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        link.start(timeout=1.5)
    assert time.monotonic() - started >= 1.5  # it retried, for as long as it was told
    assert expected in str(raised.value)
