"""All sessions of a server and who owns each (see ``kernel_server.runtime.ownership``)."""
from __future__ import annotations

import threading

from djinn_protocol.errors import InvalidArgumentError, LimitExceededError, UnknownSessionError
from kernel_server.model import validation
from kernel_server.model.registry import LoadedModel
from kernel_server.runtime.session_state import Session


class SessionManager:
    """All sessions of a server, each owned by one connection (the one that opened it, or
    one that re-attached it: see ``kernel_server.runtime.ownership``)."""

    def __init__(self, limits: validation.Limits, scopes=None):
        self.limits = limits
        #: ``owner -> [(scope, owner ids)]``: whom a session cap counts (``Owners.scopes``);
        #: the kernel sets it once its ``Owners`` exists. None: the connection alone.
        self.scopes = scopes
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def _room(self, scopes) -> None:
        """``LimitExceededError`` unless one more session fits every scope the opener counts
        in: its connection and principal (``--max-sessions-per-client``) and its peer, the
        host and credentials whatever owner keys it declares (``--max-sessions-per-peer``).
        Called under the lock, so two opens cannot both take the last free place (the
        scopes are read before it: ``Owners`` takes its lock first, then this one)."""
        for scope, owners in scopes:
            held = sum(1 for s in self._sessions.values() if s.owner in owners)
            if scope == "peer":
                cap, option, who = (self.limits.max_sessions_per_peer, "--max-sessions-per-peer",
                                    "the connections from this host")
            else:
                cap, option = self.limits.max_sessions_per_client, "--max-sessions-per-client"
                who = "this client" + (" over its connections" if scope == "principal" else "")
            if held >= cap:
                raise LimitExceededError(f"{who} already hold{'s' if scope != 'peer' else ''} "
                                         f"{held} sessions, the server limit ({option}); "
                                         "close some first")

    def open(self, loaded: LoadedModel, owner: str) -> Session:
        scopes = self.scopes(owner) if self.scopes is not None else [("connection", {owner})]
        with self._lock:
            self._room(scopes)
            session = Session(loaded, self.limits, owner)
            self._sessions[session.id] = session
            return session

    def get(self, session_id, owner: str) -> Session:
        if not isinstance(session_id, str):
            raise InvalidArgumentError("session id must be a str")
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise UnknownSessionError(f"no session {session_id!r} on this server for this client")
        return session

    def close(self, session_id: str, owner: str) -> None:
        session = self.get(session_id, owner)
        session.close()
        with self._lock:
            self._sessions.pop(session_id, None)

    def close_owner(self, owner: str) -> int:
        with self._lock:
            mine = [s for s in self._sessions.values() if s.owner == owner]
            for s in mine:
                self._sessions.pop(s.id, None)
        for s in mine:
            s.close()
        return len(mine)

    def owner_of(self, session_id: str) -> str | None:
        session = self._sessions.get(session_id)
        return None if session is None else session.owner

    def owned_by(self, owner: str) -> list[str]:
        with self._lock:
            return [s.id for s in self._sessions.values() if s.owner == owner]

    def move(self, old: str, new: str, session_id: str | None = None) -> list[str]:
        """Hand ``old``'s sessions (or just ``session_id``) to owner ``new``."""
        with self._lock:
            moving = [s for s in self._sessions.values() if s.owner == old
                      and (session_id is None or s.id == session_id)]
            have = sum(1 for s in self._sessions.values() if s.owner == new)
            if moving and have + len(moving) > self.limits.max_sessions_per_client:
                raise LimitExceededError(
                    f"this client has {have} sessions; taking {len(moving)} more would pass the "
                    "server limit (--max-sessions-per-client); close some first")
            for s in moving:
                s.owner = new
            return [s.id for s in moving]

    def close_all(self) -> int:
        with self._lock:
            everyone = list(self._sessions.values())
            self._sessions.clear()
        for s in everyone:
            s.close()
        return len(everyone)

    def count(self) -> int:
        return len(self._sessions)

    def all(self) -> list[Session]:
        """Every session, of every owner (the cluster operator's drain and load figures)."""
        with self._lock:
            return list(self._sessions.values())
