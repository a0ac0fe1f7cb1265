"""Which federation of a config file to use: `[federations.NAME]`, as Flower has them.

Top-level keys are shared; a `[federations.NAME]` table adds to or overrides
them; `default = "NAME"` in `[federations]` picks one when `--federation`
does not, and a file with a single federation needs neither. Only the choice
of the table is made here (pure; no I/O); `file.py` merges it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FEDERATIONS = "federations"


def pick_federation(
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
