"""Framing of the raw sockets beside rpyc: control-channel frames and one-shot bulk transfers.

A control frame is ``!IQ`` (meta length, payload length), the meta JSON (the structure of
``djinn_protocol.wire``: ``{"call", "args"}`` or ``{"ok"}`` / ``{"error"}``, arrays as
placeholders with dtype and shape), then the arrays' raw bytes back to back. Arrays are
sent from their own memory (``sendmsg`` of views) and received straight into freshly
allocated numpy arrays (``recv_into``): no extra copy on either side.

A bulk transfer is a one-shot socket: the client proves a nonce (``NONCE_BYTES``), then the
payload flows with a ``LENGTH`` prefix; an upload is acknowledged with ``ACK``.
"""
from __future__ import annotations

import hmac
import json
import socket
import struct
import time

import numpy as np

from .errors import ConnectionLostError, InvalidArgumentError

HEADER = struct.Struct("!IQ")         # meta bytes, payload bytes
MAX_META = 64 << 20                   # a frame's JSON part
MAX_PAYLOAD = 1 << 40                 # a frame's arrays
ACK = b"\x01"
ARRAY_MARK = b'"__ndarray__"'         # in a frame's meta iff it carries arrays (wire's key)
IOV_MAX = 512                         # buffers per sendmsg call
NONCE_BYTES = 16                      # one-time nonces of control and bulk sockets
LENGTH = struct.Struct("!Q")          # the length prefix of a bulk payload
CHUNK = 4 << 20                       # largest single recv of a bulk payload


class ProtocolError(ConnectionLostError):
    """A frame that breaks the control protocol; the channel is closed."""


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """Exactly ``n`` bytes from ``sock`` (``ConnectionLostError`` if it closes first).

    The buffer grows as the bytes arrive (at most ``CHUNK`` ahead of them), never to an
    announced size up front: a peer that announces a large size and sends nothing costs
    nothing. ``deadline`` (``time.monotonic()``): the whole read must be done by then
    (``socket.timeout`` otherwise), however slowly the bytes trickle in."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"read deadline passed after {len(buf)} of {n} bytes")
            sock.settimeout(left)
        got = len(buf)
        want = min(CHUNK, n - got)
        buf.extend(bytearray(want))
        with memoryview(buf) as view, view[got:] as tail:
            k = sock.recv_into(tail, want)
        del buf[got + k:]
        if k == 0:
            raise ConnectionLostError(f"transfer cut off after {got} of {n} bytes")
    return buf


def nonce_ok(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


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
        sent = sock.sendmsg(views[:IOV_MAX])
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
        self.deadline: float | None = None   # time.monotonic() by which the frame must be read

    def buffered(self) -> int:
        return self._end - self._start

    def _timeout(self) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("a frame did not arrive whole before its deadline")
            self.sock.settimeout(left)

    def _fill_direct(self, n: int) -> bytes:
        self._timeout()
        data = self.sock.recv(n)
        if not data:
            raise EOFError("the control channel was closed by the other end")
        return data

    def _fill(self) -> None:
        self._timeout()
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
        if n > len(self._buf):       # grown as the bytes arrive, never to the announced size
            out = bytearray(self._view[self._start:self._end][:n])
            self._start += len(out)
            while len(out) < n:
                got = len(out)
                out.extend(self._fill_direct(min(CHUNK, n - got)))
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

    def read_meta(self, limit: int = MAX_META,
                  timeout: float | None = None) -> tuple[bytes | None, int]:
        """The next frame's meta bytes and payload length (the payload is left to read).
        A small frame costs one ``recv``. Meta over ``limit``: ``(None, payload)``, unread.
        ``timeout``: waiting for a frame is not limited, but once its first byte is here its
        header and meta must arrive within ``timeout`` seconds (``socket.timeout``), and the
        payload that follows may not stall longer than that between bytes."""
        self.deadline = None
        if timeout is not None:
            self.sock.settimeout(None)
        while self._end - self._start < HEADER.size:
            self._fill()
            if timeout is not None and self.deadline is None:
                self.deadline = time.monotonic() + timeout
        if timeout is not None and self.deadline is None:     # (a pipelined frame)
            self.deadline = time.monotonic() + timeout
        try:
            return self._meta(limit)
        finally:
            self.deadline = None
            if timeout is not None:
                self.sock.settimeout(timeout)

    def _meta(self, limit: int) -> tuple[bytes | None, int]:
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
    """A frame's meta JSON (``InvalidArgumentError`` when it is not JSON)."""
    try:
        return json.loads(meta)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgumentError(f"malformed request: {str(exc)[:200]}") from None
