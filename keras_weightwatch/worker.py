"""A background worker behind a bounded queue.

The training thread hands each captured snapshot to `Worker.submit`, which
blocks while the queue is full (back-pressure: memory stays bounded by
`maxsize + 1` snapshots instead of growing when writing is slower than
training). Errors raised by the handler are kept, in order, for the training
thread to collect with `pop_errors`; the worker goes on with the next job.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from .scratch import kept

_STOP = object()


class Worker:
    """Runs `handler(job)` for each submitted job on one daemon thread, in order."""

    def __init__(self, handler: Callable[[Any], None], maxsize: int = 1, name: str = "weightwatch"):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1. Received: maxsize={maxsize}")
        self._handler = handler
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with kept():  # the scratch buffers of the last worker, already mapped in
            self._loop()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                self._handler(job)
            except BaseException as e:  # kept for the training thread; never lost
                with self._lock:
                    self._errors.append(e)
            finally:
                self._queue.task_done()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Any) -> None:
        """Queue a job, waiting while the queue is full."""
        while True:
            if not self._thread.is_alive():
                raise RuntimeError("the weightwatch worker thread has stopped")
            try:
                self._queue.put(job, timeout=0.5)
                return
            except queue.Full:
                continue

    def offer(self, job: Any) -> bool:
        """Queue a job if there is room now; False (nothing queued) when the queue is full."""
        if not self._thread.is_alive():
            raise RuntimeError("the weightwatch worker thread has stopped")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def join(self) -> None:
        """Wait until every job submitted so far is handled."""
        self._queue.join()

    def pop_errors(self) -> list[BaseException]:
        """The errors raised by the handler since the last call, oldest first."""
        with self._lock:
            errors, self._errors = self._errors, []
        return errors

    def close(self) -> None:
        """Finish every queued job, then stop the thread. Safe to call twice."""
        if self._thread.is_alive():
            self.submit(_STOP)
            self._thread.join()
