"""The server side's own client of the protocol: how the directory talks to its replicas
(load figures, drains) and how ``python -m kernel_server.cluster status`` talks to the
directory. The same opening (TLS, token challenge), rpyc and wire codec as ``djinn_nb``'s
client, without that package (the server never imports the client); and the relay that
streams a checkpoint file from one replica's bulk offer into another's upload.
"""
from __future__ import annotations

import socket
import ssl

import rpyc

from djinn_protocol import wire
from djinn_protocol.calls import lookup
from djinn_protocol.errors import (AuthenticationFailedError, ConnectionLostError, DjinnError,
                                   TransferError, error_class)
from djinn_protocol.framing import ACK, LENGTH, recv_exact
from djinn_protocol.handshake import (ACCEPTED, CHALLENGE_BYTES, MODE_CHALLENGE, MODE_OPEN,
                                      MODE_TLS, answer, owner_proof)
from kernel_server.transport.server import PROTOCOL_CONFIG

#: how long the directory waits for a replica that does not answer (it is then unhealthy)
CALL_TIMEOUT_S = 60.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def tls_context(cafile: str | None) -> ssl.SSLContext | None:
    """The context to reach servers started with ``cafile`` as their certificate (the
    cluster's servers share one certificate; it is its own CA when self-signed)."""
    if not cafile:
        return None
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False   # replicas are reached by address; the certificate is pinned
    return ctx


def _open(host: str, port: int, token: str | None, tls: ssl.SSLContext | None,
          timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        mode = recv_exact(sock, 1)
        if mode == MODE_TLS:
            if tls is None:
                raise AuthenticationFailedError(f"{host}:{port} wants TLS; the cluster has no certfile")
            sock = tls.wrap_socket(sock)
            mode = recv_exact(sock, 1)
        if mode == MODE_CHALLENGE:
            if not token:
                raise AuthenticationFailedError(f"{host}:{port} wants a token; the cluster has none")
            sock.sendall(answer(token, bytes(recv_exact(sock, CHALLENGE_BYTES))))
            if recv_exact(sock, 1) != ACCEPTED:
                raise AuthenticationFailedError(f"{host}:{port} refused the cluster's token")
        elif mode != MODE_OPEN:
            raise AuthenticationFailedError(f"{host}:{port} is not a djinn_nb server")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


class Peer:
    """One protocol connection to a kernel server or a directory. ``operator_key``: the
    cluster operator's key, proven in ``hello`` (replicas then answer the operator calls)."""

    def __init__(self, address: str, token: str | None = None, tls: ssl.SSLContext | None = None,
                 operator_key: str | None = None, timeout: float = CALL_TIMEOUT_S):
        from kernel_server.transport.server import _Stream
        self.address = address
        self.host, port = split_address(address)
        self.tls = tls
        try:
            sock = _open(self.host, port, token, tls, min(timeout, 10.0))
        except (OSError, ConnectionLostError) as exc:
            raise ConnectionLostError(f"cannot reach {address}: {exc}") from None
        self._conn = rpyc.connect_stream(_Stream(sock), rpyc.VoidService,
                                         config=dict(PROTOCOL_CONFIG, sync_request_timeout=timeout))
        self.info = self.call("hello", owner_key=None if operator_key is None
                              else owner_proof(operator_key))

    def call(self, name: str, **kwargs):
        lookup(name)
        try:
            reply = wire.unpack(self._conn.root.call(name, wire.pack(kwargs)))
        except DjinnError:
            raise
        except Exception as exc:           # EOF, reset, rpyc's timeout: the server is gone
            raise ConnectionLostError(f"call {name} to {self.address} failed: "
                                      f"{type(exc).__name__}: {exc}") from None
        if "error" in reply:
            raise error_class(reply["error"]["type"])(reply["error"]["message"])
        return reply["ok"]

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:
            pass


def _bulk_socket(host: str, port: int, nonce: str, tls, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock)
        sock.sendall(bytes.fromhex(nonce))
        return sock
    except (OSError, ValueError) as exc:
        raise TransferError(f"cannot open the bulk channel to {host}:{port}: {exc}") from None


def relay(source_host: str, offer: dict, target_host: str, upload: dict, tls=None,
          timeout: float = 120.0, chunk: int = 1 << 20) -> int:
    """Stream the file offered at ``source_host`` (``offer``: port, nonce) into the upload
    expected at ``target_host`` (``upload``: port, nonce), a chunk at a time (the relay never
    holds the whole file). Returns the bytes moved; the target acknowledges the whole."""
    with _bulk_socket(source_host, int(offer["port"]), offer["nonce"], tls, timeout) as src, \
            _bulk_socket(target_host, int(upload["port"]), upload["nonce"], tls, timeout) as dst:
        try:
            head = recv_exact(src, LENGTH.size)
            (n,) = LENGTH.unpack(head)
            dst.sendall(head)
            left = n
            while left:
                data = src.recv(min(chunk, left))
                if not data:
                    raise TransferError(f"the source replica stopped after {n - left} of {n} bytes")
                dst.sendall(data)
                left -= len(data)
            if recv_exact(dst, 1) != ACK:
                raise TransferError("the target replica did not acknowledge the checkpoint file")
        except (OSError, ConnectionLostError) as exc:
            raise TransferError(f"the relay was cut off: {exc}") from None
    return n
