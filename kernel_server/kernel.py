"""What every connection of one kernel server shares: models, sessions, checkpoints, owners."""
from __future__ import annotations

import threading

from djinn_protocol import __version__
from djinn_protocol.errors import DjinnError, LimitExceededError
from kernel_server.checkpoints.store import CheckpointStore
from kernel_server.model.expressions import PLUGINS
from kernel_server.model.loading import DEFAULT_MODEL, REGISTRY, admit
from kernel_server.model.registry import ModelRegistry
from kernel_server.runtime.ownership import Owners
from kernel_server.runtime.session_manager import SessionManager
from kernel_server.model.validation import Limits


class Kernel:
    """The model registry, the sessions, the checkpoint store and the limits of one server."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str | None = None,
                 dtype: str | None = None, limits: Limits | None = None, allow_load: bool = True,
                 device_map=None, max_memory=None):
        self.limits = limits or Limits()
        # device_map / max_memory: every model over several devices (kernel_server.model.sharding)
        self.models = ModelRegistry(model, device, dtype, allow_load,
                                    max_models=self.limits.max_models,
                                    device_map=device_map, max_memory=max_memory)
        self.sessions = SessionManager(self.limits)
        self.checkpoints = CheckpointStore(int(self.limits.checkpoint_budget_mb * 2**20),
                                           int(self.limits.pinned_pool_mb * 2**20))
        self.owners = Owners(self.sessions, self.checkpoints, self.limits.reconnect_grace_s)
        self.sessions.scopes = self.owners.scopes      # session caps count over these scopes
        self.bulk_host = "127.0.0.1"   # where one-shot bulk listeners bind (the server's host)
        self.bulk_tls = None           # the server's TLS context: bulk transfers use it too
        # --operator-stats: hello() also tells server-wide figures (every client: one operator)
        self.operator_stats = False
        self._offers: dict[str, list] = {}    # owner id -> its bulk downloads not yet fetched
        self._offers_lock = threading.Lock()

    def model(self, name=None):
        """The loaded model ``name``, loaded first if needed, after admission: a model whose
        weights (estimated from its config) do not fit the free memory of its device is
        refused before anything is built (``LimitExceededError``)."""
        name = name or self.models.default
        if isinstance(name, str) and name not in self.models.loaded() and self.models.allow_load \
                and not self.models.device_map:
            admit(name, self.models.device, self.models.dtype)
        return self.models.get(name)

    def hold_offer(self, owner: str, make):
        """``make()`` a bulk offer for the connection ``owner`` unless one of its scopes
        (``Owners.scopes``) already has its cap of offers waiting to be fetched: the
        connection and its principal ``--max-offers-per-client``, its peer (the host and
        credentials, whatever owner keys) ``--max-offers-per-peer``."""
        lim = self.limits
        with self._offers_lock:
            self._offers = {o: live for o, v in self._offers.items()
                            if (live := [t for t in v if not t.done])}
            for scope, owners in self.owners.scopes(owner):
                held = sum(len(self._offers.get(o, ())) for o in owners)
                cap, option, who = ((lim.max_offers_per_peer, "--max-offers-per-peer",
                                     "the connections from this host") if scope == "peer" else
                                    (lim.max_offers_per_client, "--max-offers-per-client",
                                     "this client"))
                if held >= cap:
                    raise LimitExceededError(f"{held} bulk downloads are already waiting to be "
                                             f"fetched by {who} ({option}); fetch them or let "
                                             "them expire first")
            transfer = make()
            self._offers.setdefault(owner, []).append(transfer)
            return transfer

    def drop_offers(self, owner: str) -> int:
        """The connection ``owner`` is gone: withdraw its unfetched offers now (each holds a
        listener, a thread and a copy of its payload until fetched or expired)."""
        with self._offers_lock:
            transfers = self._offers.pop(owner, [])
        for t in transfers:
            t.cancel()
        return len(transfers)

    def info(self, owner: str | None = None) -> dict:
        """Server facts for the client ``owner``: its own sessions and the models it may use,
        nothing of other clients (which models they loaded, how many sessions they hold)."""
        used = set()
        mine = self.sessions.owned_by(owner) if owner is not None else []
        for sid in mine:
            try:
                used.add(self.sessions.get(sid, owner).loaded.name)
            except DjinnError:                 # closed meanwhile
                pass
        ckpts = self.checkpoints.list(owner) if owner is not None else []
        return {"version": __version__, "default_model": self.models.default,
                "loaded_models": sorted(used | {self.models.default}),
                "registry": dict(REGISTRY), "sessions": len(mine), "limits": vars(self.limits),
                "checkpoint_bytes": sum(c["nbytes"] for c in ckpts),
                "plugins": sorted(PLUGINS),
                **({"server": {"sessions": self.sessions.count(),
                               "loaded_models": self.models.loaded(),
                               "checkpoint_bytes": self.checkpoints.used_bytes}}
                   if self.operator_stats else {})}

    def memory(self) -> dict:
        """Memory per device (kernel_server.model.sharding.device_memory) and checkpoint bytes."""
        from kernel_server.model.sharding import device_memory
        return {"devices": device_memory([self.models.get(n) for n in self.models.loaded()]),
                "checkpoint_bytes": self.checkpoints.used_bytes}
