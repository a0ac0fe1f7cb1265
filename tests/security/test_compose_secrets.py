"""The compose cluster (deploy/rabbitmq/cluster) exposes no key, cookie or password hash.

`prepare-secrets.sh` is run for real into a scratch copy of the folder, and
every file `compose.yaml` mounts is looked up in what it made: private files
must be mode 0400 and owned by the image's rabbitmq user, in a directory only
root may enter, and mounted on their own, read-only. No secret may sit in a
service's environment (where `docker inspect` shows it) or in `.env`.

As root the script runs as shipped (owner 999:999); as anyone else it is
told to use the caller's own ids, since only root may give a file away.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "cluster"
COMPOSE = CLUSTER / "compose.yaml"
SCRIPT = CLUSTER / "prepare-secrets.sh"
IMAGE_RABBITMQ_ID = 999  # uid and gid of `rabbitmq` in the rabbitmq:3.10 image
# Container paths that hold a secret, and where they come from.
PRIVATE_TARGETS = {
    "/etc/rabbitmq/tls/server.key",
    "/var/lib/rabbitmq/.erlang.cookie",
    "/etc/rabbitmq/definitions.json",
}
PUBLIC_TARGETS = {"/etc/rabbitmq/tls/ca.pem", "/etc/rabbitmq/tls/server.pem"}
INPUTS = ("ca.pem", "server.pem", "server.key", "definitions.json")  # the script's arguments
SECRET_WORDS = ("COOKIE", "PASS", "KEY", "SECRET")


def _services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _bind_mounts(service: dict) -> list[tuple[str, str, str]]:
    """(host source, container target, options) of each bind mount (not named volumes)."""
    mounts = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"long-form volume entries are not checked here: {entry}"
        source, target, *options = entry.split(":")
        if source.startswith((".", "/")):
            mounts.append((source, target, options[0] if options else ""))
    return mounts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """A scratch copy of the cluster folder after prepare-secrets.sh ran in it."""
    root = tmp_path_factory.mktemp("compose")
    ignore = shutil.ignore_patterns("tls", "secrets")
    shutil.copytree(CLUSTER.parent, root / "rabbitmq", ignore=ignore)
    here = root / "rabbitmq" / "cluster"
    inputs = root / "inputs"
    inputs.mkdir()
    for name in INPUTS:
        (inputs / name).write_text(f"stand-in for {name}\n")
    uid, gid = _run_script(here, inputs)
    return here, uid, gid


def _run_script(here: Path, inputs: Path) -> tuple[int, int]:
    """Runs the folder's prepare-secrets.sh; returns the owner it was to give the files."""
    env = dict(os.environ)
    if os.geteuid() == 0:
        uid = gid = IMAGE_RABBITMQ_ID
    else:
        uid, gid = os.geteuid(), os.getegid()
        env.update(RABBITMQ_UID=str(uid), RABBITMQ_GID=str(gid))
    result = subprocess.run(
        [str(here / SCRIPT.name), *(str(inputs / name) for name in INPUTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return uid, gid


def test_no_secret_in_the_environment_or_dotenv():
    text = COMPOSE.read_text()
    for name, service in _services().items():
        environment = service.get("environment") or {}
        if not isinstance(environment, dict):
            environment = dict(e.partition("=")[::2] for e in environment)
        secret = [k for k in environment if any(w in k.upper() for w in SECRET_WORDS)]
        assert not secret, f"{name} takes secrets from its environment: {secret}"
        assert "env_file" not in service, f"{name} reads an env_file"
    assert "RABBITMQ_ERLANG_COOKIE" not in text
    assert "chmod 644" not in text and "chmod 0644" not in text


def test_every_node_mounts_the_same_cookie_and_key_read_only():
    for name, service in _services().items():
        mounts = {target: (source, options) for source, target, options in _bind_mounts(service)}
        assert "/var/lib/rabbitmq/.erlang.cookie" in mounts, f"{name} has no cookie"
        assert "/etc/rabbitmq/tls/server.key" in mounts, f"{name} has no server key"
        for source, options in mounts.values():
            assert "ro" in options.split(","), f"{name} mounts {source} writable"


def test_private_files_are_0400_of_the_image_user_in_root_only_directories(prepared):
    here, uid, gid = prepared
    seen = set()
    for name, service in _services().items():
        for source, target, _ in _bind_mounts(service):
            path = (here / source).resolve()
            assert path.exists(), f"{name} mounts {source}, which prepare-secrets.sh did not make"
            info = path.stat()
            if target in PRIVATE_TARGETS:
                seen.add(target)
                assert stat.S_ISREG(info.st_mode), f"{source}: mount the file, not its directory"
                mode = stat.S_IMODE(info.st_mode)
                assert mode == 0o400, f"{source} is {mode:04o}"
                assert (info.st_uid, info.st_gid) == (uid, gid), f"{source} is not {uid}:{gid}'s"
                parent_mode = stat.S_IMODE(path.parent.stat().st_mode)
                assert parent_mode == 0o700, f"{path.parent} may be entered by others"
            elif target in PUBLIC_TARGETS:
                assert stat.S_IMODE(info.st_mode) & 0o444 == 0o444, f"{source} must be readable"
            else:
                # Configuration from the repository: no secret goes there.
                assert path.parent in (here, here.parent), f"{source}: an unexpected mount"
    assert seen == PRIVATE_TARGETS


def test_the_cookie_is_random_kept_and_private(prepared):
    here, _, _ = prepared
    cookie = here / "secrets" / "erlang.cookie"
    first = cookie.read_text()
    assert len(first) == 64 and all(c in "0123456789abcdef" for c in first)
    _run_script(here, here.parents[1] / "inputs")
    assert cookie.read_text() == first, "a second run must keep the cluster's cookie"
    assert stat.S_IMODE(cookie.stat().st_mode) == 0o400


def test_generated_files_stay_out_of_git():
    ignored = (CLUSTER / ".gitignore").read_text().split()
    assert {"tls/", "secrets/"} <= set(ignored)
