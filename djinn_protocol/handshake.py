"""The opening of every connection, before rpyc or a frame is spoken, and the launch line.

The server opens every socket with one byte: ``MODE_TLS`` (TLS follows: the client starts a
TLS handshake on the same socket, and the opening is repeated inside it), ``MODE_OPEN`` (no
token needed: loopback without a token) or ``MODE_CHALLENGE`` followed by a fresh random
challenge. The client answers HMAC-SHA256(token, challenge); the token itself never crosses
the wire, and a recorded answer is useless for the next connection, whose challenge differs.
The server then sends ``ACCEPTED`` or ``REFUSED``.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import queue
import threading
import time

CHALLENGE_BYTES = 32
ANSWER_BYTES = hashlib.sha256().digest_size
MODE_OPEN, MODE_CHALLENGE, MODE_TLS = b"\x00", b"\x01", b"\x02"
ACCEPTED, REFUSED = b"\x01", b"\x00"
TOKEN_ENV = "DJINN_TOKEN"   # the shared secret, on both ends
TLS_ENV = "DJINN_TLS"       # client: "1" checks TLS against the system CAs; a path: a CA file
_CONTEXT = b"djinn-nb-auth-v1"
_OWNER_CONTEXT = b"djinn-nb-owner-v1"

#: the line a kernel server prints on stdout once it serves: ``READY_PREFIX host:port``
READY_PREFIX = "DJINN_SERVER_READY"


def wait_ready_line(stream, timeout: float, on_wait=None, poll_s: float = 1.0) -> str | None:
    """Read a launched kernel server's stdout (``stream``, text lines) until its READY line:
    the "host:port" it serves at; None when the stream ends (the server exited) or ``timeout``
    seconds pass first. A daemon thread reads the lines, and goes on reading after the
    READY line, so the server never blocks on a full pipe. ``on_wait()`` is called after each
    ``poll_s`` seconds without a line (a progress display). Used by ``djinn_nb.launcher``
    (``dj.connect()``) and ``kernel_server.cluster.replica``."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in stream:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=read, name="djinn-server-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=poll_s)
        except queue.Empty:
            if on_wait is not None:
                on_wait()
            continue
        if line is None:
            return None
        if line.startswith(READY_PREFIX):
            return line.split()[1]
    return None


def answer(token: str, challenge: bytes) -> bytes:
    """The client's answer to ``challenge``; the server computes the same to compare."""
    return hmac.new(token.encode(), _CONTEXT + challenge, hashlib.sha256).digest()


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_BYTES)


def owner_proof(owner_key: str) -> str:
    """What a client sends for its owner key (``dj.connect(owner_key=...)``): a keyed hash,
    so the key itself is never sent (the hash is a bearer secret all the same)."""
    return hmac.new(owner_key.encode(), _OWNER_CONTEXT, hashlib.sha256).hexdigest()
