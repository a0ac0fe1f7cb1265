"""One config file read and checked: TOML parsed, the federation merged, secrets guarded.

`read_config_file` reads a `flaap-mq.toml` (or the `[tool.flaap-mq]` table of a
`pyproject.toml`), picks the federation (`federations.py`), checks every value
(`keys.py`), refuses a password in a file open to its group or others, and
makes relative paths relative to the file. A `ValueError` names the file and
the key, never a URL's password.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flaap_mq.config.federations import FEDERATIONS, pick_federation
from flaap_mq.config.keys import PATH_KEYS, SECRET_KEYS, check_value, holds_password

# The table of a pyproject.toml that holds the settings (Flower: [tool.flwr]).
PYPROJECT_TABLE = ("tool", "flaap-mq")


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
    chosen, table = pick_federation(path, where, data, federation)
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
            values[key] = check_value(path, f"{scope}{key}", key, value)
    if values.get("broker_url") is not None and values.get("broker_url_file") is not None:
        raise ValueError(
            f"config file {path}: give broker_url or broker_url_file, not both "
            "(prefer broker_url_file)"
        )
    shared_mode = mode & (stat.S_IRWXG | stat.S_IRWXO)
    for key in SECRET_KEYS:
        if values.get(key) and holds_password(values[key]) and shared_mode:
            raise ValueError(
                f"config file {path}: {key} holds a password, but the file is open to its "
                f"group or others (mode {stat.S_IMODE(mode):04o}); move the URL to a file of "
                f"its own and name it in broker_url_file, or chmod 600 {path}"
            )
    for key in PATH_KEYS:
        if values.get(key):
            values[key] = str(path.parent / os.path.expanduser(values[key]))
    return ConfigFile(path, chosen, values)
