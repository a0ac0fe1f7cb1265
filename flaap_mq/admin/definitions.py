r"""`flaap-mq admin definitions`: a RabbitMQ definitions document for a federation.

The document holds everything a locked-down broker needs, so that no client
ever needs the configure permission on the shared topology:

* the vhost (quorum queues by default);
* the topology, generated from `flaap_mq.protocol.topology`'s declarations
  (the same data the clients declare or check), so the arguments can never
  drift from what the code declares;
* one user per principal (the coordinator, each silo), each with a fresh
  random password stored only as RabbitMQ's salted SHA-256 hash; the clear
  password is written to `SECRETS_DIR/NAME.password` (mode 0600) and nowhere
  else;
* permissions (regular expressions over resource names, see
  https://www.rabbitmq.com/access-control.html):

  - coordinator: configure `^P\.reply\..*$`, write `^(P\.tasks|P\.reply\..*)$`,
    read `^(P\.replies|P\.reply\..*)$`;
  - silo S: configure `^$` (nothing), write `^P\.replies$`, read `^P\.silo\.S$`.

  The coordinator declares its own reply queue (`P.reply.<job>`, with an
  expiry) and binds it to the replies exchange (write on the queue, read on
  the exchange), publishes tasks, and consumes its replies. A silo consumes
  its own queue and publishes replies to the replies exchange, nothing else
  (never the default exchange, which would reach any queue, nor the
  dead-letter exchange: a worker rejects a task it cannot run and the
  broker dead-letters it). Declaring or deleting any shared exchange or queue
  needs the configure permission, which no client has on them: only an
  administrator (`rabbitmqctl`) can. Purging needs read: nobody can purge a
  queue that is not theirs; a silo can purge its own queue, which is no more
  than it can do anyway by consuming its tasks and dropping them;
* bounds on what any one principal can pile up on the broker (`Bounds`):
  policies capping the bytes in reply queues and silo queues (overflow
  `reject-publish`: the publisher gets a nack and keeps the message) and in
  the dead-letter queue (overflow `drop-head`: the oldest dead letters make
  room), and per-user connection and channel limits. A silo flooding a reply
  queue gets nacks, not the broker's memory or disk alarm, which would block
  every publisher (tests/security/test_flood.py).

Re-running with the same `--secrets-dir` keeps each existing password (so
adding a silo does not change the others'); `--rotate` makes new ones.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flaap_mq.protocol import topology

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
PASSWORD_SUFFIX = ".password"
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What any one principal can pile up on the broker; see deploy/rabbitmq/README.md.

    Queue bounds count the bytes of message bodies ready in the queue (not
    those delivered and unacked). RabbitMQ applies one policy per queue, the
    matching one of highest priority: an operator's own policy that matches
    these queues at a priority above `POLICY_PRIORITY` replaces these, so it
    must carry their keys over.
    """

    # A coordinator's reply queue. Its coordinator consumes it at once, so
    # only a coordinator that is away (or a flooding silo) fills it.
    # `reject-publish`: a publisher over the bound gets a nack, which the
    # worker treats as "not confirmed" and retries later; `drop-head` would
    # silently drop the oldest replies, calls the coordinator still awaits.
    # 128 MiB is RabbitMQ's default max_message_size, so the largest message
    # the broker takes still fits in an empty reply queue (a classic queue
    # refuses a message that alone exceeds the bound).
    reply_queue_max_bytes: int = 128 * MIB
    # A silo's task queue: fills while its worker is away, until the tasks
    # expire at their deadlines. `reject-publish`: the coordinator publishes
    # with confirms and fails that call, retryably, naming the silo.
    silo_queue_max_bytes: int = 512 * MIB
    # The dead-letter queue, which only an administrator empties.
    # `drop-head`: the newest dead letters are the ones worth reading, and
    # dead-lettering has no publisher a nack could tell anyway.
    dead_letter_max_bytes: int = 256 * MIB
    # Per user, over all its connections. What a flood holds in the broker's
    # memory on its way to a full queue grows with the connections it comes
    # over (tests/security/test_flood.py). A worker holds one connection
    # with one channel at a time; a hot standby and `flaap-mq topology` with
    # the silo's login take one each; and RabbitMQ 3.10 counts a TLS
    # connection closed by its client for 30 s more (one restart's worth).
    silo_max_connections: int = 4
    silo_max_channels: int = 8
    # One connection per running job (TaskClient), plus tools.
    coordinator_max_connections: int = 16
    coordinator_max_channels: int = 32


