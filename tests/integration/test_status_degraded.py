"""`flaap-mq status` says what it cannot tell, instead of failing: no silos named, no API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import portpicker

from flaap_mq.testing.cli import run_cli


def _env() -> dict[str, str]:
    """This process's environment without a management URL or config of the operator's."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLAAP_MQ_MANAGEMENT_URL", "FLAAP_MQ_CONFIG")
    }


def test_no_silo_named_and_no_management_api_says_to_name_them(
    broker_url: str, prefix: str, tmp_path: Path
) -> None:
    done = run_cli(
        "status", "--broker-url", broker_url, "--prefix", prefix, env=_env(), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "no silos named: give --silo ID" in done.stdout
    assert f"--management-url to list every silo queue {prefix}.silo.*" in done.stdout
    assert "dead letters: 0" in done.stdout  # what AMQP can tell is still there


def test_an_unreachable_management_api_degrades_to_amqp_with_a_note(
    broker_url: str, prefix: str, tmp_path: Path
) -> None:
    api = f"http://127.0.0.1:{portpicker.pick_unused_port()}"
    args = ["status", "--broker-url", broker_url, "--prefix", prefix, "--management-url", api]
    done = run_cli(*args, "--silo", "a", "--json", env=_env(), cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # silo a has no worker: offline, as without the API
    report = json.loads(done.stdout)
    assert [(s["silo_id"], s["online"]) for s in report["silos"]] == [("a", False)]
    assert report["reply_queues"] is None
    (note,) = report["notes"]
    assert f"management API at {api} did not answer" in note
    assert "showing what AMQP tells" in note

    # With no silo named, it cannot list them either: it says so, and to name them.
    done = run_cli(*args, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"management API at {api} did not answer" in done.stdout
    assert "no silos named: give --silo ID" in done.stdout
