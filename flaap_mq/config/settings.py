"""The federation's settings: each from its flag, else variable, else file, else default.

`resolve_settings` applies that precedence to one `ConfigFile` and checks the
result (ids, the broker URL), naming where a bad value came from;
`load_config` is the whole way from a path (or none) to `Settings`, for a
user's program (`create_execution_context(config=...)`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.credentials import (
    BROKER_URL_ENV,
    BROKER_URL_FILE_ENV,
    DEFAULT_BROKER_URL,
    BrokerUrlSource,
    read_broker_url_file,
    resolve_broker_url,
)
from flaap_mq.broker.tls import CA_FILE_ENV, CERT_FILE_ENV, KEY_FILE_ENV, with_tls_options
from flaap_mq.broker.urls import redact_url
from flaap_mq.config.file import ConfigFile, read_config_file
from flaap_mq.config.keys import SECRET_KEYS, holds_password
from flaap_mq.config.locate import find_config_file
from flaap_mq.protocol.topology import QueueType, validate_id

SILO_ID_ENV = "FLAAP_MQ_SILO_ID"
MANAGEMENT_URL_ENV = "FLAAP_MQ_MANAGEMENT_URL"
DEFAULT_PREFIX = "flaap"
DEFAULT_QUEUE_TYPE = QueueType.QUORUM.value


@dataclasses.dataclass(frozen=True)
class Settings:
    """The federation's settings after flags, environment, config file and defaults.

    `broker_url` and `management_url` may hold a password: they are left out
    of `repr`, which shows the broker URL redacted.
    """

    broker_url: str = dataclasses.field(repr=False)
    # The file the URL was read from (the worker hides it from its executor).
    broker_url_file: str | None
    # Where the URL came from: "--broker-url", "$FLAAP_MQ_BROKER_URL",
    # "broker_url_file in FILE", "default", ...
    broker_url_origin: str
    silos: tuple[str, ...] = ()
    prefix: str = DEFAULT_PREFIX
    queue_type: str = DEFAULT_QUEUE_TYPE
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    management_url: str | None = dataclasses.field(default=None, repr=False)
    silo_id: str | None = None
    min_silos: int | None = None  # None: every silo must answer
    silo_grace: float | None = None  # None: the library's default (60 s)
    config_file: Path | None = None
    # Whether the config file itself holds a password (kept from executors).
    config_holds_secret: bool = False

    @property
    def broker(self) -> str:
        """The broker URL without its password, for messages."""
        return redact_url(self.broker_url)

    @property
    def broker_url_with_tls(self) -> str:
        """`broker_url` with the TLS files set in its query (`with_tls_options`)."""
        return with_tls_options(
            self.broker_url, ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file
        )


def resolve_settings(
    config: ConfigFile,
    *,
    environ: Mapping[str, str] | None = None,
    broker_url: str | None = None,
    broker_url_file: str | None = None,
    silos: Sequence[str] | None = None,
    prefix: str | None = None,
    queue_type: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    management_url: str | None = None,
    silo_id: str | None = None,
    min_silos: int | None = None,
    silo_grace: float | None = None,
) -> Settings:
    """Each setting from the first of: its flag (the argument), its variable, `config`, default.

    Reads the broker URL file that wins, and checks ids and URLs, so a
    mistake fails here, naming where the bad value came from.
    """
    env = os.environ if environ is None else environ

    def pick(flag: Any, variable: str | None, key: str, default: Any = None) -> Any:
        if flag is not None:
            return flag
        if variable and env.get(variable):
            return env[variable]
        value = config.get(key)
        return default if value is None else value

    if (
        broker_url is not None
        or broker_url_file is not None
        or any(env.get(v) for v in (BROKER_URL_FILE_ENV, BROKER_URL_ENV))
    ):
        source = resolve_broker_url(broker_url, broker_url_file, environ=env)
    elif config.get("broker_url_file"):
        origin = config.origin("broker_url_file")
        file = config.get("broker_url_file")
        source = BrokerUrlSource(read_broker_url_file(file, origin=origin), file, origin)
    elif config.get("broker_url"):
        source = BrokerUrlSource(config.get("broker_url"), None, config.origin("broker_url"))
    else:
        source = BrokerUrlSource(DEFAULT_BROKER_URL, None, "default")
    chosen_silos = tuple(silos) if silos else tuple(config.get("silos") or ())
    for silo in chosen_silos:
        validate_id("silo", silo)
    settings = Settings(
        broker_url=source.url,
        broker_url_file=source.file,
        broker_url_origin=source.origin,
        silos=chosen_silos,
        prefix=pick(prefix, None, "prefix", DEFAULT_PREFIX),
        queue_type=QueueType(pick(queue_type, None, "queue_type", DEFAULT_QUEUE_TYPE)).value,
        ca_file=pick(ca_file, CA_FILE_ENV, "ca_file"),
        cert_file=pick(cert_file, CERT_FILE_ENV, "cert_file"),
        key_file=pick(key_file, KEY_FILE_ENV, "key_file"),
        management_url=pick(management_url, MANAGEMENT_URL_ENV, "management_url"),
        silo_id=pick(silo_id, SILO_ID_ENV, "silo_id"),
        min_silos=pick(min_silos, None, "min_silos"),
        silo_grace=pick(silo_grace, None, "silo_grace"),
        config_file=config.path,
        config_holds_secret=any(
            config.get(k) and holds_password(config.get(k)) for k in SECRET_KEYS
        ),
    )
    if settings.silo_id is not None:
        validate_id("silo", settings.silo_id)
    try:
        # The URL alone: TLS files are read (and checked) when connecting.
        parse_broker_urls(settings.broker_url)
    except ValueError as e:
        raise ValueError(f"broker URL from {source.origin}: {e}") from None
    return settings


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    federation: str | None = None,
    environ: Mapping[str, str] | None = None,
    **flags: Any,
) -> Settings:
    """The federation's settings: the config file found (`find_config_file`), env, defaults.

    `path` None looks for `$FLAAP_MQ_CONFIG`, then the default paths; no file
    at all gives the environment's and the defaults' settings. `flags`
    (`broker_url=`, `silos=`, `prefix=`, ... as `resolve_settings`) win over
    everything, as command-line flags do.
    """
    found, _ = find_config_file(path, environ=environ)
    config = read_config_file(found, federation) if found else ConfigFile()
    if found is None and federation is not None:
        raise ValueError(f"--federation {federation}: no config file found")
    return resolve_settings(config, environ=environ, **flags)
