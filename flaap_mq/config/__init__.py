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

The package, one step each: `locate.py` (which file), `file.py` (reading one
file), `federations.py` (which `[federations.NAME]` table), `keys.py` (the
known keys and the check of each value), `settings.py` (the precedence, and
`load_config`). Everything is importable from `flaap_mq.config`, as before
it was a package.
"""

from __future__ import annotations

from flaap_mq.config.federations import FEDERATIONS
from flaap_mq.config.file import PYPROJECT_TABLE, ConfigFile, read_config_file
from flaap_mq.config.keys import KEYS
from flaap_mq.config.locate import (
    CONFIG_ENV,
    LOCAL_CONFIG_FILE,
    default_config_paths,
    find_config_file,
)
from flaap_mq.config.settings import (
    DEFAULT_PREFIX,
    DEFAULT_QUEUE_TYPE,
    MANAGEMENT_URL_ENV,
    SILO_ID_ENV,
    Settings,
    load_config,
    resolve_settings,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_PREFIX",
    "DEFAULT_QUEUE_TYPE",
    "FEDERATIONS",
    "KEYS",
    "LOCAL_CONFIG_FILE",
    "MANAGEMENT_URL_ENV",
    "PYPROJECT_TABLE",
    "SILO_ID_ENV",
    "ConfigFile",
    "Settings",
    "default_config_paths",
    "find_config_file",
    "load_config",
    "read_config_file",
    "resolve_settings",
]
