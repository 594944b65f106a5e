"""Server side of the bulk data path (``djinn_protocol.framing``): one listener per transfer,
in TLS when the server has a certificate.

A transfer listener serves several connections at once, each in its own thread with its own
short deadline to prove the nonce: an idle stranger on the port never holds up the client
the transfer is for. The first connection that proves the nonce claims the transfer; the
nonce is spent then, so a transfer cut off halfway fails for good (it is never served again).
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time

from djinn_protocol.framing import ACK, LENGTH, NONCE_BYTES, nonce_ok, recv_exact
from djinn_protocol.errors import ConnectionLostError, LimitExceededError, TransferError
from kernel_server.transport.connection import shutdown

#: seconds a connection has to open TLS and prove the nonce
NONCE_TIMEOUT = 10.0
#: seconds the claimed transfer may stall between bytes
STALL_TIMEOUT = 60.0
#: connections one transfer serves at once (strangers included); more are closed at once
MAX_CONNECTIONS = 8


class BulkTransfer:
    """A one-shot listener on ``host``: sends ``payload`` (offer) or receives up to
    ``max_bytes`` (expect). ``result()`` waits for the upload to arrive."""

    def __init__(self, host: str, payload=None, max_bytes: int = 0, timeout: float = 60.0,
                 tls: ssl.SSLContext | None = None):
        self.nonce = os.urandom(NONCE_BYTES)
        self.tls = tls          # the server's TLS context (--certfile): the transfer is TLS too
        self.payload = payload
        self.nbytes = 0 if payload is None else len(payload)
        self.max_bytes = max_bytes
        self.received: bytearray | None = None
        self.error: Exception | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._claimed = False
        self._active = 0                 # connections being served now
        self._deadline = time.monotonic() + timeout
        self._listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="djinn-bulk", daemon=True).start()

    # ---- the listener ------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            while not self._done.is_set():
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._finish(TransferError("nobody fetched the transfer in time"))
                    return
                self._listener.settimeout(min(left, 1.0))
                try:
                    conn, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self._done.is_set():
                        return
                    time.sleep(0.05)          # (out of file descriptors: do not spin)
                    continue
                with self._lock:
                    busy = self._claimed or self._active >= MAX_CONNECTIONS
                    if not busy:
                        self._active += 1
                if busy:
                    conn.close()
                    continue
                threading.Thread(target=self._serve, args=(conn,), name="djinn-bulk-conn",
                                 daemon=True).start()
        finally:
            self._listener.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            deadline = min(time.monotonic() + NONCE_TIMEOUT, self._deadline)
            conn.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                got = bytes(recv_exact(conn, NONCE_BYTES, deadline))
            except (OSError, ConnectionLostError):    # (ssl.SSLError is an OSError)
                return                                # a stranger or a cut-off: it alone ends
            with self._lock:
                if self._claimed or not nonce_ok(self.nonce, got):
                    return
                self._claimed = True                  # the nonce is spent from here on
            self._transfer(conn)
        finally:
            with self._lock:
                self._active -= 1
            shutdown(conn)
            conn.close()

    def _transfer(self, conn: socket.socket) -> None:
        conn.settimeout(STALL_TIMEOUT)
        try:
            if self.payload is not None:
                conn.sendall(LENGTH.pack(len(self.payload)))
                conn.sendall(self.payload)
            else:
                (n,) = LENGTH.unpack(recv_exact(conn, LENGTH.size))
                if n > self.max_bytes:
                    raise LimitExceededError(f"upload of {n} bytes is over the announced "
                                             f"{self.max_bytes}")
                data = recv_exact(conn, n)            # grows as the bytes arrive
                conn.sendall(ACK)
                self.received = data
            self._finish(None)
        except (OSError, ConnectionLostError) as exc:
            self._finish(TransferError(f"the bulk transfer was cut off: {exc}"))
        except Exception as exc:                       # over the limit
            self._finish(exc)

    def _finish(self, error: Exception | None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.error = error
            self._claimed = True
            self.payload = None
            self._done.set()
        shutdown(self._listener)        # wakes the accept loop, which closes the listener

    # ---- the transfer's owner ----------------------------------------------------------
    def cancel(self) -> None:
        """Withdraw the offer (its client went away)."""
        self._finish(TransferError("the transfer was withdrawn"))

    @property
    def done(self) -> bool:
        return self._done.is_set()

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
