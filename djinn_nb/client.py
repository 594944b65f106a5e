"""The notebook client: the ``Client`` connection to one kernel server, call accounting."""
from __future__ import annotations

import collections
import secrets
import threading
import time

from djinn_protocol import wire
from djinn_protocol.calls import lookup
from djinn_protocol.errors import (ConnectionLostError, DjinnError, InvalidArgumentError,
                                   LimitExceededError, error_class)
from djinn_protocol.handshake import owner_proof

from . import control
from .auth import client_handshake, client_tls_context

DEFAULT_PORT = 18861
SERVER_ENV = "DJINN_SERVER"   # "host:port" of the kernel server that connect() uses by default
_uncounted = threading.local()   # .on: the calling thread's call is left out of stats()
#: client-side rpyc settings: nothing of ours is reachable from the server either
CLIENT_CONFIG = {
    "allow_public_attrs": False, "allow_all_attrs": False, "allow_safe_attrs": False,
    "allow_setattr": False, "allow_delattr": False, "allow_pickle": False,
    "import_custom_exceptions": False, "instantiate_custom_exceptions": False,
    "include_local_traceback": False, "sync_request_timeout": None,
}


def _counting_stream(host: str, port: int, timeout: float):
    """A SocketStream that counts the bytes it really sends and receives."""
    from rpyc.core.stream import SocketStream

    class CountingStream(SocketStream):
        sent = 0
        received = 0

        def write(self, data):
            CountingStream.sent += len(data)
            return super().write(data)

        def read(self, count):
            data = super().read(count)
            CountingStream.received += len(data)
            return data

        def poll(self, timeout):
            # a TLS socket may hold decrypted bytes that polling its descriptor does not see
            pending = getattr(self.sock, "pending", None)
            return bool(pending is not None and pending()) or super().poll(timeout)

    import socket     # an IPv6 literal (``[::1]:port``) needs its family: rpyc assumes IPv4
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return CountingStream.connect(host, port, timeout=timeout, family=family), CountingStream


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6 address]:port"``, ``"host"`` or a bare IPv6 address (``"::1"``):
    (host, port), the port defaulting to ``DEFAULT_PORT``."""
    if not isinstance(address, str):
        raise InvalidArgumentError(f"address must be 'host:port', got {address!r}")
    if address.startswith("["):                       # [v6]:port or [v6]
        host, close, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (None if not rest else "bad")
        ok = close and ":" in host
    elif address.count(":") > 1:                      # a bare IPv6 address: no port
        host, port, ok = address, None, True
    else:
        host, _, port = address.partition(":") if ":" in address else (address, "", None)
        ok = bool(host)
    try:
        if not ok:
            raise ValueError
        return host, DEFAULT_PORT if port is None else int(port)
    except ValueError:
        raise InvalidArgumentError(f"address must be 'host:port' or '[ipv6]:port', "
                                   f"got {address!r}") from None


class Closeable:
    """``closed`` and the ``with`` block of a connection object that sets ``_closed`` in its
    ``close()`` (``Client``, ``djinn_nb.cluster.ClusterClient``)."""

    _closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client(Closeable):
    """A connection to one kernel server. Open sessions with :meth:`session`."""

    #: for a replica of a cluster (``djinn_nb.cluster``): the ``ClusterClient`` that opened
    #: this client and the replica's id; None for a plain server
    cluster = None
    replica: str | None = None

    def __init__(self, address: str, timeout: float | None = None, local_server=None,
                 connect_timeout: float = 10.0, token: str | None = None, tls=None,
                 owner_key: str | None = None):
        import rpyc
        self.address = address
        self._local_server = local_server
        self._token = token
        self._timeout = timeout
        self._tls_arg = tls
        self._tls = client_tls_context(tls)   # ssl.SSLContext or None: rpyc and bulk sockets
        self._owner_key = owner_key
        host, port = parse_address(address)
        try:
            stream, self._counter = _counting_stream(host, port, connect_timeout)
        except OSError as exc:
            raise ConnectionLostError(f"cannot reach a kernel server at {host}:{port} "
                                      f"(from {address!r}): {exc}. "
                                      "Start one with `python -m kernel_server`, or call "
                                      "dj.connect() with no address to launch a local one.") from None
        try:
            stream.sock.settimeout(connect_timeout)
            stream.sock, proved_token = client_handshake(stream.sock, token, self._tls, host)
            stream.sock.settimeout(None)
        except BaseException:
            stream.close()
            raise
        config = dict(CLIENT_CONFIG, sync_request_timeout=timeout)
        self._conn = rpyc.connect_stream(stream, rpyc.VoidService, config=config)
        self._lock = threading.Lock()
        self._calls = 0
        self._rpyc_calls = 0             # of them, sent over rpyc (the rest: the control channel)
        self._rtts = collections.deque(maxlen=200)
        self._bulk_bytes = 0
        self._closed = False
        self._control = None
        if owner_key is None and not proved_token:
            # no token identifies us: a random key of this Client object lets reconnect()
            # re-attach its sessions (kernel_server.runtime.ownership); kept across reconnects
            self._owner_key = owner_key = secrets.token_hex(32)
        self.server_info = self.call("hello", owner_key=None if owner_key is None
                                     else owner_proof(owner_key))
        self._owner = self.server_info.get("owner")
        limit = self.server_info.get("limits", {}).get("max_request_mb")
        self._max_request_bytes = None if limit is None else int(limit * 2**20)
        self._control = self._open_control(host, timeout) if control.enabled() else None

    def _open_control(self, host: str, timeout: float | None):
        """The control channel (``djinn_nb.control``), the fast path for every call; None
        keeps every call on rpyc (a failure to open it is logged)."""
        offer = self.call("open_control")

        def account(sent: int, received: int, payload: int) -> None:
            # stats(): JSON and headers count as bytes_sent / bytes_received, like rpyc
            # messages; raw array payloads in replies as bulk_bytes_received, like bulk transfers
            with self._lock:
                self._counter.sent += sent
                self._counter.received += received
                self._bulk_bytes += payload
        try:
            return control.open_channel(host, offer, self._token, self._tls, timeout=timeout,
                                        account=account)
        except (DjinnError, OSError) as exc:
            control.log.warning("cannot open the control channel to %s:%s (%s: %s); every call "
                                "goes through rpyc", host, offer.get("port"), type(exc).__name__, exc)
            return None

    # ---- the one way to call the server --------------------------------------------------
    def call(self, name: str, **kwargs):
        """One declared call (``djinn_protocol.calls``) with keyword arguments; returns its
        reply or raises the server's typed error. The ``Session`` methods are built on it."""
        if self._closed:
            raise ConnectionLostError("this client is closed; use dj.connect() again")
        lookup(name)                           # an undeclared name never leaves the client
        channel = self._control
        packed = wire.pack(kwargs) if channel is None else channel.request(name, kwargs)
        self._check_request_size(name, packed)
        t0 = time.perf_counter()
        try:
            if channel is not None:             # djinn_nb.control: a raw socket, no rpyc
                reply = channel.call(packed)
            else:
                self._rpyc_calls += 1
                reply = wire.unpack(self._conn.root.call(name, packed))
        except (EOFError, OSError, ConnectionError) as exc:
            raise ConnectionLostError(f"lost the connection to the kernel server at {self.address} "
                                      f"({type(exc).__name__}: {exc}); client.reconnect() "
                                      "once it is back") from None
        except DjinnError:
            raise
        except Exception as exc:
            # rpyc raises e.g. AsyncResultTimeout or its own errors for a dead link
            raise ConnectionLostError(f"call {name} to {self.address} failed: "
                                      f"{type(exc).__name__}: {exc}") from None
        finally:
            if not getattr(_uncounted, "on", False):    # stats()'s own memory call is not counted
                with self._lock:
                    self._calls += 1
                    self._rtts.append((time.perf_counter() - t0) * 1e3)
        return self._value(reply)

    def _value(self, reply: dict):
        if "error" in reply:
            err = reply["error"]
            raise error_class(err["type"])(err["message"])
        value = reply["ok"]
        if type(value) is dict and wire.BULK_ARRAY_KEY in value:   # (rpyc: large arrays go bulk)
            value = self.fetch_array(value)
        return value

    def call_aside(self, name: str, **kwargs):
        """One declared call over the rpyc connection, beside a call that another thread is
        waiting on over the control channel (which serves one call at a time): how
        ``Session.interrupt()`` reaches the server while ``generate`` runs. Without a control
        channel it queues behind that call."""
        if self._closed:
            raise ConnectionLostError("this client is closed; use dj.connect() again")
        lookup(name)
        try:
            reply = wire.unpack(self._conn.root.call(name, wire.pack(kwargs)))
        except (EOFError, OSError, ConnectionError) as exc:
            raise ConnectionLostError(f"lost the connection to the kernel server at {self.address} "
                                      f"({type(exc).__name__}: {exc})") from None
        return self._value(reply)

    def _end_interrupted(self, session_id: str):
        """After Ctrl-C stopped the wait for a ``generate`` / ``resume`` / ``step`` of session
        ``session_id``: ask the server to end that run at its next step boundary and read the
        call's reply (its event). None when there is nothing to wait for (no control channel:
        the reply is dropped as before). A second Ctrl-C gives up waiting."""
        channel = self._control
        if channel is None or not channel.awaiting:
            return None
        reply = None
        while reply is None and channel.awaiting and not channel.closed:
            # re-asked until the reply comes: a run that had not started yet when first asked
            # (the request still in flight) is asked again once it runs
            self.call_aside("interrupt", session=session_id)
            reply = channel.collect(0.2)
        return None if reply is None else self._value(reply)

    def _check_request_size(self, name: str, packed) -> None:
        """Refuse here, with a typed error, a request the server would refuse by closing
        the connection (``--max-request-mb``)."""
        limit = getattr(self, "_max_request_bytes", None)
        if limit is None:
            return
        size = len(packed[0]) + sum(memoryview(b).nbytes for b in packed[1])
        if size > limit:
            raise LimitExceededError(
                f"{name}(): this request is {size / 2**20:.1f} MiB, over the server's limit of "
                f"{limit / 2**20:g} MiB per request (--max-request-mb); nothing was sent")

    # ---- public API ------------------------------------------------------------------------
    def session(self, model: str | None = None) -> "Session":
        """A new session on ``model`` (default: the server's default model)."""
        from .session import Session
        return Session(self, self.call("open_session", model=model))

    def fetch_bulk(self, offer: dict) -> bytearray:
        """The payload the server offered on the bulk path (``{"port", "nonce"}``)."""
        from . import bulk
        host, _ = parse_address(self.address)
        data = bulk.fetch(host, offer["port"], bytes.fromhex(offer["nonce"]), tls=self._tls)
        with self._lock:
            self._bulk_bytes += len(data)
        return data

    def fetch_array(self, offer: dict):
        """An array the server offered on the bulk path instead of in its reply."""
        return wire.decode_array(offer["dtype"], offer["shape"],
                                 bytes(self.fetch_bulk(offer[wire.BULK_ARRAY_KEY])))

    def checkpoints(self) -> list:
        """This client's checkpoints on the server: id, model, step, positions, nbytes, ready."""
        return self.call("checkpoints")

    def load_checkpoint(self, path, session=None):
        """Load a saved checkpoint file into a new session on its model (or into ``session``).
        Returns the ``Checkpoint``; the restored session is ``ck.session`` (state "ready")."""
        from pathlib import Path
        from . import bulk
        from .checkpoint import Checkpoint
        from .session import Session
        data = Path(path).read_bytes()
        if not data:
            raise InvalidArgumentError(f"{path} is empty")
        upload = self.call("begin_upload", nbytes=len(data))
        host, _ = parse_address(self.address)
        bulk.send(host, upload["port"], bytes.fromhex(upload["nonce"]), data, tls=self._tls)
        out = self.call("import_checkpoint", upload=upload["nonce"],
                         session=None if session is None else session.id)
        ck = Checkpoint(self, out["checkpoint"])
        ck.session = session if session is not None else Session(self, out["session"])
        return ck

    def ping(self) -> float:
        """One empty round trip, in milliseconds."""
        t0 = time.perf_counter()
        self.call("ping")
        return (time.perf_counter() - t0) * 1e3

    def stats(self, memory: bool = True) -> dict:
        """Calls made, bytes on the socket each way, recent round trips (ms), and ``devices``:
        the server's memory per device, one dict each with ``device`` ("cuda:0", ..., "cpu"),
        ``allocated_bytes`` / ``reserved_bytes`` / ``total_bytes`` (torch.cuda.memory_*; for
        "cpu" the server process's RSS) and ``layers`` ({model: decoder layers kept there}).
        Fetching ``devices`` is one call that the other figures do not count (exact unless
        other threads call the server meanwhile); ``memory=False`` (or a closed client): None."""
        devices = None
        hidden = self.__dict__.setdefault("_hidden", {})
        if memory and not self._closed:
            before = self._counts()
            _uncounted.on = True
            try:
                devices = self.call("memory")["devices"]
            except DjinnError:
                devices = None
            finally:
                _uncounted.on = False
            after = self._counts()
            with self._lock:
                for key in ("bytes_sent", "bytes_received", "bulk_bytes_received"):
                    hidden[key] = hidden.get(key, 0) + after[key] - before[key]
        out = self._counts()
        for key, n in hidden.items():
            out[key] -= n
        out["devices"] = devices
        return out

    def _counts(self) -> dict:
        """Calls made, bytes on the socket each way, recent round trips (ms)."""
        with self._lock:
            rtts = list(self._rtts)
        return {"calls": self._calls, "rpyc_calls": self._rpyc_calls, "bytes_sent": self._counter.sent,
                "bytes_received": self._counter.received, "bulk_bytes_received": self._bulk_bytes,
                "rtt_ms": rtts,
                "last_rtt_ms": rtts[-1] if rtts else None}

    def reconnect(self) -> dict:
        """Open a new connection to the same address. If the server keeps a disconnected
        client's sessions (``--reconnect-grace-s`` > 0) and the grace period is not over, the
        sessions and checkpoints of the old connection are re-attached: the same ``Session``
        and ``Checkpoint`` objects keep working. Otherwise they are gone. Returns the ids
        re-attached: ``{"sessions": [...], "checkpoints": [...]}``."""
        old_owner = getattr(self, "_owner", None)
        self._close_conn()
        self.__init__(self.address, timeout=self._timeout, local_server=self._local_server,
                      token=self._token, tls=self._tls_arg, owner_key=self._owner_key)
        if old_owner is None or not self.server_info.get("limits", {}).get("reconnect_grace_s"):
            return {"sessions": [], "checkpoints": []}
        return self.call("reattach", owner=old_owner)

    def attach(self, session_id: str) -> "Session":
        """Take over the session ``session_id`` of a client that disconnected (another process,
        a crashed kernel), within the server's ``--reconnect-grace-s``; the checkpoints that
        client left come along. Allowed with the same token (and the same ``owner_key`` if
        that client gave one); anything else is ``UnknownSessionError``."""
        from .session import Session
        return Session(self, self.call("attach", session=session_id))

    def _close_conn(self) -> None:
        self._closed = True
        if self._control is not None:
            self._control.close()
        try:
            self._conn.close()
        except Exception:
            pass

    def close(self) -> None:
        """Close the connection; a server launched by ``connect()`` is stopped too. The
        sessions and checkpoints are released at once (a grace period is for lost connections)."""
        if not self._closed and self.server_info.get("limits", {}).get("reconnect_grace_s"):
            try:
                self.call("closing")
            except DjinnError:
                pass
        self._close_conn()
        server, self._local_server = self._local_server, None
        if server is not None:       # (a launched server shared by clients: the last one stops it)
            getattr(server, "release", server.stop)()

    @property
    def control_channel(self):
        """The control channel every call goes through (``djinn_nb.control.ControlChannel``),
        or None when calls go over rpyc (``$DJINN_CONTROL=0`` or it could not be opened)."""
        return self._control

    def __repr__(self):
        where = "local, launched" if self._local_server else "remote"
        state = "closed" if self._closed else "open"
        return (f"<djinn_nb.Client {self.address} ({where}, {state}) "
                f"default model {self.server_info.get('default_model')}>")
