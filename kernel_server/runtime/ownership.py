"""Who may use a session: the connection holding it, and, for a grace period after that
connection is gone, a new connection that proves the same identity (re-attach).

Every connection gets an *owner id* (128 random bits, told only to that connection in its
``hello`` reply); its sessions and checkpoints carry that id, and every call checks it,
so no other connection can read, resume, restore or close them. With
``--reconnect-grace-s S > 0``, a connection that goes away leaves its sessions (paused
ones too) and checkpoints *orphaned* for S seconds instead of releasing them; a new
connection takes them back if its *principal* equals the one the old connection had:

- the principal of a connection is the token it proved to the authenticator (the HMAC
  challenge; the token never travels), combined with the client's owner key when the
  client sent one (``hello(owner_key=...)``: an HMAC of the user's key, never the key);
- without a token and without an owner key, a connection has no principal and its
  sessions are released at disconnect whatever the grace period.

``reattach(old_owner)`` (``client.reconnect()``) moves everything the old owner id held;
it needs the old owner id too, which only that client was told. ``attach(session)`` (a
new process: ``client.attach(id)``) moves one orphaned session, and the checkpoints its
connection left, to a connection of the same principal. Anything else (another
principal, a live connection's session, a released one) is ``UnknownSessionError``,
the same answer as for an id that never existed.

Caps (sessions, pending bulk offers) count over three *scopes* of a connection, and each
must hold (``Owners.scopes``): the connection itself, its principal (all connections of the
same token and owner key), and its *peer*: all connections from the same host that proved
the same credentials, whatever owner keys they declare. An owner key is the client's own
word, so a fresh one per connection (or per ``hello``) makes a fresh principal: only the
peer scope stops one process from filling the server that way.
"""
from __future__ import annotations

import hashlib
import logging
import threading

from djinn_protocol.errors import InvalidArgumentError, UnknownSessionError

log = logging.getLogger("kernel_server")


def peer_of(credentials, address) -> str | None:
    """The peer scope of a connection: the credentials it proved (the token, or none on a
    loopback server without one) at the host it came from. None: unknown (in-process)."""
    if address is None:
        return None
    host = address[0] if isinstance(address, tuple) else str(address)
    return f"{'token' if credentials else 'open'}@{host}"


def principal(credentials, owner_proof) -> str | None:
    """The identity re-attachment checks: the authenticator's credentials ("token" or
    None) and the client's owner proof (or None). None: nobody can re-attach."""
    if owner_proof is None:
        return "token" if credentials else None
    if not isinstance(owner_proof, str) or not 16 <= len(owner_proof) <= 256:
        raise InvalidArgumentError("owner_key proof must be a str of 16..256 characters")
    return hashlib.sha256(f"{credentials or ''}|{owner_proof}".encode()).hexdigest()


