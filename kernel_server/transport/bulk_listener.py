"""Server side of the bulk data path (``djinn_protocol.framing``): one listener per transfer,
in TLS when the server has a certificate."""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time

from djinn_protocol.framing import ACK, LENGTH, NONCE_BYTES, nonce_ok, recv_exact
from djinn_protocol.errors import ConnectionLostError, LimitExceededError, TransferError


class BulkTransfer:
    """A one-shot listener on ``host``: sends ``payload`` (offer) or receives up to
    ``max_bytes`` (expect). ``result()`` waits for the upload to arrive."""

    def __init__(self, host: str, payload=None, max_bytes: int = 0, timeout: float = 60.0,
                 tls: ssl.SSLContext | None = None):
        self.nonce = os.urandom(NONCE_BYTES)
        self.tls = tls          # the server's TLS context (--certfile): the transfer is TLS too
        self.payload = payload
        self.max_bytes = max_bytes
        self.received: bytearray | None = None
        self.error: Exception | None = None
        self._done = threading.Event()
        self._timeout = timeout
        self._listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, name="djinn-bulk", daemon=True).start()

    def _serve(self) -> None:
        deadline = time.monotonic() + self._timeout
        try:
            while True:        # a stranger (wrong nonce, cut-off) does not end the transfer
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("nobody fetched the transfer in time")
                self._listener.settimeout(left)
                conn, _ = self._listener.accept()
                try:
                    conn.settimeout(max(deadline - time.monotonic(), 0.01))
                    try:
                        if self.tls is not None:
                            conn = self.tls.wrap_socket(conn, server_side=True)
                        if not nonce_ok(self.nonce, bytes(recv_exact(conn, NONCE_BYTES))):
                            continue
                        if self.payload is not None:
                            conn.sendall(LENGTH.pack(len(self.payload)))
                            conn.sendall(self.payload)
                        else:
                            (n,) = LENGTH.unpack(recv_exact(conn, LENGTH.size))
                            if n > self.max_bytes:
                                raise LimitExceededError(f"upload of {n} bytes is over the "
                                                         f"announced {self.max_bytes}")
                            self.received = recv_exact(conn, n)
                            conn.sendall(ACK)
                        return
                    except (OSError, ConnectionLostError):   # (ssl.SSLError is an OSError)
                        continue
                finally:
                    conn.close()
        except Exception as exc:   # timeout, over the limit: reported by result()
            self.error = exc
        finally:
            self._listener.close()
            self.payload = None
            self._done.set()

    @property
    def expired(self) -> bool:
        """Done with no data to hand over (failed or timed out)."""
        return self._done.is_set() and self.received is None

    def describe(self) -> dict:
        return {"port": self.port, "nonce": self.nonce.hex()}

    def result(self, timeout: float = 60.0) -> bytearray:
        if not self._done.wait(timeout) or self.received is None:
            raise TransferError(f"the bulk upload did not arrive: {self.error or 'timeout'}")
        return self.received
