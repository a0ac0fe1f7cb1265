"""`flaap_mq.create_execution_context(config=PATH)`: a program that names only its config file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow_federated as tff

import flaap_mq
from flaap_mq.broker.urls import redact_url
from flaap_mq.examples import temperature_average
from flaap_mq.local.workers import queue_consumers

FLAAP_MQ_ENV = (
    "FLAAP_MQ_CONFIG",
    "FLAAP_MQ_BROKER_URL_FILE",
    "FLAAP_MQ_BROKER_URL",
    "FLAAP_MQ_CA_FILE",
    "FLAAP_MQ_CERT_FILE",
    "FLAAP_MQ_KEY_FILE",
)


def test_context_takes_url_silos_and_prefix_from_the_config_file(
    workers, broker_url, prefix, tmp_path, monkeypatch
):
    for name in FLAAP_MQ_ENV:  # the environment would win over the file
        monkeypatch.delenv(name, raising=False)
    workers(["cfg-a"])
    # A query option only the file's URL has: shows which URL the context used.
    file_url = broker_url if "?" in broker_url else broker_url + "?connection_attempts=2"
    url_file = tmp_path / "coordinator.url"
    url_file.write_text(file_url + "\n")
    url_file.chmod(0o600)
    path = tmp_path / "federation.toml"
    path.write_text(
        f'broker_url_file = "{url_file.name}"\nsilos = ["cfg-a"]\nprefix = "{prefix}"\n'
    )
    with (
        flaap_mq.create_execution_context(config=str(path), task_timeout=120) as context,
        tff.framework.get_context_stack().install(context),
    ):
        assert context.silo_ids == ["cfg-a"]
        assert context.client._names.prefix == prefix
        assert context.client._link.describe_addresses() == redact_url(file_url)
        assert temperature_average([[1.0, 3.0], [5.0]]) == pytest.approx(3.5)
    # The same settings, read once and passed on.
    settings = flaap_mq.load_config(path)
    assert (settings.broker_url, settings.silos, settings.prefix) == (file_url, ("cfg-a",), prefix)


def test_worker_takes_silo_id_prefix_and_url_from_the_config_file(broker_url, prefix, tmp_path):
    url_file = tmp_path / "worker.url"
    url_file.write_text(broker_url + "\n")
    url_file.chmod(0o600)
    path = tmp_path / "silo.toml"
    path.write_text(f'broker_url_file = "worker.url"\nsilo_id = "cfg-w"\nprefix = "{prefix}"\n')
    # Only $FLAAP_MQ_CONFIG names it; FLAAP_MQ_EXECUTOR_ENV lets the leak check's marker through.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLAAP_MQ_") or k == "FLAAP_MQ_EXECUTOR_ENV"
    }
    env["FLAAP_MQ_CONFIG"] = str(path)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "flaap_mq.cli", "worker", "--log-format", "json"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while (queue_consumers(broker_url, f"{prefix}.silo.cfg-w") or 0) < 1:
                assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "the worker did not start consuming"
                time.sleep(0.2)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
    assert worker.returncode == 0, log_path.read_text(errors="replace")[-3000:]
