"""Server side of the control channel (the client's end is ``djinn_nb.control``): one
listener per kernel server, one thread per control connection. Each control connection
belongs to the client ``Connection`` that asked for it with ``open_control``, runs calls
through the same dispatcher as rpyc (the same table, checks and typed errors), and lives
and dies with the rpyc connection: either one closing closes the other, and the sessions
are released in one place (the server's ``_connection_closed``).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from concurrent.futures import Future

from djinn_protocol import wire
from djinn_protocol.errors import DjinnError, InvalidArgumentError, LimitExceededError, ServerError, error_reply
from djinn_protocol.framing import (ACK, ARRAY_MARK, MAX_META, NONCE_BYTES, FrameReader, decode_meta,
                                    nonce_ok, receive_arrays, recv_exact, send_frame)
from kernel_server.transport.connection import Connection, shutdown
from kernel_server.transport.dispatch import dispatch

log = logging.getLogger("kernel_server.control")

HANDSHAKE_TIMEOUT = 10.0
#: seconds a started request frame has to arrive whole (its header and meta), and the most
#: its payload may stall; waiting for the next request is not limited (a researcher thinks)
FRAME_TIMEOUT = 60.0
OFFER_TTL = 60.0                   # seconds an offered nonce stays valid
MAX_OFFERS_PER_CLIENT = 4
MAX_CHANNELS = 1024                # live control connections (one per client connection)


class ControlServer:
    """The control listener of one kernel server. ``authenticator`` is the rpyc connection's
    (``kernel_server.auth.TokenAuthenticator``): the same opening on every control socket,
    TLS first when the server has a certificate, then the token challenge.
    ``max_request_bytes``: a request frame announcing more (``--max-request-mb``) closes its
    connection before anything is allocated, as an oversized rpyc frame does."""

    def __init__(self, host: str, authenticator, max_request_bytes: int = 128 << 20):
        self._listener = socket.create_server(
            (host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self.authenticator = authenticator
        self.max_request_bytes = max_request_bytes
        self._pending: dict[bytes, tuple] = {}          # nonce -> (connection, expiry)
        self._channels: dict[socket.socket, Connection] = {}  # live socket -> its client
        self._gone = weakref.WeakSet()                   # connections whose rpyc side closed
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="djinn-control-accept", daemon=True).start()

    # ---- offers, called from rpyc ------------------------------------------------------
    def offer(self, service: Connection) -> dict:
        """A one-time nonce for ``service``'s client to open its control connection with."""
        nonce = os.urandom(NONCE_BYTES)
        with self._lock:
            now = time.monotonic()
            self._pending = {k: v for k, v in self._pending.items() if v[1] > now}
            if sum(1 for s, _ in self._pending.values() if s is service) >= MAX_OFFERS_PER_CLIENT:
                raise LimitExceededError(f"{MAX_OFFERS_PER_CLIENT} control channel offers are "
                                         "already waiting for this client")
            self._pending[nonce] = (service, now + OFFER_TTL)
        return {"port": self.port, "nonce": nonce.hex()}

    def _claim(self, nonce: bytes):
        with self._lock:
            for key, (service, expiry) in list(self._pending.items()):
                if nonce_ok(key, nonce):
                    del self._pending[key]
                    if expiry < time.monotonic() or service in self._gone:
                        return None
                    return service
        return None

    def detach(self, service: Connection) -> None:
        """``service``'s rpyc connection closed: forget its offers, close its channels."""
        with self._lock:
            self._gone.add(service)
            self._pending = {k: v for k, v in self._pending.items() if v[0] is not service}
            socks = [s for s, owner in self._channels.items() if owner is service]
        for sock in socks:
            shutdown(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._channels)
        shutdown(self._listener)
        self._listener.close()
        for sock in socks:
            shutdown(sock)

    # ---- connections -------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)       # (out of file descriptors: do not spin)
                continue
            with self._lock:
                full = len(self._channels) >= MAX_CHANNELS
            if full:
                shutdown(conn)
                conn.close()
                continue
            threading.Thread(target=self._connection, args=(conn,), name="djinn-control",
                             daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        service = None
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            conn, _ = self.authenticator(conn)       # TLS and the token challenge, as for rpyc
            conn.settimeout(HANDSHAKE_TIMEOUT)
            service = self._claim(bytes(recv_exact(conn, NONCE_BYTES,
                                                    time.monotonic() + HANDSHAKE_TIMEOUT)))
            if service is None:
                log.info("control connection refused: unknown or expired nonce")
                return
            with self._lock:
                if self._closed or service in self._gone:
                    return
                self._channels[conn] = service
            conn.sendall(ACK)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serve(conn, service)
        except Exception as exc:   # strangers, cut-offs, wrong tokens: this connection only
            log.info("control connection ended: %s: %s", type(exc).__name__, exc)
        finally:
            with self._lock:
                owned = self._channels.pop(conn, None) is not None
                gone = service in self._gone if service is not None else True
            shutdown(conn)
            conn.close()
            if owned and not gone:
                # the control socket closing is the client's connection closing: end the rpyc
                # one too, whose on_disconnect releases the sessions (one place does that)
                service.disconnect()

    def _serve(self, conn: socket.socket, service) -> None:
        reader = FrameReader(conn)
        limit = min(MAX_META, self.max_request_bytes)
        # a late reply (a Future from the dispatcher: resume / step / stop) is sent by the
        # generation thread itself; ``settled`` is clear until it has gone out, so replies
        # never interleave even if a client sends its next request early. TLS sockets are
        # not shared between threads (an SSL object is not safe for a read and a write at
        # once): there the serving thread waits for the reply and sends it.
        settled = threading.Event()
        settled.set()
        direct = not hasattr(conn, "cipher")

        def send(done: Future) -> None:
            try:
                self._reply(conn, done.result())
            except OSError as exc:      # the client went: the serving thread sees it too
                log.info("a late reply could not be sent: %s", exc)
            finally:
                settled.set()
        while True:
            try:
                meta, payload = reader.read_meta(limit, timeout=FRAME_TIMEOUT)
            except (EOFError, OSError) as exc:     # closed, or a frame stalled (socket.timeout)
                if isinstance(exc, OSError):
                    log.info("closing a control connection: %s", exc)
                return
            settled.wait()
            if meta is None or len(meta) + payload > self.max_request_bytes:
                log.warning("closing a control connection: a request frame is over the request "
                            "limit of %d bytes (--max-request-mb)", self.max_request_bytes)
                return
            try:
                request = decode_meta(meta)
                if (not isinstance(request, dict) or type(request.get("call")) is not str
                        or not isinstance(request.get("args"), dict)):
                    raise InvalidArgumentError("malformed request: expected {call, args}")
                # (most requests carry no array: skip the walks)
                specs = wire.array_specs(request["args"]) if payload or ARRAY_MARK in meta else []
                if sum(n for _, _, n in specs) != payload:
                    raise InvalidArgumentError("malformed request: the arrays do not match "
                                               "the frame's payload length")
            except DjinnError as exc:
                reader.skip(payload)
                self._reply(conn, error_reply(exc))
                continue
            args = request["args"]
            if specs:
                args = wire.fill_arrays(args, receive_arrays(reader, specs, payload))
            reply = dispatch(service, request["call"], args)
            if isinstance(reply, Future):
                if direct:
                    settled.clear()
                    reply.add_done_callback(send)    # the generation thread answers
                    continue
                reply = reply.result()
            self._reply(conn, reply)

    @staticmethod
    def _reply(conn: socket.socket, reply: dict) -> None:
        try:
            meta, blobs = wire.pack_views(reply)
        except DjinnError as exc:                  # a result that cannot be sent
            meta, blobs = wire.pack_views(error_reply(exc))
        except Exception as exc:
            log.exception("cannot encode a reply")
            meta, blobs = wire.pack_views(error_reply(ServerError(f"the reply could not be encoded: "
                                                             f"{type(exc).__name__}: {exc}")))
        send_frame(conn, meta.encode(), blobs)
