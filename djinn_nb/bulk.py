"""The client's end of the bulk data path: one-shot raw TCP transfers beside the connection.

rpyc moves about 0.1 GB/s on loopback, a raw socket about 1.9 GB/s, so large payloads
(checkpoint files, large activations over rpyc) travel here. The server opens a listener
for one transfer and tells the client its port and a random nonce; the client connects,
proves the nonce, and the bytes flow with a length prefix (``djinn_protocol.framing``).
When the server uses TLS (``--certfile``), so does every bulk transfer.
"""
from __future__ import annotations

import socket
import ssl

from djinn_protocol.errors import ConnectionLostError, TLSError
from djinn_protocol.framing import ACK, LENGTH, recv_exact


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
        (n,) = LENGTH.unpack(recv_exact(sock, LENGTH.size))
        return recv_exact(sock, n)


def send(host: str, port: int, nonce: bytes, data, timeout: float = 60.0,
         tls: ssl.SSLContext | None = None) -> None:
    """Send one payload the server is expecting."""
    with _connect(host, port, nonce, timeout, tls) as sock:
        sock.sendall(LENGTH.pack(len(data)))
        sock.sendall(data)
        # wait for the server's one-byte acknowledgement: the data arrived whole
        if recv_exact(sock, 1) != ACK:
            raise ConnectionLostError("the server did not acknowledge the bulk upload")
