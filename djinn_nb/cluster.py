"""Sessions on a cluster of kernel servers, found through its directory
(``dj.connect("cluster://head:18870", token=...)``; servers from ``kernel_server.cluster``).

>>> cc = dj.connect("cluster://head:18870", token=...)
>>> s = cc.session(model="llama-7b")     # on the least-loaded healthy replica of llama-7b
>>> ev = s.generate(...)                  # straight to that replica: no directory in between
>>> move(s, "least-loaded")               # continue a paused session on another replica
>>> cc.reconnect()                        # after a replica died or was drained

The directory is asked only where to go (``cluster_place``) and to relay checkpoint files
between replicas (``cluster_relay``: the bytes go replica -> directory -> replica, never
through the notebook). Each replica gets its own ``Client``; all of them share this client's
token, TLS and owner key, so a session drained to another replica can be attached there.
"""
from __future__ import annotations

import secrets
import weakref

from djinn_protocol.errors import (ConnectionLostError, DjinnError, InvalidArgumentError,
                                   StateError)

from .client import Client, Closeable

SCHEME = "cluster://"


class DirectoryClient(Client):
    """The connection to the directory: the same opening, rpyc and typed errors as any
    ``Client``; it has no control channel (it answers only the ``cluster_*`` calls)."""

    def _open_control(self, host, timeout):
        return None


class ClusterClient(Closeable):
    """A client of a whole cluster. ``session(model=...)`` opens a session on the replica
    the directory picks; ``status()``; ``move``; ``load_checkpoint(path)``; ``reconnect()``."""

    def __init__(self, address: str, *, token=None, tls=None, owner_key=None,
                 timeout: float | None = None):
        if address.startswith(SCHEME):
            address = address[len(SCHEME):]
        self.address = address
        self._token, self._tls, self._timeout = token, tls, timeout
        # one owner key for every replica: what a drain hands over, this client can attach
        self._owner_key = owner_key or secrets.token_hex(32)
        self.directory = DirectoryClient(address, timeout=timeout, token=token, tls=tls)
        self.server_info = self.directory.server_info
        self.clients: dict[str, Client] = {}          # replica id -> its Client
        self._sessions = weakref.WeakSet()              # Session objects opened through us
        self._closed = False

    # ---- the directory -----------------------------------------------------------------
    def status(self) -> dict:
        """Replicas (id, model, address, healthy, load, restarts) and models of the cluster."""
        return self.directory.call("cluster_status")

    def models(self) -> dict:
        """{model name: {model, replicas, healthy}}: what ``session(model=...)`` accepts."""
        return self.status()["models"]

    def move(self, session, target="least-loaded") -> dict:
        """``move(session, target)`` (this module's function) for a session of this cluster."""
        return move(session, target)

    def place(self, model: str, exclude=()) -> dict:
        """The replica the directory picks for ``model`` now (least loaded, healthy)."""
        return self.directory.call("cluster_place", model=model, exclude=list(exclude))

    def client_for(self, replica: dict) -> Client:
        """This cluster client's ``Client`` of ``replica`` (a directory record), opened now
        if needed (again if its connection was lost or the replica moved address)."""
        c = self.clients.get(replica["id"])
        if c is None or c.closed or c.address != replica["address"]:
            c = Client(replica["address"], timeout=self._timeout, token=self._token,
                       tls=self._tls, owner_key=self._owner_key)
            c.cluster, c.replica = self, replica["id"]
            self.clients[replica["id"]] = c
        return c

    # ---- sessions ----------------------------------------------------------------------
    def session(self, model: str | None = None):
        """A new session on the least-loaded healthy replica of ``model`` (a model name of
        ``models()``; None: the cluster's first model)."""
        from .session import Session
        model = model or self.server_info.get("default_model")
        replica = self.place(model)
        client = self.client_for(replica)
        s = Session(client, client.call("open_session", model=None))
        self._sessions.add(s)
        return s

    def load_checkpoint(self, path, model: str | None = None):
        """Load a saved checkpoint file on the least-loaded healthy replica of its model
        (``model``: the model name to place by; default the file's model, matched against
        the names and loaded models of the cluster). Returns the ``Checkpoint``; its session
        is ``ck.session``."""
        from pathlib import Path
        from djinn_protocol.checkpoint_file import read_metadata
        if model is None:
            loaded = read_metadata(Path(path).read_bytes())["identity"]["model"]
            models = self.models()
            model = next((n for n, m in models.items() if loaded in (n, m["model"])), loaded)
        client = self.client_for(self.place(model))
        ck = client.load_checkpoint(path)
        self._sessions.add(ck.session)
        return ck

    def reconnect(self) -> dict:
        """After a replica died or was drained: reopen lost connections through the
        directory (a restarted replica has a new address), and re-attach every session a
        drain moved to another replica (same ``Session`` objects, now on that replica).
        Sessions of a replica that died are gone: load their saved checkpoint files with
        ``load_checkpoint(path)``. Returns {"moved": [session ids], "lost": [session ids]}."""
        status = {r["id"]: r for r in self.status()["replicas"]}
        dead = {rid: c for rid, c in self.clients.items() if not _alive(c)}
        for rid, c in dead.items():
            del self.clients[rid]
            c.close()
        moved, lost = [], []
        for rid, c in dead.items():
            # (closed ones aside: a drain moves none of them and none are lost)
            mine = [s for s in list(self._sessions) if s.client is c and not s.closed]
            where = {m["session"]: m for m in self.directory.call(
                "cluster_moved", replica=rid, sessions=[s.id for s in mine])}
            for s in mine:
                m = where.get(s.id)
                if m is None or m["replica"] not in status:
                    lost.append(s.id)
                    continue
                client = self.client_for(status[m["replica"]])
                info = client.call("attach", session=m["moved_to"])
                _repoint(s, client, info)
                moved.append(s.id)
        return {"moved": moved, "lost": lost}

    def close(self) -> None:
        for c in list(self.clients.values()):
            try:
                c.close()
            except Exception:
                pass
        self.clients.clear()
        self.directory.close()
        self._closed = True

    def __repr__(self):
        return (f"<djinn_nb.ClusterClient {self.address} "
                f"({'closed' if self._closed else 'open'}): {', '.join(self.server_info.get('models') or [])}>")


