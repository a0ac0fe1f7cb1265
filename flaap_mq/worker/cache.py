"""The single-flight results cache: each task id runs once per worker process.

A task is redelivered when its ack was lost (a connection dropped, a reply
not confirmed): the redelivery is answered with the result kept here rather
than run twice, and a duplicate that arrives while the first delivery still
runs waits for that run. Bounded in bytes; a result larger than the whole
cache is not kept, so a redelivery of that task runs it again (Compute and
CreateValue are safe to repeat; a duplicate value is only memory until its
executor is disposed).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

import cachetools

from flaap_mq.worker.outcome import Outcome


class ResultCache:
    """Recent outcomes by task id, at most `max_bytes` of serialized results."""

    def __init__(self, max_bytes: int) -> None:
        self._results: cachetools.LRUCache[str, Outcome] = cachetools.LRUCache(
            maxsize=max_bytes, getsizeof=lambda outcome: outcome.size
        )
        self._running: dict[str, concurrent.futures.Future[Outcome]] = {}
        self._lock = threading.Lock()

    def get_or_run(self, task_id: str, run: Callable[[], Outcome]) -> Outcome:
        """The outcome of `task_id`: kept, awaited from a run in progress, or `run()` now.

        An outcome not from this call's own `run` comes back `cached=True`.
        An exception from `run` reaches the duplicates waiting for it, and
        nothing is kept.
        """
        with self._lock:
            cached = self._results.get(task_id)
            if cached is not None:
                return cached._replace(cached=True)
            running = self._running.get(task_id)
            if running is None:
                running = concurrent.futures.Future()
                self._running[task_id] = running
                owner = True
            else:
                owner = False
        if not owner:
            return running.result()._replace(cached=True)
        try:
            outcome = run()
            running.set_result(outcome)
            return outcome
        except BaseException as e:
            running.set_exception(e)
            raise
        finally:
            with self._lock:
                self._running.pop(task_id, None)
                if running.done() and not running.exception():
                    outcome = running.result()
                    if outcome.size <= self._results.maxsize:
                        self._results[task_id] = outcome
