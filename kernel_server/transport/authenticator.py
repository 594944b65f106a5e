"""Server side of the connection opening (``djinn_protocol.handshake``), as one authenticator:
TLS first when the server has a certificate, then the token challenge inside it."""
from __future__ import annotations

import hmac
import socket
import ssl

from rpyc.utils.authenticators import AuthenticationError

from djinn_protocol.framing import recv_exact
from djinn_protocol.handshake import (ACCEPTED, ANSWER_BYTES, MODE_CHALLENGE, MODE_OPEN, MODE_TLS,
                                      REFUSED, answer, new_challenge)
from djinn_protocol.errors import ConnectionLostError, InvalidArgumentError

HANDSHAKE_TIMEOUT = 10.0


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
    """Called by rpyc for every new connection, in that connection's thread. Returns the
    socket rpyc should speak on (TLS-wrapped with ``tls``) and the credentials: ``"token"``
    when a token was proven, else None."""

    def __init__(self, token: str | None, tls: ssl.SSLContext | None = None):
        self.token = token or None
        self.tls = tls

    def __call__(self, sock: socket.socket):
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            if self.tls is not None:
                sock.sendall(MODE_TLS)   # a plaintext client reads this and says TLS is needed
                sock = self.tls.wrap_socket(sock, server_side=True)
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
            if isinstance(sock, ssl.SSLSocket):   # rpyc closes only the socket it accepted
                sock.close()
            if isinstance(exc, AuthenticationError):
                raise
            raise AuthenticationError(f"handshake failed: {exc}") from None
