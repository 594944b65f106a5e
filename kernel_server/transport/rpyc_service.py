"""The rpyc service: one exposed method, ``call(name, packed)``, through the one dispatcher.

Arguments and replies cross as ``djinn_protocol.wire`` packs (JSON text plus raw byte
blobs, never netrefs or pickles). Over rpyc, a large array reply is offered on the bulk
path instead (rpyc moves ~0.02 GB/s of them; the client fetches it transparently).
"""
from __future__ import annotations

import logging

import numpy as np
import rpyc

from djinn_protocol import wire
from djinn_protocol.errors import DjinnError, error_reply
from djinn_protocol.wire import BULK_ARRAY_KEY
from kernel_server.transport.bulk_listener import BulkTransfer
from kernel_server.transport.connection import Connection
from kernel_server.transport.dispatch import dispatch_now

log = logging.getLogger("kernel_server")
#: arrays at least this large go over the bulk path instead of inside an rpyc reply
BULK_THRESHOLD = 64 << 10


class RpycService(rpyc.Service):
    """One instance per rpyc connection, holding that client's ``Connection``.
    ``on_disconnect`` (rpyc calls it when the connection ends, either way) releases the
    client's sessions, or keeps them for the re-attach grace period."""

    def __init__(self, conn: Connection, on_close=None):
        self.conn = conn
        self._on_close = on_close

    def exposed_call(self, name, packed=None):
        try:
            args = {} if packed is None else wire.unpack(packed)
        except DjinnError as exc:
            return wire.pack(error_reply(exc))
        reply = dispatch_now(self.conn, name, args)
        return wire.pack(self._bulk_if_large(reply))

    def _bulk_if_large(self, reply: dict) -> dict:
        value = reply.get("ok")
        if not isinstance(value, np.ndarray) or value.nbytes < BULK_THRESHOLD:
            return reply
        kernel = self.conn.kernel
        payload = memoryview(np.ascontiguousarray(value)).cast("B")
        try:          # (counted with the client's other unfetched offers: capped)
            offer = kernel.hold_offer(self.conn.owner, lambda: BulkTransfer(
                kernel.bulk_host, payload=payload, tls=kernel.bulk_tls))
        except DjinnError as exc:
            return error_reply(exc)
        return {"ok": {BULK_ARRAY_KEY: offer.describe(), "dtype": value.dtype.name,
                       "shape": list(value.shape)}}

    def on_disconnect(self, rpyc_conn):
        if self._on_close is not None:
            self._on_close(self.conn)
