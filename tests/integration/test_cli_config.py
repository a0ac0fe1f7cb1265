"""The command line's conventions: `--version`, defaults and variables in `--help`, the config file.

The config-file tests run `topology` and `status` against the real broker with
no `--silo`, `--prefix` or broker flag: everything comes from the file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
from pathlib import Path

import pytest

from flaap_mq import cli
from flaap_mq.testing.cli import run_cli

SECRET = "s3cr3t-Pa55"
BROKER_ENV = (
    "FLAAP_MQ_CONFIG",
    "FLAAP_MQ_BROKER_URL_FILE",
    "FLAAP_MQ_BROKER_URL",
    "FLAAP_MQ_CA_FILE",
    "FLAAP_MQ_CERT_FILE",
    "FLAAP_MQ_KEY_FILE",
)
# What each command's --help must list under "environment:".
COMMAND_ENV = {
    "worker": (
        *BROKER_ENV,
        "FLAAP_MQ_SILO_ID",
        "FLAAP_MQ_EXECUTOR_NETWORK",
        "FLAAP_MQ_EXECUTOR_ENV",
    ),
    "topology": BROKER_ENV,
    "status": (*BROKER_ENV, "FLAAP_MQ_MANAGEMENT_URL"),
    "train": (*BROKER_ENV, "FLAAP_MQ_EXECUTOR_ENV"),
    "demo": ("FLAAP_MQ_BROKER_URL_FILE", "FLAAP_MQ_BROKER_URL", "FLAAP_MQ_EXECUTOR_ENV"),
}


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any flaap-mq setting or user config file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAAP_MQ_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "no-user-config")
    env.update(extra)
    return env


def write_config(tmp_path: Path, broker_url: str, prefix: str, silos: list[str]) -> Path:
    """A config file naming a 0600 URL file (relative to it), the silos and the prefix."""
    url_file = tmp_path / "coordinator.url"
    url_file.write_text(broker_url + "\n")
    url_file.chmod(0o600)
    path = tmp_path / "flaap-mq.toml"
    listed = ", ".join(f'"{s}"' for s in silos)
    path.write_text(
        f'broker_url_file = "coordinator.url"\nsilos = [{listed}]\nprefix = "{prefix}"\n'
        'queue_type = "quorum"\n'
    )
    return path


def test_version_is_the_installed_packages():
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"flaap-mq {importlib.metadata.version('flaap-mq')}"


@pytest.mark.parametrize("command", sorted(COMMAND_ENV))
def test_help_lists_defaults_and_environment_and_no_secret(command, tmp_path):
    secrets = clean_env(
        tmp_path,
        FLAAP_MQ_BROKER_URL=f"amqp://coord:{SECRET}@broker:5672/",
        FLAAP_MQ_MANAGEMENT_URL=f"https://admin:{SECRET}@broker:15671",
        FLAAP_MQ_SILO_ID=f"silo-{SECRET}",
        FLAAP_MQ_CA_FILE=f"/etc/{SECRET}/ca.pem",
    )
    done = run_cli(command, "--help", env=secrets)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert SECRET not in out
    environment = out.split("\nenvironment:\n", 1)[1]
    listed = [line.split()[0] for line in environment.splitlines() if line.startswith("  ")]
    assert listed == list(COMMAND_ENV[command])
    text = " ".join(out.split())
    if command == "demo":
        assert "--silos SILOS default: 3" in text
    else:
        assert "--prefix PREFIX prefix of every queue and exchange (default: the config's" in text
        assert "else the config's broker_url_file or broker_url, else amqp://" in text


def test_every_option_of_every_command_shows_its_default():
    """Walks every parser: an option that takes a value and is not required says its default."""
    parsers = [cli.build_parser()]
    missing = []
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
                continue
            if not action.option_strings or action.nargs == 0 or action.required:
                continue
            formatter = parser._get_formatter()
            text = " ".join(formatter._format_action(action).split())
            if "default" not in text.lower():
                missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing


def test_every_command_that_takes_a_config_file_lists_its_variables():
    parsers = [cli.build_parser()]
    unlisted = []
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif "--config" in action.option_strings:
                epilog = parser.epilog or ""
                if not all(name in epilog for name in BROKER_ENV):
                    unlisted.append(parser.prog)
    assert not unlisted


def test_topology_reads_url_silos_and_prefix_from_the_config_file(broker_url, prefix, tmp_path):
    path = write_config(tmp_path, broker_url, prefix, ["cfg-a", "cfg-b"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    runs = {
        "--config": run_cli("topology", "--config", str(path), env=clean_env(tmp_path)),
        "$FLAAP_MQ_CONFIG": run_cli(
            "topology", env=clean_env(tmp_path, FLAAP_MQ_CONFIG=str(path)), cwd=elsewhere
        ),
        "./flaap-mq.toml": run_cli("topology", env=clean_env(tmp_path), cwd=tmp_path),
    }
    for how, done in runs.items():
        assert done.returncode == 0, (how, done.stderr)
        for queue in (f"{prefix}.silo.cfg-a", f"{prefix}.silo.cfg-b", f"{prefix}.dead-letter"):
            assert queue in done.stdout, (how, done.stdout)
        assert f"prefix '{prefix}'" in done.stdout


def test_status_reads_the_config_file_and_flags_override_it(broker_url, prefix, tmp_path):
    path = write_config(tmp_path, broker_url, prefix, ["cfg-a", "cfg-b"])
    env = clean_env(tmp_path)
    assert run_cli("topology", "--config", str(path), env=env).returncode == 0
    done = run_cli("status", "--config", str(path), "--json", env=env)
    assert done.returncode == 1, done.stderr  # no worker: both silos offline
    report = json.loads(done.stdout)
    assert [s["silo_id"] for s in report["silos"]] == ["cfg-a", "cfg-b"]
    assert [s["queue"] for s in report["silos"]] == [f"{prefix}.silo.cfg-a", f"{prefix}.silo.cfg-b"]
    assert all(s["exists"] for s in report["silos"])
    # A flag wins over the file.
    done = run_cli("status", "--config", str(path), "--json", "--silo", "cfg-b", env=env)
    assert [s["silo_id"] for s in json.loads(done.stdout)["silos"]] == ["cfg-b"]


def test_a_bad_config_file_fails_in_one_line_naming_file_and_key(tmp_path):
    path = tmp_path / "flaap-mq.toml"
    path.write_text('silo = ["a"]\n')
    done = run_cli("status", "--config", str(path), env=clean_env(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"flaap-mq status: config file {path}: unknown key 'silo'; did you mean 'silos'?"
    )
    # A password in a file others may read: refused, and never repeated.
    path.write_text(f'broker_url = "amqp://coord:{SECRET}@127.0.0.1:5672/"\nsilos = ["a"]\n')
    path.chmod(0o644)
    done = run_cli("topology", "--config", str(path), env=clean_env(tmp_path))
    assert done.returncode == 2
    assert "broker_url holds a password" in done.stderr
    assert "Traceback" not in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_train_without_silos_says_where_to_give_them(tmp_path):
    done = run_cli("train", env=clean_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert "give --silo ID (repeatable), or silos = [...] in a config file" in done.stderr


def test_worker_and_train_read_the_config_file_too(broker_url, prefix, tmp_path):
    path = tmp_path / "flaap-mq.toml"
    path.write_text('silo_id = "x y"\n')
    done = run_cli("worker", "--config", str(path), env=clean_env(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"flaap-mq worker: config file {path}: silo_id: silo id 'x y'")
    # train takes its silos from the file: it gets as far as its own checks.
    path = write_config(tmp_path, broker_url, prefix, ["a", "b"])
    done = run_cli(
        "train", "--test-set", str(tmp_path / "none.npz"), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr
    assert "no held-out test set at" in done.stderr