# Above policies an operator adds at the default priority 0.
POLICY_PRIORITY = 10


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password)).

    The salt is 4 random bytes, as RabbitMQ makes it.
    """
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ's password hashes use a 4-byte salt")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def check_password(password: str, password_hash: str) -> bool:
    """True if `password` is the one `password_hash` was made from."""
    raw = base64.b64decode(password_hash)
    return hash_password(password, raw[:4]) == password_hash


def permissions_for(
    names: topology.Names, coordinator: str, silos: Sequence[str], vhost: str
) -> list[dict[str, str]]:
    """The permission entries; see the module docstring for the table."""
    p = re.escape(names.prefix)
    reply_queues = f"{p}\\.reply\\..*"
    entries = [
        {
            "user": coordinator,
            "vhost": vhost,
            "configure": f"^{reply_queues}$",
            "write": f"^({re.escape(names.tasks_exchange)}|{reply_queues})$",
            "read": f"^({re.escape(names.replies_exchange)}|{reply_queues})$",
        }
    ]
    for silo in silos:
        entries.append(
            {
                "user": silo,
                "vhost": vhost,
                "configure": "^$",
                # Replies only: the dead-letter queue gets a silo's tasks
                # through the broker (a reject), never from the silo.
                "write": f"^{re.escape(names.replies_exchange)}$",
                "read": f"^{re.escape(names.silo_queue(silo))}$",
            }
        )
    return entries


def policies_for(names: topology.Names, vhost: str, bounds: Bounds) -> list[dict[str, Any]]:
    """Queue policies bounding reply queues, silo queues and the dead-letter queue.

    They add to the arguments the clients declare (which they do not
    repeat, so nothing is inequivalent); quorum and classic queues both
    support these keys.
    """
    p = re.escape(names.prefix)

    def policy(name: str, pattern: str, max_bytes: int, overflow: str) -> dict[str, Any]:
        return {
            "vhost": vhost,
            "name": f"{names.prefix}-{name}",
            "pattern": pattern,
            "apply-to": "queues",
            "priority": POLICY_PRIORITY,
            "definition": {"max-length-bytes": max_bytes, "overflow": overflow},
        }

    return [
        policy("reply-queues", f"^{p}\\.reply\\.", bounds.reply_queue_max_bytes, "reject-publish"),
        policy("silo-queues", f"^{p}\\.silo\\.", bounds.silo_queue_max_bytes, "reject-publish"),
        policy(
            "dead-letter",
            f"^{re.escape(names.dead_letter_queue)}$",
            bounds.dead_letter_max_bytes,
            "drop-head",
        ),
    ]


def topology_entries(
    declarations: Sequence[topology.Declaration], vhost: str
) -> dict[str, list[dict[str, Any]]]:
    """The exchanges, queues and bindings sections, from topology declarations."""
    out: dict[str, list[dict[str, Any]]] = {"exchanges": [], "queues": [], "bindings": []}
    for decl in declarations:
        match decl:
            case topology.Exchange():
                out["exchanges"].append(
                    {
                        "name": decl.name,
                        "vhost": vhost,
                        "type": decl.type,
                        "durable": decl.durable,
                        "auto_delete": False,
                        "internal": False,
                        "arguments": {},
                    }
                )
            case topology.Queue():
                out["queues"].append(
                    {
                        "name": decl.name,
                        "vhost": vhost,
                        "durable": decl.durable,
                        "auto_delete": False,
                        "arguments": dict(decl.arguments),
                    }
                )
            case topology.Binding():
                out["bindings"].append(
                    {
                        "source": decl.exchange,
                        "vhost": vhost,
                        "destination": decl.queue,
                        "destination_type": "queue",
                        "routing_key": decl.routing_key,
                        "arguments": {},
                    }
                )
    return out


def _password_for(secrets_dir: Path, user: str, rotate: bool) -> tuple[str, bool]:
    """The user's password and whether it is new; new ones are written mode 0600."""
    path = secrets_dir / f"{user}{PASSWORD_SUFFIX}"
    if path.exists() and not rotate:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ValueError(
                f"{path} is readable by others (mode {mode:o}); chmod 600 it or use --rotate"
            )
        password = path.read_text().strip()
        if len(password) < 16:
            raise ValueError(f"{path} holds a password under 16 characters; use --rotate")
        return password, False
    password = secrets.token_urlsafe(24)  # 32 URL-safe characters: no escaping in a URL
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return password, True


