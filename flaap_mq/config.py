"""The federation's settings in one TOML file, merged with flags and the environment.

Why: `status`, `topology`, `train`, `worker` and a user's program all need
the same broker URL, silo list, prefix and TLS files; spelled out as flags on
every command they drift apart. One file (Flower keeps its federations in
`pyproject.toml`, Celery its settings in one config module, with the same
lower-case names as the code's arguments) says them once:

    # flaap-mq.toml
    broker_url_file = "/etc/flaap-mq/coordinator.url"   # relative paths: from this file
    silos = ["hospital-a", "hospital-b", "hospital-c"]
    prefix = "flaap"
    queue_type = "quorum"
    ca_file = "ca.pem"
    management_url = "https://broker.example.org:15671"
    min_silos = 2        # a round completes over at least 2 silos (default: all must answer)
    silo_grace = 60      # seconds a silo's queue may have no worker before it is lost

Several federations in one file, as Flower's `[tool.flwr.federations]`:
top-level keys are shared, `[federations.NAME]` tables add or override, and
`default = "NAME"` in `[federations]` picks one when `--federation` does not.
In a `pyproject.toml` the same keys live under `[tool.flaap-mq]`.

Which file (`find_config_file`): `--config PATH`, else `$FLAAP_MQ_CONFIG`,
else the first of `./flaap-mq.toml` and `$XDG_CONFIG_HOME/flaap-mq/config.toml`
(`~/.config/...`) that exists, else none. A file named explicitly must exist.

Precedence (`resolve_settings`): a flag, else its environment variable, else
the config file, else the built-in default. The environment beats the file
because it is the per-process, per-deployment part (systemd's
`LoadCredential=` hands a worker `$FLAAP_MQ_BROKER_URL_FILE`), while the file
is shared by everyone who runs commands for the federation.

Secrets: prefer `broker_url_file` (a 0600 file of its own) to `broker_url`.
A `broker_url` or `management_url` holding a password (other than RabbitMQ's
well-known local `guest:guest`) is refused unless the config file is readable
by its owner only (mode 0600 or 0400): the file is meant to be shared and
read by many, a password in it would be too. Errors name the file and the
key, never a URL's password.

Nothing here imports TensorFlow: a bad value fails in a moment.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import stat
import tomllib
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
from flaap_mq.broker.urls import redact_url, split_broker_urls
from flaap_mq.protocol.topology import QueueType, validate_id

CONFIG_ENV = "FLAAP_MQ_CONFIG"
SILO_ID_ENV = "FLAAP_MQ_SILO_ID"
MANAGEMENT_URL_ENV = "FLAAP_MQ_MANAGEMENT_URL"
LOCAL_CONFIG_FILE = "flaap-mq.toml"
DEFAULT_PREFIX = "flaap"
DEFAULT_QUEUE_TYPE = QueueType.QUORUM.value
# The table of a pyproject.toml that holds the settings (Flower: [tool.flwr]).
PYPROJECT_TABLE = ("tool", "flaap-mq")
FEDERATIONS = "federations"

# Every key a config file may hold, and what it is (for errors).
_STRING_KEYS = {
    "broker_url": "an AMQP URL (or several, comma-separated)",
    "broker_url_file": "the path of a file holding the broker URL",
    "prefix": "the topology prefix",
    "queue_type": "'quorum' or 'classic'",
    "ca_file": "the path of a PEM CA file",
    "cert_file": "the path of a PEM client certificate",
    "key_file": "the path of a PEM client key",
    "management_url": "the RabbitMQ management API's URL",
    "silo_id": "this worker's silo id",
}
_PATH_KEYS = ("broker_url_file", "ca_file", "cert_file", "key_file")
# Values never quoted in an error: they may hold a password.
_SECRET_KEYS = ("broker_url", "management_url")
# Numbers: silos that drop out (`create_execution_context`'s `min_silos`, `silo_grace`).
_NUMBER_KEYS = {
    "min_silos": "a whole number of silos, at least 1",
    "silo_grace": "a positive number of seconds",
}
KEYS = (*_STRING_KEYS, "silos", *_NUMBER_KEYS)
_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
_GUEST_LOGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://guest:guest@", re.IGNORECASE)


def default_config_paths(
    environ: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Where a config file is looked for when none is named, in order."""
    env = os.environ if environ is None else environ
    config_home = env.get("XDG_CONFIG_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".config"
    )
    return [
        Path(cwd or os.getcwd()) / LOCAL_CONFIG_FILE,
        Path(config_home) / "flaap-mq" / "config.toml",
    ]


