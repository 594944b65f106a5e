"""Server side of the connection opening (``djinn_protocol.handshake``), as one authenticator:
TLS first when the server has a certificate, then the token challenge inside it."""
from __future__ import annotations

import hmac
import itertools
import socket
import ssl
import threading

from rpyc.utils.authenticators import AuthenticationError

from djinn_protocol.framing import recv_exact
from djinn_protocol.handshake import (ACCEPTED, ANSWER_BYTES, MODE_CHALLENGE, MODE_OPEN, MODE_TLS,
                                      REFUSED, answer, new_challenge)
from djinn_protocol.errors import ConnectionLostError, InvalidArgumentError

HANDSHAKE_TIMEOUT = 10.0
#: connections waiting to authenticate at once (rpyc and control together)
MAX_PENDING = 64


def server_tls_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """The TLS context of a server started with ``--certfile`` (and ``--keyfile``)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)   # TLS >= 1.2, no client certs
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgumentError(f"cannot load the TLS certificate {certfile!r} / key "
                                   f"{keyfile!r}: {exc}") from None
    return ctx


class TokenAuthenticator:
    """Called for every new connection (rpyc and control), in that connection's thread.
    Returns the socket to speak on (TLS-wrapped with ``tls``) and the credentials:
    ``"token"`` when a token was proven, else None.

    Before authentication a connection costs the server as little as possible and not for
    long: the whole opening (TLS included) must be done within ``timeout`` seconds however
    slowly its bytes come (a watchdog shuts the socket down), and at most
    ``max_pending`` connections wait to authenticate at once; one more pushes the oldest
    waiting one out (a flood cannot lock a real client out for good, only race it)."""

    def __init__(self, token: str | None, tls: ssl.SSLContext | None = None,
                 timeout: float = HANDSHAKE_TIMEOUT, max_pending: int = MAX_PENDING):
        self.token = token or None
        self.tls = tls
        self.timeout = timeout
        self.max_pending = max_pending
        self._pending: dict[int, list] = {}     # waiting connections, oldest first
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def __call__(self, sock: socket.socket):
        key, holder = next(self._ids), [sock]
        with self._lock:
            while len(self._pending) >= self.max_pending:
                oldest = next(iter(self._pending))
                shutdown(self._pending.pop(oldest)[0])
            self._pending[key] = holder
        watchdog = threading.Timer(self.timeout, lambda: shutdown(holder[0]))
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._open(sock, holder)
        finally:
            watchdog.cancel()
            with self._lock:
                self._pending.pop(key, None)

    def _open(self, sock: socket.socket, holder: list):
        sock.settimeout(self.timeout)
        try:
            if self.tls is not None:
                sock.sendall(MODE_TLS)   # a plaintext client reads this and says TLS is needed
                sock = holder[0] = self.tls.wrap_socket(sock, server_side=True)
            if self.token is None:
                sock.sendall(MODE_OPEN)
                sock.settimeout(None)
                return sock, None
            challenge = new_challenge()
            sock.sendall(MODE_CHALLENGE + challenge)
            got = bytes(recv_exact(sock, ANSWER_BYTES))
            if not hmac.compare_digest(got, answer(self.token, challenge)):
                sock.sendall(REFUSED)
                raise AuthenticationError("wrong token")
            sock.sendall(ACCEPTED)
            sock.settimeout(None)
            return sock, "token"
        except (OSError, ConnectionLostError, AuthenticationError) as exc:
            if isinstance(sock, ssl.SSLSocket):   # the caller closes only the socket it accepted
                sock.close()
            if isinstance(exc, AuthenticationError):
                raise
            raise AuthenticationError(f"handshake failed: {exc}") from None


def shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
