"""Which config file a command reads: `--config`, `$FLAAP_MQ_CONFIG`, or a default path.

A file named by the flag or the variable must exist (a typo must not silently
fall back to another federation's settings); the default paths,
`./flaap-mq.toml` then `$XDG_CONFIG_HOME/flaap-mq/config.toml`, are used only
if they exist. Finding a file is apart from reading it (`file.py`), so that
`--config` errors come before any TOML is parsed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CONFIG_ENV = "FLAAP_MQ_CONFIG"
LOCAL_CONFIG_FILE = "flaap-mq.toml"


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
