"""The bulk data path: one-shot raw TCP transfers beside the rpyc connection.

rpyc moves about 0.1 GB/s on loopback, a raw socket about 1.9 GB/s, so large payloads
(checkpoint files, and later full activations) travel here. The server opens a
listener for one transfer and tells the client (over rpyc) its port and a random
nonce; the client connects, proves the nonce, and the bytes flow with a length prefix.
When the server uses TLS (``--certfile``), so does every bulk transfer: the client
wraps the socket with the same context as its rpyc connection before sending the nonce.
"""
from __future__ import annotations

import hmac
import socket
import ssl
import struct

from .errors import ConnectionLostError, TLSError

NONCE_BYTES = 16
_LEN = struct.Struct("!Q")
CHUNK = 4 << 20


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(CHUNK, n - got))
        if k == 0:
            raise ConnectionLostError(f"bulk transfer cut off after {got} of {n} bytes")
        got += k
    return buf


def _connect(host: str, port: int, nonce: bytes, timeout: float,
             tls: ssl.SSLContext | None = None) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ConnectionLostError(f"cannot open the bulk channel to {host}:{port}: {exc}") from None
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise TLSError(f"TLS handshake on the bulk channel to {host}:{port} failed: {exc}") from None
    sock.sendall(nonce)
    return sock


def fetch(host: str, port: int, nonce: bytes, timeout: float = 60.0,
          tls: ssl.SSLContext | None = None) -> bytearray:
    """Receive one payload the server offered."""
    with _connect(host, port, nonce, timeout, tls) as sock:
        (n,) = _LEN.unpack(recv_exact(sock, _LEN.size))
        return recv_exact(sock, n)


def send(host: str, port: int, nonce: bytes, data, timeout: float = 60.0,
         tls: ssl.SSLContext | None = None) -> None:
    """Send one payload the server is expecting."""
    with _connect(host, port, nonce, timeout, tls) as sock:
        sock.sendall(_LEN.pack(len(data)))
        sock.sendall(data)
        # wait for the server's one-byte acknowledgement: the data arrived whole
        if recv_exact(sock, 1) != b"\x01":
            raise ConnectionLostError("the server did not acknowledge the bulk upload")


def nonce_ok(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
