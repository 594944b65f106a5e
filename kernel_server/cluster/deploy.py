"""``Cluster``: a deployment brought up from a config, its status, its drain and its end."""
from __future__ import annotations

import logging
import secrets

from . import config as config_mod
from .config import ClusterConfig

log = logging.getLogger("kernel_server.cluster")


class Cluster:
    """``Cluster.up(config)`` starts the directory and every replica and returns once all
    serve; ``address`` is the directory's (clients: ``dj.connect("cluster://" + address)``).
    ``status()``, ``drain(replica)``, ``down(replicas=None)``."""

    def __init__(self, cfg: ClusterConfig, backend):
        self.cfg = cfg
        self.backend = backend
        self.address = backend.address

    @classmethod
    def up(cls, config, log_dir=None, backend: str | None = None) -> "Cluster":
        """``config``: a YAML path, a dict or a ``ClusterConfig``; ``backend`` overrides the
        config's ("ray" or "process")."""
        cfg = config if isinstance(config, ClusterConfig) else (
            config_mod.from_dict(config) if isinstance(config, dict) else config_mod.load(config))
        if backend is not None:
            cfg.backend = backend
        key = secrets.token_hex(32)       # the operator's: only the directory holds it
        if cfg.backend == "ray":
            from .backends import RayBackend
            impl = RayBackend(cfg, key, log_dir)
        else:
            from .backends import ProcessBackend
            impl = ProcessBackend(cfg, key, log_dir)
        return cls(cfg, impl)

    def status(self) -> dict:
        """Every replica (id, model, address, pid, healthy, load, restarts, draining) and
        every model (replicas, healthy), asked of the replicas now."""
        self.backend.run("refresh")
        return self.backend.run("status")

    def replica_ids(self) -> list[str]:
        return self.backend.run("replica_ids")

    def drain(self, replica_id: str) -> list:
        """Move ``replica_id``'s paused and ready sessions to other replicas of its model."""
        return self.backend.run("drain", replica_id)

    def down(self, replicas=None, drain: bool = True) -> dict:
        """Stop ``replicas`` (ids; None: all, and then the directory too), each drained first
        unless ``drain=False``. Returns {replica id: what its drain did with each session}."""
        ids = self.replica_ids() if replicas is None else list(replicas)
        report = {}
        if drain:
            self.backend.run("set_draining", ids)    # nothing drains into a replica going away
            for rid in ids:
                report[rid] = self.drain(rid)
        for rid in ids:
            self.backend.stop_replica(rid)
        if replicas is None:
            self.backend.stop()
        return report

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down(drain=False)
