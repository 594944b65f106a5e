"""Tokens decoded per model and their rate over a sliding window: the server's load figure
``tokens_per_s`` (the cluster directory's load record, ``cluster_load``).

The decode loop (kernel_server.runtime.generation, solo and engine paths alike; batch calls
in kernel_server.runtime.batch) calls ``count(model)`` once per generated token. A count
is one lock, one clock read and an add into a quarter-second bucket; ``rate()`` sums the
buckets of the last ``WINDOW_S`` seconds.
"""
from __future__ import annotations

import collections
import os
import threading
import time

#: the window of ``tokens_per_s``, in seconds ($DJINN_THROUGHPUT_WINDOW_S)
WINDOW_S = float(os.environ.get("DJINN_THROUGHPUT_WINDOW_S", "10"))
#: buckets per second: a rate's resolution in time
BUCKETS_PER_S = 4


class TokenMeter:
    """Thread-safe: ``add(n)`` from any decode thread, ``total`` and ``rate()`` from any other.
    ``clock``: a monotonic clock in seconds (tests give their own)."""

    def __init__(self, window_s: float = WINDOW_S, clock=time.monotonic):
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = float(window_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: collections.deque = collections.deque()   # [bucket index, tokens]
        self.total = 0

    def _trim(self, now_bucket: int) -> None:
        oldest = now_bucket - int(self.window_s * BUCKETS_PER_S)
        while self._buckets and self._buckets[0][0] <= oldest:
            self._buckets.popleft()

    def add(self, n: int = 1) -> None:
        b = int(self._clock() * BUCKETS_PER_S)
        with self._lock:
            self.total += n
            if self._buckets and self._buckets[-1][0] == b:
                self._buckets[-1][1] += n
            else:
                self._buckets.append([b, n])
                self._trim(b)

    def rate(self) -> float:
        """Tokens per second over the last ``window_s`` seconds (tokens in the window divided
        by the window: a burst shows as its mean over the window)."""
        b = int(self._clock() * BUCKETS_PER_S)
        with self._lock:
            self._trim(b)
            n = sum(c for _, c in self._buckets)
        return n / self.window_s


_meters: dict[str, TokenMeter] = {}
_meters_lock = threading.Lock()


def meter(model: str) -> TokenMeter:
    """The meter of ``model`` (a loaded model's name), made on first use."""
    m = _meters.get(model)
    if m is None:
        with _meters_lock:
            m = _meters.setdefault(model, TokenMeter())
    return m


def count(model: str, n: int = 1) -> None:
    """``n`` more tokens generated on ``model``."""
    meter(model).add(n)


def engine_rows(loaded) -> dict | None:
    """The decode scheduler's view of ``loaded`` (kernel_server.runtime.scheduler), None when
    it has none (engine off, or no run yet): rows held in its lanes (``rows``), of them
    paused (``paused``) and stepping (``active``), lanes, and its step counters."""
    sched = getattr(loaded, "decode_scheduler", None)
    if sched is None:
        return None
    stats = sched.stats() if callable(sched.stats) else dict(sched.stats)
    with sched.cond:
        members = [m for lane in sched.lanes for m in lane.members if m is not None]
        lanes = len(sched.lanes)
    paused = sum(1 for m in members if getattr(m.run, "pause", None) is not None)
    return {**stats, "lanes": lanes, "rows": len(members), "paused": paused,
            "active": len(members) - paused}


def load(models) -> dict:
    """The throughput part of a server's load record for ``models`` (LoadedModel objects):
    {"tokens_per_s": all models, "window_s", "models": {name: {"tokens", "tokens_per_s",
    "engine"}}}."""
    out = {}
    for loaded in models:
        m = meter(loaded.name)
        out[loaded.name] = {"tokens": m.total, "tokens_per_s": m.rate(),
                            "engine": engine_rows(loaded)}
    return {"tokens_per_s": sum(v["tokens_per_s"] for v in out.values()),
            "window_s": WINDOW_S, "models": out}
