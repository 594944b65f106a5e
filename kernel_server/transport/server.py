"""The kernel server's listener: accepts connections, opens each (TLS, token), and serves it
as an rpyc connection of ``RpycService``; the control channel listens beside it."""
from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
import zlib

import rpyc
from rpyc.core.channel import Channel
from rpyc.core.stream import SocketStream
from rpyc.utils.authenticators import AuthenticationError

from djinn_protocol.errors import InvalidArgumentError
from kernel_server.transport.authenticator import TokenAuthenticator, server_tls_context
from kernel_server.transport.connection import Connection, shutdown
from kernel_server.transport.control_listener import ControlServer
from kernel_server.transport.heap import Trimmer, bound_arenas
from kernel_server.transport.rpyc_service import RpycService

log = logging.getLogger("kernel_server")

#: the rpyc protocol settings, strict on purpose: nothing of the server is reachable but
#: ``exposed_call``, and nothing but plain values crosses
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
#: protocol overhead a request may carry beyond --max-request-mb of arguments (brine boxing,
#: zlib's worst-case growth): the client checks its arguments against the limit itself
REQUEST_SLACK = 1 << 20
ACCEPT_POLL_S = 0.5          # how often the accept loop looks at close() and signals


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host`` (IPv4 or IPv6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


class _Stream(SocketStream):
    """rpyc's socket stream, aware of TLS: a TLS socket may hold decrypted bytes that a poll
    of the file descriptor does not see, and once another thread shuts a TLS socket down
    (a closing control channel does, to end a connection), reading it would return raw TLS
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


class KernelServer:
    """A running server; ``start()`` in a thread (tests) or ``serve_forever()`` (CLI).
    ``certfile`` (and ``keyfile``): TLS for every connection and bulk transfer. It listens
    from construction on, so its address can be told before it serves."""

    def __init__(self, kernel, host: str = "127.0.0.1", port: int = 0,
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
        self.max_request_bytes = int(kernel.limits.max_request_mb * 2**20) + REQUEST_SLACK
        lim = kernel.limits
        self.max_connections = lim.max_connections
        self.authenticator = TokenAuthenticator(token, tls, timeout=lim.handshake_timeout_s,
                                                max_pending=lim.max_unauthenticated)
        # the control channel: same host, same opening (TLS, token)
        self.control = ControlServer(host, self.authenticator, self.max_request_bytes)
        self._listener = listen(host, port)
        # accept() wakes twice a second: a SIGTERM that the kernel delivers to another thread
        # only runs Python's handler when the main thread is back in the interpreter, so a
        # main thread blocked in accept() for good would never stop (seen: 1 stop in 4)
        self._listener.settimeout(ACCEPT_POLL_S)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._sockets: set = set()
        self._threads: list[threading.Thread] = []     # one per client connection
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        # a thread per connection over a long life: keep glibc's heap from holding what
        # ended connections freed (kernel_server.transport.heap has the measurements)
        bound_arenas()
        self._trimmer = Trimmer()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def serve_forever(self) -> None:
        """Accept connections until ``close()``; an accept error (out of file descriptors,
        a reset) is logged and waited out, never the end of the server. Past
        ``--max-connections`` a new connection is closed at once."""
        failing = 0
        while not self._closed.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:                 # (the poll above: nothing arrived)
                continue
            except OSError as exc:
                if self._closed.is_set():
                    return
                if failing % 100 == 0:       # (one line per 100 failures, not a log flood)
                    log.warning("accept failed (%s); retrying", exc)
                failing += 1
                time.sleep(0.05)
                continue
            failing = 0
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                full = len(self._threads) >= self.max_connections
            if full:
                log.warning("refusing a connection: %d connections already (--max-connections)",
                            self.max_connections)
                shutdown(sock)
                sock.close()
                continue
            thread = threading.Thread(target=self._serve_socket, args=(sock, peer),
                                      name="djinn-client", daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def start(self) -> "KernelServer":
        self._thread = threading.Thread(target=self.serve_forever, name="djinn-server", daemon=True)
        self._thread.start()
        return self

    def _serve_socket(self, sock: socket.socket, peer=None) -> None:
        with self._lock:
            self._sockets.add(sock)
        try:
            try:
                opened, credentials = self.authenticator(sock)
            except AuthenticationError as exc:
                log.info("connection refused: %s", exc)
                return
            with self._lock:
                self._sockets.add(opened)      # a TLS socket replaces the accepted one
            conn = Connection(self.kernel, credentials, self.control, peer)
            conn.socket = opened
            log.info("client %s connected", conn.owner[:8])
            channel = LimitedChannel(_Stream(opened), self.max_request_bytes)
            rpyc.Connection(RpycService(conn, self._connection_closed), channel,
                            PROTOCOL_CONFIG).serve_all()
        except Exception:
            log.exception("client connection ended abruptly")
        finally:
            with self._lock:
                self._sockets.discard(sock)
                self._sockets.discard(locals().get("opened"))
            shutdown(sock)
            sock.close()
            self._trimmer.maybe()      # what the connection (or stranger) held is free now

    def _connection_closed(self, conn: Connection) -> None:
        self.control.detach(conn)                      # its control channel closes with it
        conn.release_transfers()                       # its unfetched offers and uploads too
        n = self.kernel.owners.disconnected(conn.owner)   # released now, or kept for the grace
        if n is None:
            log.info("client %s disconnected; its sessions are kept for %g s "
                     "(--reconnect-grace-s)", conn.owner[:8], self.kernel.owners.grace_s)
        else:
            log.info("client %s disconnected; released %d sessions", conn.owner[:8], n)

    def close(self) -> None:
        self._closed.set()
        self.kernel.owners.close()
        shutdown(self._listener)
        self._listener.close()
        with self._lock:
            socks = list(self._sockets)
        for sock in socks:
            shutdown(sock)
        self.control.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads + ([self._thread] if self._thread is not None else []):
            thread.join(timeout=10)      # each releases its client's sessions as it ends
