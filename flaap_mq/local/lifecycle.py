"""`Lifecycle`: `with` for a broker this process starts, always cleaned up.

`PrivateBrokerNode` and `TestcontainersBroker` are both started on entering a
`with` block and closed on leaving it, and closed as well when starting fails
halfway (a node process or a container may already exist); written once here.
"""

from __future__ import annotations

import abc
import contextlib
from types import TracebackType
from typing import Self


class Lifecycle(abc.ABC):
    """`start()` on entering a `with` block, `close()` on leaving it or when `start()` fails."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the broker; may leave something behind for `close()` when it fails."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the broker and remove whatever it left; safe to call at any point."""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            # The start failure is the error to report, not a failure to clean up after it.
            with contextlib.suppress(Exception):
                self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
