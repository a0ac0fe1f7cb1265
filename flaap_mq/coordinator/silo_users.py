"""Which broker user may answer for each silo: the coordinator's check of who replied.

Every reply carries the AMQP `user_id` property, which RabbitMQ refuses unless
it is the sender's own login; the coordinator accepts a reply only from the
user of the silo the task went to (`TaskClient`, `reply_from_wrong_user`).

The check is on by default: unless the coordinator logs in as `guest` (local
development, where everyone shares that login), each silo must answer as the
broker user named after it, which is what `flaap-mq admin definitions`
creates. A federation whose silos log in under other names says so with a
mapping; one where every party shares a single login (so that the broker
cannot tell them apart) turns the check off with `ANY_USER`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from flaap_mq.broker.address import parse_broker_urls

ANY_USER: Literal["any"] = "any"
SHARED_DEVELOPMENT_LOGIN = "guest"

SiloUsers = Mapping[str, str] | Literal["any"] | None


def reply_users(
    broker_url: str | None, silos: Sequence[str], silo_users: SiloUsers
) -> dict[str, str] | None:
    """Silo id -> the broker user whose replies are accepted for it; None accepts anyone.

    Args:
      broker_url: the coordinator's URL (`None` reads the environment); only
        its login is looked at, when `silo_users` is None.
      silos: the silo ids.
      silo_users: a mapping (used as given; the `TaskClient` refuses one that
        misses a silo), `ANY_USER` (no check), or None: each silo's own id,
        unless every broker node is logged into as `guest`.
    """
    if silo_users is None:
        logins = {a.username for a in parse_broker_urls(broker_url)}
        if logins == {SHARED_DEVELOPMENT_LOGIN}:
            return None
        return {silo: silo for silo in silos}
    if isinstance(silo_users, str):
        if silo_users != ANY_USER:
            raise ValueError(
                f"silo_users must be a mapping silo id -> broker user, None (each silo's "
                f"own id unless the login is guest) or {ANY_USER!r} (no check), "
                f"got {silo_users!r}"
            )
        return None
    return dict(silo_users)


def parse_silo_user_options(
    options: Sequence[str], silos: Sequence[str], *, any_user: bool
) -> SiloUsers:
    """`--silo-user SILO=USER` (repeatable) and `--any-silo-user` as a `silo_users` value.

    Silos not named keep the default, their own id; no option at all is None
    (the default of `reply_users`, which also allows a guest login).
    """
    if any_user:
        if options:
            raise ValueError("give --silo-user or --any-silo-user, not both")
        return ANY_USER
    if not options:
        return None
    users = {silo: silo for silo in silos}
    for option in options:
        silo, equals, user = option.partition("=")
        if not equals or not silo or not user:
            raise ValueError(f"--silo-user wants SILO=USER, got {option!r}")
        if silo not in users:
            raise ValueError(f"--silo-user {option!r}: {silo!r} is not one of the --silo ids")
        users[silo] = user
    return users
