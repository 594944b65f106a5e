"""The kernel server: models + sessions behind an rpyc ThreadedServer."""
from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import zlib

from rpyc.core.channel import Channel
from rpyc.core.stream import SocketStream
from rpyc.utils.helpers import classpartial
from rpyc.utils.server import ThreadedServer

from djinn_nb import __version__
from djinn_nb.errors import InvalidArgumentError
from .models import DEFAULT_MODEL, REGISTRY, ModelRegistry
from .service import KernelService
from .auth import TokenAuthenticator, server_tls_context
from .control import ControlServer
from .checkpoints import CheckpointStore
from .ownership import Owners
from .sessions import SessionManager
from .validation import Limits

log = logging.getLogger("kernel_server")

#: the rpyc protocol settings, strict on purpose (see STYLE.md)
PROTOCOL_CONFIG = {
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_safe_attrs": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "allow_pickle": False,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "include_local_traceback": False,
    "include_local_version": False,
    # a paused session can wait on the client for as long as the researcher thinks
    "sync_request_timeout": None,
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Kernel:
    """What all connections share: the model registry, the sessions, the limits."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str | None = None,
                 dtype: str | None = None, limits: Limits | None = None, allow_load: bool = True,
                 device_map=None, max_memory=None):
        self.limits = limits or Limits()
        # device_map / max_memory: every model over several devices (kernel_server.sharding)
        self.models = ModelRegistry(model, device, dtype, allow_load,
                                    max_models=self.limits.max_models,
                                    device_map=device_map, max_memory=max_memory)
        self.sessions = SessionManager(self.limits)
        self.checkpoints = CheckpointStore(int(self.limits.checkpoint_budget_mb * 2**20),
                                           int(self.limits.pinned_pool_mb * 2**20))
        self.owners = Owners(self.sessions, self.checkpoints, self.limits.reconnect_grace_s)
        self.bulk_host = "127.0.0.1"   # where one-shot bulk listeners bind (the server's host)
        self.bulk_tls = None           # the server's TLS context: bulk transfers use it too

    def info(self) -> dict:
        return {"version": __version__, "default_model": self.models.default,
                "loaded_models": self.models.loaded(), "registry": dict(REGISTRY),
                "sessions": self.sessions.count(), "limits": vars(self.limits),
                "checkpoint_bytes": self.checkpoints.used_bytes}

    def memory(self) -> dict:
        """Memory per device (kernel_server.sharding.device_memory) and checkpoint bytes."""
        from .sharding import device_memory
        return {"devices": device_memory([self.models.get(n) for n in self.models.loaded()]),
                "checkpoint_bytes": self.checkpoints.used_bytes}


#: protocol overhead a request may carry beyond --max-request-mb of arguments (brine boxing,
#: zlib's worst-case growth): the client checks its arguments against the limit itself
REQUEST_SLACK = 1 << 20


class _Stream(SocketStream):
    """rpyc's socket stream, aware of TLS: a TLS socket may hold decrypted bytes that a poll
    of the file descriptor does not see, and once another thread shuts a TLS socket down
    (kernel_server.control does, to end a connection), reading it would return raw TLS
    records: that is the end of the stream."""
    __slots__ = ()

    def read(self, count):
        data = super().read(count)
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.version() is None:
            self.close()
            raise EOFError("the TLS connection was shut down")
        return data

    def poll(self, timeout):
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True
        return super().poll(timeout)


class LimitedChannel(Channel):
    """rpyc's frame reader with a size check before anything is allocated: a frame (or a
    compressed frame's content) over the limit closes the connection; the server stays up
    and never holds the oversized request in memory."""
    __slots__ = ("max_bytes",)

    def __init__(self, stream, max_bytes: int):
        super().__init__(stream)
        self.max_bytes = max_bytes

    def _refuse(self, what: str):
        log.warning("closing a connection: %s is over the request limit of %d bytes "
                    "(--max-request-mb)", what, self.max_bytes)
        self.stream.close()
        raise EOFError(f"{what} is over the server's request limit (--max-request-mb)")

    def recv(self):
        header = self.stream.read(self.FRAME_HEADER.size)
        length, compressed = self.FRAME_HEADER.unpack(header)
        if length > self.max_bytes:
            self._refuse(f"a request frame of {length} bytes")
        data = self.stream.read(length + len(self.FLUSHER))[:-len(self.FLUSHER)]
        if compressed:
            inflate = zlib.decompressobj()
            data = inflate.decompress(data, self.max_bytes + 1)
            if len(data) > self.max_bytes or inflate.unconsumed_tail:
                self._refuse(f"a compressed request of {length} bytes that inflates further")
        return data


class _ThreadedServer(ThreadedServer):
    """rpyc's threaded server, reading requests through a ``LimitedChannel``."""

    def __init__(self, *args, max_request_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_request_bytes = max_request_bytes

    def _serve_client(self, sock, credentials):   # (rpyc's, with our channel and stream)
        self.clients.add(sock)   # a TLS socket replaces the accepted one: close() must reach it
        try:
            config = dict(self.protocol_config, credentials=credentials,
                          endpoints=(sock.getsockname(), sock.getpeername()), logger=self.logger)
            channel = LimitedChannel(_Stream(sock), self.max_request_bytes)
            self._handle_connection(self.service._connect(channel, config))
        finally:
            self.clients.discard(sock)


class KernelServer:
    """A running server; ``start()`` in a thread (tests) or ``serve_forever()`` (CLI).
    ``certfile`` (and ``keyfile``): TLS for the rpyc connection and every bulk transfer."""

    def __init__(self, kernel: Kernel, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, certfile: str | None = None,
                 keyfile: str | None = None):
        if not is_loopback(host) and not token:
            raise InvalidArgumentError(
                f"refusing to bind {host} without a token: any address but loopback needs "
                "--token-file FILE or $DJINN_TOKEN (clients then pass dj.connect(..., token=...))")
        if keyfile and not certfile:
            raise InvalidArgumentError("--keyfile needs --certfile")
        tls = server_tls_context(certfile, keyfile) if certfile else None
        self.kernel = kernel
        self.tls = tls is not None
        kernel.bulk_host = host
        kernel.bulk_tls = tls
        limit = int(kernel.limits.max_request_mb * 2**20) + REQUEST_SLACK
        authenticator = TokenAuthenticator(token, tls)
        # the control channel (kernel_server.control): same host, same opening (TLS, token)
        self.control = ControlServer(host, authenticator, limit)
        self._server = _ThreadedServer(classpartial(KernelService, kernel, self.control),
                                       hostname=host, port=port,
                                       protocol_config=PROTOCOL_CONFIG, reuse_addr=True,
                                       authenticator=authenticator,
                                       logger=logging.getLogger("kernel_server.rpyc"),
                                       max_request_bytes=limit)
        # listen now, before anyone is told the address (rpyc would only listen in start())
        self._server._listen()
        self.host = host
        self.port = self._server.listener.getsockname()[1]
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def serve_forever(self) -> None:
        self._server.start()

    def start(self) -> "KernelServer":
        self._thread = threading.Thread(target=self._server.start, name="djinn-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.kernel.owners.close()
        self._server.close()
        self.control.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