class Owners:
    """Principals of live connections, and orphaned owners waiting out the grace period."""

    def __init__(self, sessions, checkpoints, grace_s: float = 0.0):
        self.sessions = sessions
        self.checkpoints = checkpoints
        self.grace_s = float(grace_s)
        self._principals: dict[str, str | None] = {}   # owner id -> principal (live or orphaned)
        self._orphans: dict[str, threading.Timer] = {}   # orphaned owner id -> its release timer
        self._peers: dict[str, str] = {}                 # owner id -> its peer (see peer_of)
        self._lock = threading.Lock()
        self._closed = False

    def connected(self, owner: str, who: str | None, peer: str | None = None) -> None:
        with self._lock:
            self._principals[owner] = who
            if peer is not None:
                self._peers[owner] = peer

    def scopes(self, owner: str) -> list[tuple[str, set[str]]]:
        """What a cap counts for a request of ``owner``: ``(scope, owner ids)`` for its
        connection, its principal and its peer (live and orphaned connections alike)."""
        with self._lock:
            who = self._principals.get(owner)
            peer = self._peers.get(owner)
            out = [("connection", {owner})]
            if who is not None:
                out.append(("principal", {o for o, p in self._principals.items() if p == who}))
            if peer is not None:
                out.append(("peer", {o for o, p in self._peers.items() if p == peer}))
            return out

    def _forget(self, owner: str) -> None:
        self._principals.pop(owner, None)
        self._peers.pop(owner, None)

    def principal_of(self, owner: str) -> str | None:
        with self._lock:
            return self._principals.get(owner)

    def owners_of(self, who: str) -> list[str]:
        """The owner ids (live or orphaned connections) of principal ``who``."""
        with self._lock:
            return [o for o, p in self._principals.items() if p == who]

    def disconnected(self, owner: str) -> int | None:
        """The connection of ``owner`` is gone: release its sessions and checkpoints now
        (returns how many sessions), or keep them for the grace period (returns None)."""
        with self._lock:
            who = self._principals.get(owner)
            if self.grace_s > 0 and who is not None and not self._closed:
                timer = threading.Timer(self.grace_s, self._expire, (owner,))
                timer.daemon = True
                self._orphans[owner] = timer
                timer.start()
                return None
            self._forget(owner)
        return self._release(owner)

    def _expire(self, owner: str) -> None:
        with self._lock:
            if self._orphans.pop(owner, None) is None:   # re-attached meanwhile
                return
            self._forget(owner)
        n = self._release(owner)
        log.info("grace period over for client %s: released %d sessions", owner[:8], n)

    def _release(self, owner: str) -> int:
        n = self.sessions.close_owner(owner)
        self.checkpoints.drop_owner(owner)
        return n

    def _move_checkpoints(self, old: str, new: str) -> list[str]:
        moved = []
        for desc in self.checkpoints.list(old):
            try:
                ck = self.checkpoints.get(desc["id"], old)
            except InvalidArgumentError:   # deleted meanwhile
                continue
            ck.owner = new
            moved.append(ck.id)
        return moved

    def _drop_orphan(self, owner: str) -> None:
        timer = self._orphans.pop(owner, None)
        if timer is not None:
            timer.cancel()
        self._forget(owner)

    def reattach(self, old: str, new: str) -> dict:
        """Move all that owner ``old`` holds to ``new`` (``client.reconnect()``). The old
        connection may still look alive (the server has not seen it close yet): knowing
        its owner id and having its principal is the proof. Nothing matching: empty lists."""
        nothing = {"sessions": [], "checkpoints": []}
        if not isinstance(old, str):
            raise InvalidArgumentError("owner must be a str")
        with self._lock:
            who = self._principals.get(new)
            if (self.grace_s <= 0 or who is None or old == new or old not in self._principals
                    or self._principals[old] != who):
                return nothing
            self._drop_orphan(old)
            # (a still-live old connection finds nothing to release when it does go)
            sessions = self.sessions.move(old, new)
            checkpoints = self._move_checkpoints(old, new)
        log.info("client %s re-attached %d sessions, %d checkpoints of %s", new[:8],
                 len(sessions), len(checkpoints), old[:8])
        return {"sessions": sessions, "checkpoints": checkpoints}

    def attach(self, session_id, new: str) -> None:
        """Move one orphaned session of the same principal, and the checkpoints its
        connection left, to ``new`` (``client.attach(id)`` from another process)."""
        unknown = UnknownSessionError(f"no session {session_id!r} on this server that this "
                                      "client may attach (it must be a disconnected client's, "
                                      "within --reconnect-grace-s, opened with the same token "
                                      "and owner key)")
        if not isinstance(session_id, str):
            raise InvalidArgumentError("session id must be a str")
        with self._lock:
            who = self._principals.get(new)
            old = self.sessions.owner_of(session_id)
            if (self.grace_s <= 0 or who is None or old is None or old not in self._orphans
                    or self._principals.get(old) != who):
                raise unknown
            self.sessions.move(old, new, session_id)
            self._move_checkpoints(old, new)
            if not self.sessions.owned_by(old):
                self._drop_orphan(old)
        log.info("client %s attached session %s of %s", new[:8], session_id, old[:8])

    def close(self) -> None:
        """Server shutdown: no more orphans; pending releases are left to close_all()."""
        with self._lock:
            self._closed = True
            for timer in self._orphans.values():
                timer.cancel()
            self._orphans.clear()
