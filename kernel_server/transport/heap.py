"""The server's C heap over a long life of short connections.

glibc's malloc gives each thread that allocates one of up to 8 arenas per core, and memory
freed inside an arena goes back to the system only from the top of that arena. A server
that starts and ends threads per connection (every client, every flood of strangers, every
bulk transfer) spreads short-lived buffers over all of them, so its RSS grows with free space
it holds but no longer uses. Measured with ``python -m bench.attack_soak --diagnose``
(tiny-gpt2, CPU, 2 cores): over 5 minutes of attacks the heap in use stayed at ~145 MiB and
the live Python objects at ~360k while the free space held in the arenas grew from 1 to
~190 MiB. Two glibc calls bound that: ``M_ARENA_MAX`` caps the arenas (threads share
them: the server's threads mostly wait on sockets or the GIL), and ``malloc_trim(0)`` hands
free pages back. Elsewhere (musl, macOS) both are skipped.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

M_ARENA_MAX = -8          # mallopt parameter (glibc malloc.h)
#: arenas the server's threads share (glibc's default: 8 per core); $DJINN_MALLOC_ARENAS
#: sets another number, 0 leaves glibc's default
ARENAS = int(os.environ.get("DJINN_MALLOC_ARENAS", "2"))
#: seconds between two trims at most (a trim walks every arena: not on every call)
TRIM_INTERVAL_S = 10.0


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):      # not glibc
        return None


_LIBC = _glibc()


def bound_arenas(n: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``n`` for this process (arenas made so far stay)."""
    return bool(_LIBC is not None and n > 0 and _LIBC.mallopt(M_ARENA_MAX, n))


class Trimmer:
    """``maybe()`` hands the heap's free pages back to the system, at most once every
    ``interval`` seconds (called when a connection ends: that is when its memory is free)."""

    def __init__(self, interval: float = TRIM_INTERVAL_S):
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()

    def maybe(self) -> bool:
        if _LIBC is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval:
                return False
            self._last = now
        _LIBC.malloc_trim(0)
        return True
