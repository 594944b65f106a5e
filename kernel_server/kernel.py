"""What every connection of one kernel server shares: models, sessions, checkpoints, owners."""
from __future__ import annotations

from djinn_protocol import __version__
from kernel_server.checkpoints.store import CheckpointStore
from kernel_server.model.loading import DEFAULT_MODEL, REGISTRY
from kernel_server.model.registry import ModelRegistry
from kernel_server.runtime.ownership import Owners
from kernel_server.runtime.session_state import SessionManager
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
        self.bulk_host = "127.0.0.1"   # where one-shot bulk listeners bind (the server's host)
        self.bulk_tls = None           # the server's TLS context: bulk transfers use it too

    def info(self) -> dict:
        return {"version": __version__, "default_model": self.models.default,
                "loaded_models": self.models.loaded(), "registry": dict(REGISTRY),
                "sessions": self.sessions.count(), "limits": vars(self.limits),
                "checkpoint_bytes": self.checkpoints.used_bytes}

    def memory(self) -> dict:
        """Memory per device (kernel_server.model.sharding.device_memory) and checkpoint bytes."""
        from kernel_server.model.sharding import device_memory
        return {"devices": device_memory([self.models.get(n) for n in self.models.loaded()]),
                "checkpoint_bytes": self.checkpoints.used_bytes}
