"""The directory clients ask first: every replica's address, model, health and load, the
choice of the least-loaded healthy replica of a model, the relay of checkpoint files
between replicas (``move``), and the drain of a replica before it stops.

``Directory`` is a plain object (the Ray backend wraps it in a named actor; the process
backend holds it in the ``up`` process); ``DirectoryServer`` serves it over the project's
own opening (TLS, token) and wire, answering only the ``cluster_*`` calls of the table
(``djinn_protocol.calls``) and ``hello`` / ``ping``. The directory is never on a session's
data path: clients talk to the replica it names.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import rpyc
from rpyc.utils.authenticators import AuthenticationError

from djinn_protocol import __version__, wire
from djinn_protocol.calls import lookup
from djinn_protocol.errors import (ConnectionLostError, DjinnError, InvalidArgumentError,
                                   ServerError, UnknownModelError, error_reply)
from kernel_server.transport.authenticator import TokenAuthenticator, server_tls_context
from kernel_server.transport.server import (PROTOCOL_CONFIG, REQUEST_SLACK, LimitedChannel,
                                            _Stream, listen)

from .peer import Peer, relay, split_address, tls_context

log = logging.getLogger("kernel_server.cluster")
#: calls the directory answers (the rest of the table is for kernel servers)
DIRECTORY_CALLS = ("hello", "ping", "cluster_status", "cluster_place", "cluster_relay",
                   "cluster_moved")
#: a placement counts as one more session on its replica until the replica's own count
#: shows it, or this many seconds (a client that never opened its session)
PLACEMENT_HOLD_S = 30.0


class Directory:
    """Replicas by id: ``register()`` when one (re)starts, ``unregister()`` when it stops."""

    def __init__(self, cfg, operator_key: str):
        self.cfg = cfg
        self.operator_key = operator_key
        self.token = cfg.token()
        self.tls = tls_context(cfg.certfile)
        self._replicas: dict[str, dict] = {}
        self._peers: dict[str, Peer] = {}
        self._moved: dict[tuple[str, str], dict] = {}   # (replica, old session) -> where it went
        # replica -> times of placements its session count does not show yet: clients that
        # ask at the same moment are spread, not all sent to the replica that looked idlest
        self._pending: dict[str, list[float]] = {}
        self._lock = threading.RLock()
        self._place_lock = threading.Lock()

    # ---- replicas ----------------------------------------------------------------------
    def register(self, desc: dict) -> None:
        """A replica serves at ``desc["address"]`` (a restart re-registers with a new one)."""
        with self._lock:
            old = self._replicas.get(desc["id"])
            restarts = 0 if old is None else old["restarts"] + (old["pid"] != desc["pid"])
            self._drop_peer(desc["id"])
            desc = {k: v for k, v in desc.items() if k != "alive"}   # health: asked, not told
            self._replicas[desc["id"]] = {**desc, "restarts": restarts, "healthy": None,
                                          "draining": False, "load": None, "checked": None}
        log.info("replica %s (%s) at %s", desc["id"], desc["model"], desc["address"])

    def unregister(self, replica_id: str) -> None:
        with self._lock:
            self._replicas.pop(replica_id, None)
            self._drop_peer(replica_id)

    def _drop_peer(self, replica_id: str) -> None:
        peer = self._peers.pop(replica_id, None)
        if peer is not None:
            peer.close()

    def _peer(self, replica_id: str) -> Peer:
        with self._lock:
            peer = self._peers.get(replica_id)
            rec = self._replicas.get(replica_id)
        if rec is None:
            raise InvalidArgumentError(f"no replica {replica_id!r} in this cluster")
        if peer is None:
            peer = Peer(rec["address"], self.token, self.tls, operator_key=self.operator_key)
            with self._lock:
                self._peers[replica_id] = peer
        return peer

    def check(self, replica_id: str) -> dict:
        """Ask one replica for its load now; it is healthy if it answers."""
        with self._lock:
            rec = self._replicas.get(replica_id)
        if rec is None:
            raise InvalidArgumentError(f"no replica {replica_id!r} in this cluster")
        try:
            load = self._peer(replica_id).call("cluster_load")
            healthy = True
        except DjinnError as exc:
            log.warning("replica %s does not answer: %s", replica_id, exc)
            with self._lock:
                self._drop_peer(replica_id)
            load, healthy = None, False
        with self._lock:
            before = (rec["load"] or {}).get("total_sessions")
            now = (load or {}).get("total_sessions")
            pending = [t for t in self._pending.get(replica_id, [])
                       if time.monotonic() - t < PLACEMENT_HOLD_S]
            if before is not None and now is not None and now > before:
                pending = pending[now - before:]       # that many placements have arrived
            self._pending[replica_id] = pending
            rec.update(healthy=healthy, load=load, checked=time.time())
        return rec

    def refresh(self) -> None:
        for rid in self.replica_ids():
            self.check(rid)

    def set_draining(self, replica_ids) -> None:
        """No new sessions or moves go to these replicas from now on."""
        with self._lock:
            for rid in replica_ids:
                if rid in self._replicas:
                    self._replicas[rid]["draining"] = True

    def replica_ids(self) -> list[str]:
        with self._lock:
            return list(self._replicas)

    def replica(self, replica_id: str) -> dict:
        with self._lock:
            if replica_id not in self._replicas:
                raise InvalidArgumentError(f"no replica {replica_id!r} in this cluster; it has "
                                           f"{', '.join(self._replicas) or 'none'}")
            return dict(self._replicas[replica_id])

    # ---- what clients ask --------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            replicas = [dict(r) for r in self._replicas.values()]
        models: dict = {}
        for r in replicas:
            m = models.setdefault(r["name"], {"model": r["model"], "replicas": 0, "healthy": 0,
                                              "sessions": 0, "tokens_per_s": 0.0})
            m["replicas"] += 1
            m["healthy"] += bool(r["healthy"])
            if r["healthy"] and r["load"]:
                m["sessions"] += r["load"].get("total_sessions", 0)
                m["tokens_per_s"] += r["load"].get("tokens_per_s", 0.0)
        return {"replicas": replicas, "models": models}

    def place(self, model: str, exclude=()) -> dict:
        """The least-loaded healthy replica serving ``model`` (its config name or the model
        it loads), not in ``exclude``, not draining: fewest sessions (running, paused and
        ready alike, plus placements it has not shown yet), then fewest tokens/s decoded
        (over the replica's last 10 s), then least device memory in use, then config order.
        Loads are asked now, and placements are made one at a time, so clients asking one
        after another or at once are spread."""
        with self._lock:
            ids = [rid for rid, r in self._replicas.items()
                   if model in (r["name"], r["model"]) and rid not in exclude]
            known = sorted({r["name"] for r in self._replicas.values()})
        if not ids:
            raise UnknownModelError(f"this cluster serves no model {model!r} (other than on "
                                    f"{', '.join(exclude)})" if exclude else
                                    f"this cluster serves no model {model!r}; it serves "
                                    f"{', '.join(known) or 'nothing yet'}")
        order = {rid: i for i, rid in enumerate(ids)}

        def key(rec):
            load = rec["load"] or {}
            mem = sum(d.get("allocated_bytes") or 0 for d in load.get("memory") or [])
            sessions = load.get("total_sessions", 0) + len(self._pending.get(rec["id"], []))
            return (sessions, load.get("tokens_per_s", 0.0), mem, order[rec["id"]])
        with self._place_lock:                  # one placement at a time sees the others
            live = [r for r in map(self.check, ids) if r["healthy"] and not r["draining"]]
            if not live:
                raise ConnectionLostError(f"no healthy replica of {model!r} now "
                                          f"({', '.join(ids)} do not answer or are draining)")
            with self._lock:
                best = dict(min(live, key=key))
                self._pending.setdefault(best["id"], []).append(time.monotonic())
        return best

    def relay(self, source: str, offer: dict, target: str, upload: dict) -> dict:
        """Stream a checkpoint file from replica ``source``'s bulk offer into replica
        ``target``'s upload: server to server, never through the notebook."""
        src, dst = self.replica(source), self.replica(target)
        for name, d in (("offer", offer), ("upload", upload)):
            if not isinstance(d.get("port"), int) or not isinstance(d.get("nonce"), str):
                raise InvalidArgumentError(f"cluster_relay(): {name} must be "
                                           "{'port': int, 'nonce': str}")
        n = relay(split_address(src["address"])[0], offer, split_address(dst["address"])[0],
                  upload, tls=self.tls)
        return {"nbytes": n}

    def moved(self, replica_id: str, sessions: list) -> list:
        """Where a drain of ``replica_id`` moved these sessions (the ids a client held)."""
        with self._lock:
            return [{"session": s, **self._moved[(replica_id, s)]} for s in sessions
                    if isinstance(s, str) and (replica_id, s) in self._moved]

    # ---- draining ----------------------------------------------------------------------
    def drain(self, replica_id: str) -> list[dict]:
        """Before ``replica_id`` stops: no new sessions go there, and every paused or ready
        session of a client that can re-attach is moved to another healthy replica of the
        same model (checkpoint file relayed replica to replica), kept there for its client
        to attach (``ClusterClient.reconnect()`` asks ``cluster_moved``). With no other
        replica, the file goes to ``drain_dir`` if the config names one. Returns what was
        done with each session."""
        self.set_draining([replica_id])
        with self._lock:
            rec = self._replicas.get(replica_id)
        if rec is None:
            return []
        try:
            handed = self._peer(replica_id).call("handover_out")
        except DjinnError as exc:
            log.warning("cannot drain replica %s: %s", replica_id, exc)
            return []
        out = []
        for item in handed:
            done = {"session": item["session"], "state": item["state"]}
            try:
                target = self.place(rec["name"], exclude=[replica_id])
            except DjinnError:
                target = None
            try:
                if target is not None:
                    peer = self._peer(target["id"])
                    upload = peer.call("begin_upload", nbytes=item["offer"]["nbytes"])
                    self.relay(replica_id, item["offer"], target["id"], upload)
                    new = peer.call("handover_in", upload=upload["nonce"],
                                    principal=item["principal"])
                    where = {"replica": target["id"], "address": target["address"],
                             "moved_to": new["session"]}
                    with self._lock:
                        self._moved[(replica_id, item["session"])] = where
                    done.update(where)
                elif self.cfg.drain_dir:
                    done["file"] = str(self._save(replica_id, item))
                else:
                    done["lost"] = "no other healthy replica of this model and no drain_dir"
            except DjinnError as exc:
                done["lost"] = f"{type(exc).__name__}: {exc}"
            out.append(done)
            log.info("drain %s: %s", replica_id, done)
        return out

    def _save(self, replica_id: str, item: dict) -> Path:
        from kernel_server.cluster.peer import _bulk_socket
        from djinn_protocol.framing import LENGTH, recv_exact
        folder = Path(self.cfg.drain_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{replica_id.replace('/', '-')}-{item['session']}.djckpt"
        host = split_address(self.replica(replica_id)["address"])[0]
        with _bulk_socket(host, item["offer"]["port"], item["offer"]["nonce"], self.tls, 120) as s:
            (n,) = LENGTH.unpack(recv_exact(s, LENGTH.size))
            path.write_bytes(recv_exact(s, n))
        os.chmod(path, 0o600)
        return path

    def close(self) -> None:
        with self._lock:
            for rid in list(self._peers):
                self._drop_peer(rid)


class DirectoryServer:
    """The directory's endpoint: the kernel server's opening (TLS, token) and rpyc framing,
    and one exposed ``call(name, packed)`` answering ``DIRECTORY_CALLS`` only."""

    def __init__(self, directory: Directory, host: str, port: int = 0):
        cfg = directory.cfg
        self.directory = directory
        tls = server_tls_context(cfg.certfile, cfg.keyfile) if cfg.certfile else None
        self.authenticator = TokenAuthenticator(directory.token, tls)
        self._listener = listen(host, port)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: set = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="djinn-directory", daemon=True).start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)
                continue
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        try:
            try:
                opened, _ = self.authenticator(sock)
            except AuthenticationError as exc:
                log.info("directory: connection refused: %s", exc)
                return
            service = _DirectoryService(self.directory)
            channel = LimitedChannel(_Stream(opened), (1 << 20) + REQUEST_SLACK)
            rpyc.Connection(service, channel, PROTOCOL_CONFIG).serve_all()
        except Exception:
            log.exception("directory connection ended abruptly")
        finally:
            with self._lock:
                self._sockets.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _DirectoryService(rpyc.Service):
    def __init__(self, directory: Directory):
        self.directory = directory

    def exposed_call(self, name, packed=None):
        try:
            args = {} if packed is None else wire.unpack(packed)
            return wire.pack({"ok": self._run(name, args)})
        except DjinnError as exc:
            return wire.pack(error_reply(exc))
        except Exception as exc:
            log.error("error in directory call %s", str(name)[:80], exc_info=exc)
            return wire.pack(error_reply(ServerError(f"{str(name)[:80]} failed inside the "
                                                     f"directory: {type(exc).__name__}: {exc}")))

    def _run(self, name, args):
        call = lookup(name)
        if call.name not in DIRECTORY_CALLS:
            raise InvalidArgumentError(f"{call.name} is a call of a kernel server; this is a "
                                       "cluster directory (it answers "
                                       f"{', '.join(DIRECTORY_CALLS)}): open a session with "
                                       "client.session(model=...) and call it there")
        d = self.directory
        if call.name == "hello":
            call.bind(args)
            st = d.status()   # (the last known health: hello stays cheap)
            return {"version": __version__, "cluster": True, "owner": None, "limits": {},
                    "models": st["models"], "default_model": next(iter(st["models"]), None),
                    "loaded_models": sorted(st["models"])}
        bound = call.bind(args)
        if call.name == "ping":
            return None
        if call.name == "cluster_status":
            d.refresh()                  # health and load asked of every replica now
            return d.status()
        if call.name == "cluster_place":
            return d.place(bound["model"], exclude=[str(x) for x in bound["exclude"]])
        if call.name == "cluster_relay":
            return d.relay(**bound)
        return d.moved(bound["replica"], bound["sessions"])
