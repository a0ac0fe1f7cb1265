"""Silo workers that each serve their own data directory, for the demo and tests.

`WorkerFleet` gives every worker the same arguments; silos with data need one
`--data-dir` each. This is the same fleet, started exactly as an operator
would start `flaap-mq worker --silo-id S --data-dir DIR/S` on each silo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from flaap_mq.testing.workers import WorkerFleet, WorkerProcess


class SiloDataFleet(WorkerFleet):
    """A `WorkerFleet` whose worker for silo S runs with `--data-dir data_dirs[S]`."""

    def __init__(
        self,
        broker_url: str,
        data_dirs: Mapping[str, str | os.PathLike[str]],
        **kwargs: object,
    ) -> None:
        super().__init__(broker_url, list(data_dirs), **kwargs)  # type: ignore[arg-type]
        self.data_dirs = {silo: Path(d).resolve() for silo, d in data_dirs.items()}
        for silo, d in self.data_dirs.items():
            if not d.is_dir():
                raise FileNotFoundError(f"data directory of silo {silo!r} does not exist: {d}")

    def start_worker(self, silo_id: str, *, wait: bool = True) -> WorkerProcess:
        log_path = self._log_dir / f"worker-{silo_id}.log" if self._log_dir else None
        worker = WorkerProcess(
            self.broker_url,
            silo_id,
            prefix=self.prefix,
            extra_args=[*self._extra_args, "--data-dir", str(self.data_dirs[silo_id])],
            log_path=log_path,
        )
        self.workers[silo_id] = worker
        if wait:
            self.wait_consuming([silo_id])
        return worker
