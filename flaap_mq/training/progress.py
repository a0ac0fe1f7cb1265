"""Log lines printed above `flaap-mq train`'s progress bar, so they do not tear it.

`train` draws a tqdm bar on stderr; a log line written to stderr meanwhile
would land in the middle of it. The CLI's log output goes through
`TqdmStream` instead, which hands each whole line to `tqdm.write`.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from flaap_mq.logs import redirect_cli_output


class TqdmStream:
    """A text stream whose lines are printed above the progress bars (`tqdm.write`)."""

    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            tqdm.write(line, file=self._file or sys.stderr)
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            tqdm.write(self._buffer, file=self._file or sys.stderr)
            self._buffer = ""


def route_logs_above_progress_bars() -> None:
    """The CLI's log lines are printed with `tqdm.write`, so they do not tear the bar."""
    redirect_cli_output(TqdmStream())