def find_config_file(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> tuple[Path | None, str]:
    """The config file to read and what named it (`--config`, `$FLAAP_MQ_CONFIG`, "default").

    A file named by the flag or the variable must exist (a typo must not
    silently fall back to another federation's settings); the default paths
    are used only if they exist. `(None, "none")` when there is no file.
    """
    env = os.environ if environ is None else environ
    for given, origin in ((path, "--config"), (env.get(CONFIG_ENV) or None, f"${CONFIG_ENV}")):
        if given is None:
            continue
        found = Path(cwd or os.getcwd()) / os.path.expanduser(os.fspath(given))
        if not found.is_file():
            what = "is not a file" if found.exists() else "does not exist"
            raise ValueError(f"config file {found} ({origin}) {what}")
        return found, origin
    for candidate in default_config_paths(env, cwd):
        if candidate.is_file():
            return candidate, "default"
    return None, "none"


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """What one config file says, validated; paths made absolute. Empty when there is none."""

    path: Path | None = None
    federation: str | None = None
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def origin(self, key: str) -> str:
        """`key in FILE`, for messages."""
        where = f"federations.{self.federation}." if self.federation else ""
        return f"{where}{key} in {self.path}"

    def __repr__(self) -> str:
        keys = sorted(self.values)
        return f"ConfigFile(path={self.path}, federation={self.federation}, keys={keys})"


def read_config_file(path: str | os.PathLike[str], federation: str | None = None) -> ConfigFile:
    """Reads and checks one config file; a `ValueError` names the file and the key.

    Unknown keys are errors (with the nearest known key as a hint): a
    misspelt `silo` must not silently mean "no silos".
    """
    path = Path(path).absolute()
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        # tomllib's messages give line and column, never the text itself.
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ValueError(f"config file {path} cannot be read: {e.strerror or e}") from None
    where = ""
    if path.name == "pyproject.toml":
        for part in PYPROJECT_TABLE:
            data = data.get(part)
            if not isinstance(data, dict):
                raise ValueError(f"config file {path} has no [tool.flaap-mq] table")
        where = "tool.flaap-mq."
    chosen, table = _pick_federation(path, where, data, federation)
    values: dict[str, Any] = {}
    shared = {k: v for k, v in data.items() if k != FEDERATIONS}
    if chosen is not None and {"broker_url", "broker_url_file"} & table.keys():
        # A federation naming its own broker replaces the shared one, whichever key.
        shared = {k: v for k, v in shared.items() if k not in ("broker_url", "broker_url_file")}
    scopes = [(where, shared)]
    if chosen is not None:
        scopes.append((f"{where}{FEDERATIONS}.{chosen}.", table))
    for scope, keys in scopes:
        for key, value in keys.items():
            values[key] = _check_value(path, f"{scope}{key}", key, value)
    if values.get("broker_url") is not None and values.get("broker_url_file") is not None:
        raise ValueError(
            f"config file {path}: give broker_url or broker_url_file, not both "
            "(prefer broker_url_file)"
        )
    shared_mode = mode & (stat.S_IRWXG | stat.S_IRWXO)
    for key in _SECRET_KEYS:
        if values.get(key) and _holds_password(values[key]) and shared_mode:
            raise ValueError(
                f"config file {path}: {key} holds a password, but the file is open to its "
                f"group or others (mode {stat.S_IMODE(mode):04o}); move the URL to a file of "
                f"its own and name it in broker_url_file, or chmod 600 {path}"
            )
    for key in _PATH_KEYS:
        if values.get(key):
            values[key] = str(path.parent / os.path.expanduser(values[key]))
    return ConfigFile(path, chosen, values)


def _pick_federation(
    path: Path, where: str, data: dict[str, Any], federation: str | None
) -> tuple[str | None, dict[str, Any]]:
    """The federation to use and its table: `[federations.NAME]`, or (None, the whole file)."""
    federations = data.get(FEDERATIONS)
    if federations is None:
        if federation is not None:
            raise ValueError(f"config file {path} has no [{where}{FEDERATIONS}.{federation}] table")
        return None, data
    if not isinstance(federations, dict):
        raise ValueError(f"config file {path}: {where}{FEDERATIONS} must be a table")
    default = federations.get("default")
    if default is not None and not isinstance(default, str):
        raise ValueError(f"config file {path}: {where}{FEDERATIONS}.default must be a string")
    named = {k: v for k, v in federations.items() if k != "default"}
    for name, table in named.items():
        if not isinstance(table, dict):
            raise ValueError(
                f"config file {path}: {where}{FEDERATIONS}.{name} must be a table "
                f"([{where}{FEDERATIONS}.{name}])"
            )
    name = federation or default
    if name is None:
        if len(named) != 1:
            raise ValueError(
                f"config file {path} has federations {sorted(named)}: say which with "
                f'--federation, or default = "NAME" in [{where}{FEDERATIONS}]'
            )
        name = next(iter(named))
    if name not in named:
        raise ValueError(f"config file {path} has no federation {name!r} (it has {sorted(named)})")
    return name, named[name]


def _check_value(path: Path, dotted: str, key: str, value: Any) -> Any:
    """`value` if it fits `key`; else a `ValueError` naming file and key (never a secret)."""
    if key not in KEYS:
        near = difflib.get_close_matches(key.replace("-", "_"), KEYS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(KEYS)}"
        raise ValueError(f"config file {path}: unknown key {dotted!r}{hint}")
    if key == "silos":
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError(f"config file {path}: {dotted} must be a list of silo id strings")
        try:
            silos = [validate_id("silo", s) for s in value]
        except ValueError as e:
            raise ValueError(f"config file {path}: {dotted}: {e}") from None
        if len(set(silos)) != len(silos):
            raise ValueError(f"config file {path}: {dotted} names a silo twice")
        return tuple(silos)
    if key in _NUMBER_KEYS:
        whole = isinstance(value, int) and not isinstance(value, bool)
        number = whole or isinstance(value, float)
        if (key == "min_silos" and not (whole and value >= 1)) or not number or value <= 0:
            raise ValueError(
                f"config file {path}: {dotted} must be {_NUMBER_KEYS[key]}, got {value!r}"
            )
        return value
    if not isinstance(value, str) or not value.strip():
        shown = "" if key in _SECRET_KEYS else f", got {value!r}"
        raise ValueError(
            f"config file {path}: {dotted} must be a non-empty string, {_STRING_KEYS[key]}{shown}"
        )
    if key == "queue_type" and value not in {q.value for q in QueueType}:
        raise ValueError(f"config file {path}: {dotted} must be {_STRING_KEYS[key]}, got {value!r}")
    try:
        if key == "silo_id":
            validate_id("silo", value)
        elif key == "prefix" and not _PREFIX.fullmatch(value):
            raise ValueError(f"prefix {value!r} must be 1 to 100 letters, digits, ., - or _")
        elif key == "broker_url":
            parse_broker_urls(value)
    except ValueError as e:
        raise ValueError(f"config file {path}: {dotted}: {e}") from None
    return value


def _holds_password(urls: str) -> bool:
    """Whether any URL of `urls` holds a password (RabbitMQ's local guest:guest aside)."""
    return any(
        redact_url(url) != url and not _GUEST_LOGIN.match(url) for url in split_broker_urls(urls)
    )


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
            config.get(k) and _holds_password(config.get(k)) for k in _SECRET_KEYS
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
