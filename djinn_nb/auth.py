"""Connection opening: optional TLS, then a token challenge-response, before rpyc speaks.

The server opens every connection with one byte: ``2`` (TLS follows: the client starts a
TLS handshake on the same socket, and the opening is repeated inside it), ``0`` (no token
needed: loopback without a token) or ``1`` followed by a fresh random challenge. The
client answers HMAC-SHA256(token, challenge); the token itself never crosses the wire,
and a recorded answer is useless for the next connection, whose challenge differs.

A client that asked for TLS refuses a server that does not offer it (no silent downgrade),
and a plaintext client is told at once that the server wants TLS (no hang).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
from pathlib import Path

from .bulk import recv_exact
from .errors import (AuthenticationFailedError, ConnectionLostError, DjinnError,
                     InvalidArgumentError, TLSError)

CHALLENGE_BYTES = 32
ANSWER_BYTES = hashlib.sha256().digest_size
TOKEN_ENV = "DJINN_TOKEN"
TLS_ENV = "DJINN_TLS"    # "1": TLS checked against the system CAs; a path: a CA file to trust
_CONTEXT = b"djinn-nb-auth-v1"
MODE_OPEN, MODE_CHALLENGE, MODE_TLS = b"\x00", b"\x01", b"\x02"


def answer(token: str, challenge: bytes) -> bytes:
    return hmac.new(token.encode(), _CONTEXT + challenge, hashlib.sha256).digest()


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_BYTES)


def owner_proof(owner_key: str) -> str:
    """What a client sends for its owner key (``dj.connect(owner_key=...)``): a keyed hash,
    so the key itself is never sent (the hash is a bearer secret all the same)."""
    return hmac.new(owner_key.encode(), b"djinn-nb-owner-v1", hashlib.sha256).hexdigest()


def client_tls_context(tls) -> ssl.SSLContext | None:
    """``tls``: None (``$DJINN_TLS``), False (plain), True (verify against the system CAs),
    a CA file path (e.g. the server's self-signed certificate), or an ``ssl.SSLContext``."""
    if tls is None:
        env = os.environ.get(TLS_ENV, "").strip()
        tls = False if env.lower() in ("", "0", "false", "no") else \
            True if env.lower() in ("1", "true", "yes") else env
    if tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is True:
        return ssl.create_default_context()
    if isinstance(tls, (str, Path)):
        path = Path(tls).expanduser()
        if not path.is_file():
            raise InvalidArgumentError(f"tls={str(tls)!r}: no such CA file")
        try:
            return ssl.create_default_context(cafile=str(path))
        except ssl.SSLError as exc:
            raise InvalidArgumentError(f"tls={str(tls)!r} is not a PEM CA file: {exc}") from None
    raise InvalidArgumentError(f"tls must be True, False, a CA file path or an ssl.SSLContext; "
                               f"got {tls!r}")


def client_handshake(sock: socket.socket, token: str | None, tls: ssl.SSLContext | None = None,
                     server_hostname: str | None = None) -> tuple[socket.socket, bool]:
    """Answer the server's opening on the raw socket, before rpyc; raises on refusal.
    Returns the socket to use from now on (TLS-wrapped if TLS was agreed) and whether a
    token was proven."""
    where = server_hostname or "the kernel server"
    try:
        mode = recv_exact(sock, 1)
        if mode == MODE_TLS:
            if tls is None:
                raise TLSError(f"{where} requires TLS (it was started with --certfile): "
                               "dj.connect(address, tls=True) or tls='server-ca.pem' "
                               f"(or set ${TLS_ENV})")
            try:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname)
            except ssl.SSLCertVerificationError as exc:
                raise TLSError(f"the certificate of {where} does not verify "
                               f"({exc.verify_message}); pass tls='path/to/its-ca.pem'") from None
            except (ssl.SSLError, OSError) as exc:
                raise TLSError(f"TLS handshake with {where} failed: {exc}") from None
            mode = recv_exact(sock, 1)
        elif tls is not None:
            raise TLSError(f"{where} does not use TLS (it was started without --certfile); "
                           "refusing to continue in the clear. Pass tls=False to connect anyway.")
        if mode == MODE_OPEN:
            return sock, False
        if mode != MODE_CHALLENGE:
            raise AuthenticationFailedError(f"{where} opened with an unknown byte {mode!r}: "
                                            "not a djinn_nb kernel server of this version?")
        challenge = bytes(recv_exact(sock, CHALLENGE_BYTES))
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            raise AuthenticationFailedError(
                "this kernel server requires a token: dj.connect(address, token=...) "
                f"or set ${TOKEN_ENV}")
        sock.sendall(answer(token, challenge))
        if recv_exact(sock, 1) != b"\x01":
            raise AuthenticationFailedError("the kernel server refused the token")
        return sock, True
    except ConnectionLostError:
        raise AuthenticationFailedError("the kernel server refused the connection "
                                        "(wrong token?)") from None
    except DjinnError:        # (TLSError and AuthenticationFailedError are OSErrors too)
        raise
    except OSError as exc:      # a timeout, a reset: no usable opening from the server
        raise ConnectionLostError(f"{where} did not complete the connection opening: "
                                  f"{type(exc).__name__}: {exc}") from None