def _alive(client: Client) -> bool:
    if client.closed:
        return False
    try:
        client.ping()
        return True
    except ConnectionLostError:
        return False


def _repoint(session, client: Client, info: dict) -> None:
    """The same ``Session`` object, now the session ``info`` on ``client``."""
    session.client = client
    session.id = info["id"]
    session.device = info.get("device", session.device)
    session.devices = info.get("devices", [session.device])
    session.layer_devices = info.get("layer_devices", session.layer_devices)
    session.last_event = None


def move(session, target="least-loaded") -> dict:
    """Continue ``session`` (paused, or ready, or finished) on another replica of its model:
    ``target`` is "least-loaded" (the directory's pick among the other replicas) or a replica
    id (``cluster.status()["replicas"][i]["id"]``). The session is checkpointed where it is,
    the file streams from that replica to the target through the directory (not through
    this notebook), it is restored there, and the old one is closed. The same ``Session``
    object then talks to the new replica, in state "ready": ``resume()`` gives the tokens it
    would have given where it was. Returns {"from", "to", "nbytes"}.

    Bound as ``Session.move(target)`` for sessions opened through a ``ClusterClient``."""
    cluster = session.client.cluster
    if not isinstance(cluster, ClusterClient):
        raise InvalidArgumentError("move() needs a session opened through "
                                   "dj.connect('cluster://...')")
    state = session.state
    if state not in ("paused", "ready", "finished"):
        raise StateError(f"session {session.id} is {state}: move() needs it paused, ready or "
                         "finished (at a token boundary)")
    source = session.client.replica
    model = cluster.directory.call("cluster_status")
    name = next(r["name"] for r in model["replicas"] if r["id"] == source)
    if target == "least-loaded":
        replica = cluster.place(name, exclude=[source])
    elif isinstance(target, str):
        replica = next((r for r in model["replicas"] if r["id"] == target), None)
        if replica is None or replica["name"] != name:
            raise InvalidArgumentError(f"no replica {target!r} of {name!r} in this cluster: "
                                       + ", ".join(r["id"] for r in model["replicas"]
                                                   if r["name"] == name))
        if target == source:
            raise InvalidArgumentError(f"session {session.id} is on {source} already")
    else:
        raise InvalidArgumentError(f"target must be 'least-loaded' or a replica id, got {target!r}")
    src = session.client
    ck = session.checkpoint().wait()
    try:
        offer = src.call("export_checkpoint", checkpoint=ck.id)
        dst = cluster.client_for(replica)
        upload = dst.call("begin_upload", nbytes=offer["nbytes"])
        sent = cluster.directory.call("cluster_relay", source=source,
                                      offer={"port": offer["port"], "nonce": offer["nonce"]},
                                      target=replica["id"], upload=upload)
        out = dst.call("import_checkpoint", upload=upload["nonce"])
    finally:
        try:
            ck.delete()
        except DjinnError:
            pass
    try:                              # the import made a checkpoint there too: not needed
        dst.call("delete_checkpoint", checkpoint=out["checkpoint"]["id"])
    except DjinnError:
        pass
    old_id = session.id
    try:
        src.call("close_session", session=old_id)
    except DjinnError:
        pass
    _repoint(session, dst, out["session"])
    return {"from": source, "to": replica["id"], "nbytes": sent["nbytes"], "session": session.id,
            "old_session": old_id}
