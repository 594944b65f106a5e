"""The control channel: a raw TCP socket beside the rpyc connection for every call.

rpyc costs about 0.4 ms a round trip on loopback and moves arrays through its own
chunking; a raw socket round trip costs about 0.1 ms. After connecting, the client asks
the server (over rpyc, ``open_control``) for a control port and a one-time nonce, connects,
goes through the same opening as the rpyc connection (``djinn_nb.auth``: TLS when the server
has a certificate, then the token challenge) and proves the nonce; from then on each call is
one request frame and one reply frame on that socket.
The server runs the very same exposed method (``kernel_server.service.invoke``) with the
same argument checks and typed errors; only the transport differs.

A frame is ``!IQ`` (meta length, payload length), the meta JSON (``djinn_nb.wire``'s
structure: ``{"call", "args"}`` or ``{"ok"}`` / ``{"error"}``, arrays as placeholders with
dtype and shape), then the arrays' raw bytes back to back. Arrays are sent from their own
memory (``sendmsg`` of views) and received straight into freshly allocated numpy arrays
(``recv_into``): no extra copy on either side.

If the server offers no control channel (an older server) or ``$DJINN_CONTROL=0``, the
client keeps using rpyc for every call.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import struct
import threading

import numpy as np

from . import wire
from .errors import ConnectionLostError, DjinnError, InvalidArgumentError

log = logging.getLogger("djinn_nb.control")

HEADER = struct.Struct("!IQ")         # meta bytes, payload bytes
MAX_META = 64 << 20                   # a frame's JSON part
MAX_PAYLOAD = 1 << 40                 # a frame's arrays
ENV = "DJINN_CONTROL"                 # "0": never open a control channel (rpyc only)
ACK = b"\x01"
ARRAY_MARK = b'"__ndarray__"'         # in a frame's meta iff it carries arrays (wire's key)
_IOV_MAX = 512                        # buffers per sendmsg call


class ProtocolError(ConnectionLostError):
    """A frame that breaks the control protocol; the channel is closed."""


class ReplyTimeout(Exception):
    """No reply within the client's timeout; the late reply is dropped when it comes."""


# ---- framing, used by both ends ------------------------------------------------------------
def send_frame(sock: socket.socket, meta: bytes, blobs=()) -> int:
    """Send one frame: header and meta in one buffer, then each blob from its own memory.
    Returns the bytes sent."""
    if not blobs:                                   # the usual small message: one send
        head = HEADER.pack(len(meta), 0) + meta
        sock.sendall(head)
        return len(head)
    payload = sum(len(b) for b in blobs)
    head = HEADER.pack(len(meta), payload) + meta
    send_buffers(sock, [head, *blobs])
    return len(head) + payload


def send_buffers(sock: socket.socket, buffers: list) -> None:
    """``sendall`` of several buffers with as few system calls as possible (``sendmsg``)."""
    if not hasattr(sock, "sendmsg") or hasattr(sock, "cipher"):     # TLS sockets: no sendmsg
        for b in buffers:
            sock.sendall(b)
        return
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


class FrameReader:
    """Reads frames from a socket through one reusable buffer: a small frame costs one
    ``recv`` system call; a large payload goes straight into its destination array."""

    def __init__(self, sock: socket.socket, size: int = 1 << 16):
        self.sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def buffered(self) -> int:
        return self._end - self._start

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):            # move the tail to the front
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        got = self.sock.recv_into(self._view[self._end:])
        if got == 0:
            raise EOFError("the control channel was closed by the other end")
        self._end += got

    def read(self, n: int) -> bytes:
        if n > len(self._buf):
            out = bytearray(n)
            self.read_into(memoryview(out))
            return bytes(out)
        while self._end - self._start < n:
            self._fill()
        out = bytes(self._view[self._start:self._start + n])
        self._start += n
        return out

    def read_into(self, view: memoryview) -> None:
        n = len(view)
        have = min(n, self._end - self._start)
        if have:
            view[:have] = self._view[self._start:self._start + have]
            self._start += have
        got = have
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError(f"the control channel was closed after {got} of {n} payload bytes")
            got += k

    def skip(self, n: int) -> None:
        while n:
            if self._start == self._end:
                self._fill()
            k = min(n, self._end - self._start)
            self._start += k
            n -= k

    def read_header(self) -> tuple[int, int]:
        return HEADER.unpack(self.read(HEADER.size))

    def read_meta(self, limit: int = MAX_META) -> tuple[bytes | None, int]:
        """The next frame's meta bytes and payload length (the payload is left to read).
        A small frame costs one ``recv``. Meta over ``limit``: ``(None, payload)``, unread."""
        while self._end - self._start < HEADER.size:
            self._fill()
        meta_len, payload = HEADER.unpack_from(self._buf, self._start)
        if meta_len > limit:
            return None, payload
        self._start += HEADER.size
        if self._end - self._start >= meta_len:       # (all in the buffer already)
            meta = bytes(self._view[self._start:self._start + meta_len])
            self._start += meta_len
            return meta, payload
        return self.read(meta_len), payload


def receive_arrays(reader: FrameReader, specs: list, payload: int) -> list:
    """The frame's arrays, read straight into new numpy arrays (``specs`` from
    ``wire.array_specs``, checked against the header's payload length)."""
    if sum(nbytes for _, _, nbytes in specs) != payload:
        raise InvalidArgumentError(f"the frame announces {payload} payload bytes but its arrays "
                                   f"need {sum(n for _, _, n in specs)}")
    arrays = []
    for dtype, shape, nbytes in specs:
        array = np.empty(shape, dtype=np.dtype(dtype).newbyteorder("<"))
        if nbytes:
            reader.read_into(memoryview(array.reshape(-1).view(np.uint8)))
        arrays.append(array)
    return arrays


def decode_meta(meta: bytes):
    try:
        return json.loads(meta)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgumentError(f"malformed request: {str(exc)[:200]}") from None


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
            waiting = False
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
    from .bulk import recv_exact
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


def attach(client, timeout: float | None = None, tls=None) -> ControlChannel | None:
    """Open ``client``'s control channel; None keeps every call on rpyc: ``$DJINN_CONTROL=0``,
    a server without one, or a failure to open it (logged)."""
    if not enabled():
        return None
    from .client import parse_address
    try:
        offer = client._call("open_control")
    except DjinnError as exc:            # an older server: rpyc only
        log.info("no control channel (%s): every call goes through rpyc", exc)
        return None
    host, _ = parse_address(client.address)

    def account(sent: int, received: int, payload: int) -> None:
        # client.stats(): JSON and headers count as bytes_sent / bytes_received, like rpyc
        # messages; raw array payloads in replies as bulk_bytes_received, like bulk transfers
        with client._lock:
            client._counter.sent += sent
            client._counter.received += received
            client._bulk_bytes += payload
    try:
        return open_channel(host, offer, client._token, tls, timeout=timeout, account=account)
    except (DjinnError, OSError) as exc:
        log.warning("cannot open the control channel to %s:%s (%s: %s); every call goes "
                    "through rpyc", host, offer.get("port"), type(exc).__name__, exc)
        return None
