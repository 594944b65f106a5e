"""Token authentication: a challenge-response handshake before rpyc speaks.

The server opens every connection with one byte: ``0`` (no token needed: loopback
without a token) or ``1`` followed by a fresh random challenge. The client answers
HMAC-SHA256(token, challenge); the token itself never crosses the wire, and a
recorded answer is useless for the next connection, whose challenge differs.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket

from .bulk import recv_exact
from .errors import AuthenticationFailedError, ConnectionLostError

CHALLENGE_BYTES = 32
ANSWER_BYTES = hashlib.sha256().digest_size
TOKEN_ENV = "DJINN_TOKEN"
_CONTEXT = b"djinn-nb-auth-v1"


def answer(token: str, challenge: bytes) -> bytes:
    return hmac.new(token.encode(), _CONTEXT + challenge, hashlib.sha256).digest()


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_BYTES)


def client_handshake(sock: socket.socket, token: str | None) -> None:
    """Answer the server's opening (on the raw socket, before rpyc); raises on refusal."""
    try:
        mode = recv_exact(sock, 1)
        if mode == b"\x00":
            return
        challenge = bytes(recv_exact(sock, CHALLENGE_BYTES))
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            raise AuthenticationFailedError(
                "this kernel server requires a token: dj.connect(address, token=...) "
                f"or set ${TOKEN_ENV}")
        sock.sendall(answer(token, challenge))
        if recv_exact(sock, 1) != b"\x01":
            raise AuthenticationFailedError("the kernel server refused the token")
    except ConnectionLostError:
        raise AuthenticationFailedError("the kernel server refused the connection "
                                        "(wrong token?)") from None
