"""Silo workers that each serve their own data directory, for the demo and tests.

Each worker is started exactly as an operator would start
`flaap-mq worker --silo-id S --data-dir DIR/S` on each silo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from flaap_mq.local.workers import WorkerFleet


class SiloDataFleet(WorkerFleet):
    """A `WorkerFleet` whose worker for silo S runs with `--data-dir data_dirs[S]`."""

    def __init__(
        self,
        broker_url: str,
        data_dirs: Mapping[str, str | os.PathLike[str]],
        **kwargs: object,
    ) -> None:
        resolved = {silo: Path(d).resolve() for silo, d in data_dirs.items()}
        for silo, d in resolved.items():
            if not d.is_dir():
                raise FileNotFoundError(f"data directory of silo {silo!r} does not exist: {d}")
        super().__init__(
            broker_url,
            list(resolved),
            per_silo_args={silo: ["--data-dir", str(d)] for silo, d in resolved.items()},
            **kwargs,  # type: ignore[arg-type]
        )
        self.data_dirs = resolved
