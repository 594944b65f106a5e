"""The client's side of the connection opening (``djinn_protocol.handshake``): optional TLS,
then the token challenge, before rpyc or a control frame is spoken.

A client that asked for TLS refuses a server that does not offer it (no silent downgrade),
and a plaintext client is told at once that the server wants TLS (no hang).
"""
from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

from djinn_protocol.errors import (AuthenticationFailedError, ConnectionLostError, DjinnError,
                                   InvalidArgumentError, TLSError)
from djinn_protocol.framing import recv_exact
from djinn_protocol.handshake import (ACCEPTED, CHALLENGE_BYTES, MODE_CHALLENGE, MODE_OPEN,
                                      MODE_TLS, TLS_ENV, TOKEN_ENV, answer)


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
        if recv_exact(sock, 1) != ACCEPTED:
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
