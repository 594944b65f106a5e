"""Server side of the token handshake (see ``djinn_nb.auth``), as an rpyc authenticator."""
from __future__ import annotations

import hmac
import socket

from rpyc.utils.authenticators import AuthenticationError

from djinn_nb.auth import ANSWER_BYTES, answer, new_challenge
from djinn_nb.bulk import recv_exact
from djinn_nb.errors import ConnectionLostError

HANDSHAKE_TIMEOUT = 10.0


class TokenAuthenticator:
    """Called by rpyc for every new connection, in that connection's thread."""

    def __init__(self, token: str | None):
        self.token = token or None

    def __call__(self, sock: socket.socket):
        if self.token is None:
            sock.sendall(b"\x00")
            return sock, None
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            challenge = new_challenge()
            sock.sendall(b"\x01" + challenge)
            got = bytes(recv_exact(sock, ANSWER_BYTES))
            if not hmac.compare_digest(got, answer(self.token, challenge)):
                sock.sendall(b"\x00")
                raise AuthenticationError("wrong token")
            sock.sendall(b"\x01")
        except (OSError, ConnectionLostError) as exc:
            raise AuthenticationError(f"handshake failed: {exc}") from None
        finally:
            sock.settimeout(None)
        return sock, "token"

