"""The client's control channel: a raw TCP socket beside the rpyc connection for every call.

rpyc costs about 0.4 ms a round trip on loopback and moves arrays through its own
chunking; a raw socket round trip costs about 0.1 ms. After connecting, the client asks
the server (over rpyc, ``open_control``) for a control port and a one-time nonce, connects,
goes through the same opening as the rpyc connection (``djinn_nb.auth``: TLS when the server
has a certificate, then the token challenge) and proves the nonce; from then on each call is
one request frame and one reply frame on that socket (``djinn_protocol.framing``). The
server dispatches it through the same table of calls with the same checks and typed errors
as over rpyc; only the transport differs.

With ``$DJINN_CONTROL=0`` the client keeps using rpyc for every call.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading

from djinn_protocol import wire
from djinn_protocol.framing import (ACK, ARRAY_MARK, HEADER, MAX_PAYLOAD, FrameReader,
                                    ProtocolError, receive_arrays, recv_exact, send_frame)

log = logging.getLogger("djinn_nb.control")

ENV = "DJINN_CONTROL"                 # "0": never open a control channel (rpyc only)


class ReplyTimeout(Exception):
    """No reply within the client's timeout; the late reply is dropped when it comes."""


# ---- the client end ----------------------------------------------------------------------
class ControlChannel:
    """The client's control socket. One call at a time (a lock), like one rpyc connection,
    whose server also serves one request at a time."""

    def __init__(self, sock: socket.socket, timeout: float | None = None, account=None):
        self.sock = sock
        self.timeout = timeout       # seconds to wait for a reply (None: as long as it takes)
        self.account = account       # account(sent, received, payload_received) after each frame
        self._reader = FrameReader(sock)
        self._lock = threading.Lock()
        self._owed = 0               # replies of calls that timed out, still to be read
        self.awaiting = False        # the last call was sent, its caller stopped waiting: collect()
        self._closed = False
        self.bytes_sent = 0
        self.bytes_received = 0      # headers and JSON
        self.payload_received = 0    # raw array bytes

    @staticmethod
    def request(name: str, kwargs: dict) -> tuple[bytes, list]:
        """The request frame's parts (checked and encoded on the caller's thread)."""
        meta, blobs = wire.pack_views({"call": name, "args": kwargs})
        return meta.encode(), blobs

    def call(self, request: tuple[bytes, list]) -> dict:
        """Send ``request`` and return the server's reply: ``{"ok": value}`` or ``{"error": ...}``.
        Transport failures raise ``EOFError`` / ``OSError`` (the caller turns them into
        ``ConnectionLostError``) and close the channel. A timeout (``ReplyTimeout``) or an
        interrupt (Ctrl-C, the notebook's stop button) while waiting for the reply leaves the
        channel in step: that reply is dropped when it comes, as rpyc drops a late reply."""
        with self._lock:
            if self._closed:
                raise EOFError("the control channel is closed")
            waiting, sent = False, None
            self.awaiting = False
            try:
                while self._owed:                 # replies the server still owes: drop them
                    waiting = True
                    self._wait(None)
                    waiting = False
                    self._read_reply()
                    self._owed -= 1
                sent = send_frame(self.sock, *request)
                self.bytes_sent += sent
                if self.account is not None:
                    self.account(sent, 0, 0)
                self._owed += 1                   # (until its first byte is read)
                waiting = True
                if not self._wait(self.timeout):
                    raise ReplyTimeout(f"no reply within {self.timeout} s")
                waiting = False
                self._owed -= 1
                return self._read_reply()
            except (ReplyTimeout, KeyboardInterrupt):
                if not waiting:                   # (mid-frame: the stream is out of step)
                    self._close()
                self.awaiting = waiting and sent is not None
                raise
            except BaseException:
                self._close()
                raise

    def collect(self, timeout: float | None) -> dict | None:
        """The reply of the last call after its caller stopped waiting (``awaiting``; the
        client's interrupt asks the server to end that call first): None if it has not
        started to arrive within ``timeout``. Replies owed before it are dropped."""
        with self._lock:
            if self._closed or not self.awaiting:
                return None
            reply, waiting = None, False
            try:
                while self._owed:
                    waiting = True
                    if not self._wait(timeout):
                        return None
                    waiting = False
                    reply = self._read_reply()
                    self._owed -= 1
                self.awaiting = False
                return reply
            except KeyboardInterrupt:
                if not waiting:
                    self._close()
                raise
            except BaseException:
                self._close()
                raise

    def _wait(self, timeout: float | None) -> bool:
        """Wait until the next reply starts to arrive (False: ``timeout`` passed first),
        without reading any of it: an interrupt here leaves the stream in step."""
        if self._reader.buffered() or getattr(self.sock, "pending", int)():   # (TLS: decrypted)
            return True
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def _read_reply(self) -> dict:
        meta, payload = self._reader.read_meta()
        if meta is None or payload > MAX_PAYLOAD:
            raise ProtocolError(f"reply frame too large (payload {payload} bytes)")
        meta_len = len(meta)
        reply = json.loads(meta)
        if payload or ARRAY_MARK in meta:
            reply = wire.fill_arrays(reply, receive_arrays(self._reader, wire.array_specs(reply),
                                                           payload))
        self.bytes_received += HEADER.size + meta_len
        self.payload_received += payload
        if self.account is not None:
            self.account(0, HEADER.size + meta_len, payload)
        if not isinstance(reply, dict) or not ("ok" in reply or "error" in reply):
            raise ProtocolError("malformed reply on the control channel")
        return reply

    def _close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        """Close the socket; a call waiting on another thread wakes with ``EOFError``
        (it closes the socket itself: an fd is never closed under a blocked ``recv``)."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._close()
            finally:
                self._lock.release()
        else:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed


def open_channel(host: str, offer: dict, token: str | None, tls=None,
                 timeout: float | None = None, connect_timeout: float = 10.0,
                 account=None) -> ControlChannel:
    """Connect to the control port the server offered (``{"port", "nonce"}``), go through the
    same opening as the rpyc connection (``djinn_nb.auth``: TLS with the client's context
    ``tls`` when the server has a certificate, then the token challenge), prove the nonce."""
    from .auth import client_handshake
    sock = socket.create_connection((host, int(offer["port"])), timeout=connect_timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # (the server sets it too)
        sock, _ = client_handshake(sock, token, tls, server_hostname=host)
        sock.settimeout(connect_timeout)
        sock.sendall(bytes.fromhex(offer["nonce"]))
        if recv_exact(sock, 1) != ACK:
            raise ProtocolError("the server refused the control channel")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return ControlChannel(sock, timeout=timeout, account=account)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")
