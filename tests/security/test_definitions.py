"""`flaap-mq admin definitions`: the document, the hashes, the secrets, the permissions.

No broker here: tests/security/test_permissions.py loads a generated document
into a real one and tries every permission against it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
from pathlib import Path

import pytest

from flaap_mq.admin import definitions
from flaap_mq.protocol import topology
from tests.security.conftest import run_cli


def _build(tmp_path: Path, **kwargs: object) -> dict:
    options = dict(vhost="fed", coordinator="coord", silos=["a", "b"], secrets_dir=tmp_path / "s")
    options.update(kwargs)
    document, _ = definitions.build_definitions(**options)  # type: ignore[arg-type]
    return document


def test_hash_is_rabbitmq_salted_sha256():
    salt = b"\x01\x02\x03\x04"
    value = definitions.hash_password("s3cret", salt)
    raw = base64.b64decode(value)
    assert raw[:4] == salt
    assert raw[4:] == hashlib.sha256(salt + b"s3cret").digest()
    assert definitions.check_password("s3cret", value)
    assert not definitions.check_password("s3cret!", value)
    # A fresh random salt each time.
    assert definitions.hash_password("x") != definitions.hash_password("x")


def test_passwords_are_in_mode_0600_files_and_only_hashed_in_the_document(tmp_path):
    document = _build(tmp_path)
    text = json.dumps(document)
    secrets_dir = tmp_path / "s"
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    users = {u["name"]: u for u in document["users"]}
    assert set(users) == {"coord", "a", "b"}
    for name, user in users.items():
        path = secrets_dir / f"{name}.password"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        password = path.read_text().strip()
        assert len(password) >= 32
        assert password not in text
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert definitions.check_password(password, user["password_hash"])
        assert user["tags"] == []  # nobody is an administrator


def test_rerun_keeps_passwords_and_rotate_replaces_them(tmp_path):
    _build(tmp_path)
    before = (tmp_path / "s" / "a.password").read_text()
    _, new = definitions.build_definitions(
        vhost="fed", coordinator="coord", silos=["a", "b", "c"], secrets_dir=tmp_path / "s"
    )
    assert new == ["c"]
    assert (tmp_path / "s" / "a.password").read_text() == before
    _, new = definitions.build_definitions(
        vhost="fed", coordinator="coord", silos=["a"], secrets_dir=tmp_path / "s", rotate=True
    )
    assert new == ["coord", "a"]
    assert (tmp_path / "s" / "a.password").read_text() != before


def test_a_password_file_others_can_read_is_refused(tmp_path):
    _build(tmp_path)
    (tmp_path / "s" / "a.password").chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        _build(tmp_path)


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_topology_is_exactly_what_the_clients_declare(tmp_path, queue_type):
    document = _build(tmp_path, prefix="px", queue_type=queue_type)
    names = topology.Names("px")
    expected = topology.shared_declarations(names) + topology.silo_declarations(
        names, ["a", "b"], topology.QueueType(queue_type)
    )
    queues = {q["name"]: q for q in document["queues"]}
    exchanges = {e["name"]: e for e in document["exchanges"]}
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in document["bindings"]}
    for decl in expected:
        match decl:
            case topology.Queue():
                assert queues.pop(decl.name)["arguments"] == decl.arguments
            case topology.Exchange():
                assert exchanges.pop(decl.name)["type"] == decl.type
            case topology.Binding():
                bindings.remove((decl.exchange, decl.queue, decl.routing_key))
    assert not queues and not exchanges and not bindings, "more than the topology"
    for entry in document["queues"] + document["exchanges"] + document["bindings"]:
        assert entry["vhost"] == "fed"
    # No reply queue: each coordinator declares its own, with an expiry.
    assert not any(".reply." in q["name"] for q in document["queues"])
    assert document["vhosts"] == [
        {
            "name": "fed",
            "metadata": {
                "description": "flaap-mq federation (prefix 'px')",
                "tags": [],
                "default_queue_type": "quorum",
            },
        }
    ]


def _may(document: dict, user: str, what: str, resource: str) -> bool:
    """RabbitMQ's check: the permission's regex matches the resource name."""
    entry = next(p for p in document["permissions"] if p["user"] == user)
    return re.search(entry[what], resource) is not None


def test_permissions(tmp_path):
    d = _build(tmp_path, silos=["a", "b", "ab"])
    everything = [
        "flaap.tasks",
        "flaap.replies",
        "flaap.dead-letter",
        "flaap.silo.a",
        "flaap.silo.b",
        "flaap.silo.ab",
        "flaap.reply.job-1",
        "amq.default",  # the default exchange, as permissions name it
        "flaapXtasks",
        "other",
    ]

    def allowed(user: str, what: str) -> set[str]:
        return {r for r in everything if _may(d, user, what, r)}

    # A silo consumes its own queue only, and publishes only replies (its
    # worker rejects a malformed task; the broker dead-letters it); it
    # declares nothing.
    assert allowed("a", "read") == {"flaap.silo.a"}
    assert allowed("ab", "read") == {"flaap.silo.ab"}
    assert allowed("a", "write") == {"flaap.replies"}
    assert allowed("a", "configure") == set()
    # Only the coordinator publishes tasks and reads replies; it configures
    # only its own reply queues.
    assert allowed("coord", "write") == {"flaap.tasks", "flaap.reply.job-1"}
    assert allowed("coord", "read") == {"flaap.replies", "flaap.reply.job-1"}
    assert allowed("coord", "configure") == {"flaap.reply.job-1"}


def test_prefix_is_escaped_in_permissions(tmp_path):
    d = _build(tmp_path, prefix="acme.fl")
    assert _may(d, "a", "read", "acme.fl.silo.a")
    assert not _may(d, "a", "read", "acmeXfl.silo.a")


def _policy_for(document: dict, queue: str) -> dict | None:
    """The policy RabbitMQ applies to `queue`: the matching one of highest priority."""
    matching = [p for p in document["policies"] if re.search(p["pattern"], queue)]
    return max(matching, key=lambda p: p["priority"], default=None)


def test_policies_bound_reply_silo_and_dead_letter_queues(tmp_path):
    d = _build(tmp_path, prefix="acme.fl")
    bounds = definitions.Bounds()
    expected = {
        "acme.fl.reply.job-1": (bounds.reply_queue_max_bytes, "reject-publish"),
        "acme.fl.silo.a": (bounds.silo_queue_max_bytes, "reject-publish"),
        "acme.fl.dead-letter": (bounds.dead_letter_max_bytes, "drop-head"),
    }
    for queue, (max_bytes, overflow) in expected.items():
        policy = _policy_for(d, queue)
        assert policy is not None, f"no policy bounds {queue}"
        assert policy["definition"] == {"max-length-bytes": max_bytes, "overflow": overflow}
        assert policy["apply-to"] == "queues" and policy["vhost"] == "fed"
    for queue in ("acmeXfl.reply.job-1", "other.silo.a", "acme.fl.dead-letter.x"):
        assert _policy_for(d, queue) is None, queue
    # None repeats a key the clients declare: declared arguments would win
    # over it, and nothing here may change what the code declares.
    declared = {k for q in d["queues"] for k in q["arguments"]}
    assert not {f"x-{k}" for p in d["policies"] for k in p["definition"]} & declared
    # The largest message the broker takes fits in an empty reply queue.
    assert bounds.reply_queue_max_bytes >= 128 * 1024 * 1024


def test_every_user_has_connection_and_channel_limits(tmp_path):
    d = _build(tmp_path, bounds=definitions.Bounds(silo_max_connections=2))
    limits = {u["name"]: u["limits"] for u in d["users"]}
    assert limits["a"] == limits["b"] == {"max-connections": 2, "max-channels": 8}
    assert limits["coord"] == {"max-connections": 16, "max-channels": 32}


def test_cli_prints_the_document_and_fails_in_one_line(tmp_path):
    ok = run_cli(
        "admin", "definitions", "--vhost", "v", "--coordinator", "c", "--silo", "s1",
        "--secrets-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert {u["name"] for u in json.loads(ok.stdout)["users"]} == {"c", "s1"}
    assert "new for c, s1" in ok.stderr
    for args, message in [
        (["--coordinator", "a", "--silo", "a"], "own name"),
        (["--coordinator", "c", "--silo", "bad.id"], "silo id 'bad.id'"),
    ]:
        bad = run_cli(
            "admin", "definitions", "--vhost", "v", *args, "--secrets-dir", str(tmp_path / "t")
        )
        assert bad.returncode == 1
        assert "Traceback" not in bad.stderr
        assert bad.stderr.strip().count("\n") == 0
        assert message in bad.stderr