def build_definitions(
    *,
    vhost: str,
    coordinator: str,
    silos: Sequence[str],
    secrets_dir: str | os.PathLike[str],
    prefix: str = "flaap",
    queue_type: str = "quorum",
    rotate: bool = False,
    bounds: Bounds = Bounds(),
) -> tuple[dict[str, Any], list[str]]:
    """The definitions document, and the users whose password is new."""
    if not vhost:
        raise ValueError("the vhost name must not be empty")
    if not silos:
        raise ValueError("give at least one --silo")
    topology.validate_id("coordinator", coordinator)
    for silo in silos:
        topology.validate_id("silo", silo)
    principals = [coordinator, *silos]
    duplicates = sorted({p for p in principals if principals.count(p) > 1})
    if duplicates:
        raise ValueError(f"each principal needs its own name; given more than once: {duplicates}")
    names = topology.Names(prefix)
    declarations = topology.shared_declarations(names) + topology.silo_declarations(
        names, silos, topology.QueueType(queue_type)
    )

    directory = Path(secrets_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    users = []
    new = []
    for principal in principals:
        password, is_new = _password_for(directory, principal, rotate)
        if is_new:
            new.append(principal)
        users.append(
            {
                "name": principal,
                "password_hash": hash_password(password),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": [],
                "limits": (
                    {
                        "max-connections": bounds.coordinator_max_connections,
                        "max-channels": bounds.coordinator_max_channels,
                    }
                    if principal == coordinator
                    else {
                        "max-connections": bounds.silo_max_connections,
                        "max-channels": bounds.silo_max_channels,
                    }
                ),
            }
        )
    document: dict[str, Any] = {
        "users": users,
        "vhosts": [
            {
                "name": vhost,
                "metadata": {
                    "description": f"flaap-mq federation (prefix {prefix!r})",
                    "tags": [],
                    "default_queue_type": "quorum",
                },
            }
        ],
        "permissions": permissions_for(names, coordinator, silos, vhost),
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": policies_for(names, vhost, bounds),
        **topology_entries(declarations, vhost),
    }
    return document, new


def print_definitions(
    *,
    vhost: str,
    coordinator: str,
    silos: Sequence[str],
    secrets_dir: str,
    prefix: str,
    queue_type: str,
    rotate: bool,
) -> int:
    """The CLI command: the document on stdout, what was done on stderr."""
    document, new = build_definitions(
        vhost=vhost,
        coordinator=coordinator,
        silos=silos,
        secrets_dir=secrets_dir,
        prefix=prefix,
        queue_type=queue_type,
        rotate=rotate,
    )
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    kept = [u["name"] for u in document["users"] if u["name"] not in new]
    print(
        f"flaap-mq admin definitions: vhost {vhost!r}, prefix {prefix!r}; passwords in "
        f"{secrets_dir}/NAME{PASSWORD_SUFFIX}"
        + (f"; new for {', '.join(new)}" if new else "")
        + (f"; kept for {', '.join(kept)}" if kept else ""),
        file=sys.stderr,
    )
    return 0
