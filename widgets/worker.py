"""The dashboard's worker: runs its jobs one at a time, off the notebook's thread.

Every server call of a dashboard happens inside a job, so the notebook never freezes
and two calls never race on one session. A job submitted with ``coalesce=True``
replaces a queued job of the same name (slider moves: only the latest value runs).
``cancel()`` drops the queue and tells the running job to stop at its next step; it
is an epoch counter, so a job that starts just after a cancel is not stopped by it.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import djinn_nb as dj


class Worker:
    """One daemon thread at a time (started on demand, ends when the queue is empty);
    with ``background=False`` jobs run in the calling thread, in order."""

    def __init__(self, on_start: Callable[[str], None],
                 on_end: Callable[[Optional[BaseException], bool], None], background: bool = True):
        self.background = background
        self._on_start, self._on_end = on_start, on_end
        self._jobs: list = []                 # (name, fn, epoch)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._idle = threading.Event()
        self._idle.set()
        self._epoch = 0                       # bumped by cancel()
        self._running_epoch = 0

    def submit(self, name: str, fn: Callable[[], None], coalesce: bool = False) -> None:
        with self._lock:
            if coalesce:
                self._jobs = [j for j in self._jobs if j[0] != name]
            self._jobs.append((name, fn, self._epoch))
            if not self.background or self._thread is not None:
                start = False
            else:
                self._idle.clear()
                self._thread = threading.Thread(target=self._drain, name="djinn-dashboard",
                                                daemon=True)
                start = True
        if start:
            self._thread.start()
        elif not self.background:
            self._drain_inline()

    def cancel(self) -> None:
        """Drop queued jobs; the running one sees ``stop_requested`` from now on."""
        with self._lock:
            self._epoch += 1
            self._jobs.clear()

    @property
    def stop_requested(self) -> bool:
        return self._running_epoch != self._epoch

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def wait(self, timeout: float = 120.0) -> None:
        if not self._idle.wait(timeout):
            raise TimeoutError(f"the dashboard was still busy after {timeout} s")

    def _next(self):
        with self._lock:
            if not self._jobs:
                self._thread = None
                self._idle.set()
                return None
            return self._jobs.pop(0)

    def _drain(self) -> None:
        while (job := self._next()) is not None:
            self._run(*job)

    def _drain_inline(self) -> None:
        if self.busy:             # a job submitted from inside a running job: runs after it
            return
        self._idle.clear()
        try:
            while (job := self._next()) is not None:
                self._run(*job)
        finally:
            self._idle.set()

    def _run(self, name: str, fn: Callable[[], None], epoch: int) -> None:
        self._running_epoch = epoch
        self._on_start(name)
        error = None
        try:
            fn()
        except Exception as exc:   # shown in the dashboard; a bug of ours must not kill the thread
            error = exc
        # on_end(error, unexpected): anything but a djinn_nb error is most likely a bug
        self._on_end(error, error is not None and not isinstance(error, dj.DjinnError))
