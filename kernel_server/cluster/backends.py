"""Where replicas run. ``ProcessBackend``: local subprocesses supervised by the ``up``
process (restarted when they die, up to ``max_restarts``), no Ray. ``RayBackend``: one Ray
actor per replica, placed by Ray with the resources its config asks (``num_gpus``,
``num_cpus``, ``memory``) and restarted by Ray when it dies; the directory is a named Ray
actor. Both run the same ``Replica`` and ``Directory`` objects."""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import ClusterConfig
from .directory import Directory, DirectoryServer
from .replica import Replica

log = logging.getLogger("kernel_server.cluster")
DIRECTORY_ACTOR = "djinn-directory"
#: what the ``up`` process asks of the directory (``run``)
DIRECTORY_METHODS = ("refresh", "status", "drain", "set_draining", "replica_ids")


def _log_path(log_dir, replica_id: str) -> str | None:
    if not log_dir:
        return None
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(log_dir) / f"replica-{replica_id.replace('/', '-')}.log")


def assign_gpus(cfg: ClusterConfig) -> dict[str, str]:
    """The process backend's stand-in for Ray's GPU placement: each replica asking
    ``num_gpus`` gets that many GPUs of its own (``CUDA_VISIBLE_DEVICES``), in order, from
    the config's ``gpus`` list or else every GPU of this machine. A replica whose ``env``
    sets ``CUDA_VISIBLE_DEVICES`` itself is left alone."""
    import math
    wanted = [(rid, math.ceil(spec.num_gpus)) for rid, spec in cfg.replica_ids()
              if spec.num_gpus and "CUDA_VISIBLE_DEVICES" not in spec.env]
    if not wanted:
        return {}
    pool = [str(g) for g in cfg.gpus] if cfg.gpus is not None else None
    if pool is None:
        import torch
        pool = [str(i) for i in range(torch.cuda.device_count())]
    need = sum(n for _, n in wanted)
    if need > len(pool):
        from djinn_protocol.errors import LimitExceededError
        raise LimitExceededError(f"the replicas ask for {need} GPUs; this machine (or the "
                                 f"config's gpus) has {len(pool)}: {pool}")
    out, i = {}, 0
    for rid, n in wanted:
        out[rid] = ",".join(pool[i:i + n])
        i += n
    return out


class ProcessBackend:
    """Replicas as subprocesses of this process; the directory in this process."""

    def __init__(self, cfg: ClusterConfig, operator_key: str, log_dir=None):
        self.cfg = cfg
        self.directory = Directory(cfg, operator_key)
        self.server = DirectoryServer(self.directory, cfg.host, cfg.directory_port)
        self.address = self.server.address
        self._key = operator_key
        self._log_dir = log_dir
        self._replicas: dict[str, Replica] = {}
        self._restarts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = False
        specs = cfg.replica_ids()
        self._gpus = assign_gpus(cfg)
        try:
            with ThreadPoolExecutor(max_workers=len(specs)) as pool:
                list(pool.map(lambda rs: self._start(*rs), specs))
        except BaseException:
            self.stop()
            raise

    def _start(self, replica_id: str, spec) -> None:
        gpus = self._gpus.get(replica_id)
        replica = Replica(replica_id, self.cfg, spec, self._key, _log_path(self._log_dir, replica_id),
                          on_exit=lambda code: self._died(replica_id, spec, code),
                          env=None if gpus is None else {"CUDA_VISIBLE_DEVICES": gpus})
        with self._lock:
            self._replicas[replica_id] = replica
        self.directory.register(replica.describe())

    def _died(self, replica_id: str, spec, code: int) -> None:
        """A replica's server ended on its own: start it again, as Ray would."""
        with self._lock:
            n = self._restarts.get(replica_id, 0)
            if self._stopping or n >= spec.max_restarts:
                log.error("replica %s exited (%s); not restarted", replica_id, code)
                return
            self._restarts[replica_id] = n + 1
        log.warning("replica %s exited (%s); restart %d of %d", replica_id, code, n + 1,
                    spec.max_restarts)
        threading.Thread(target=self._start, args=(replica_id, spec), daemon=True).start()

    def run(self, method: str, *args):
        if method not in DIRECTORY_METHODS:
            raise AttributeError(method)
        return getattr(self.directory, method)(*args)

    def stop_replica(self, replica_id: str) -> None:
        with self._lock:
            replica = self._replicas.pop(replica_id, None)
        self.directory.unregister(replica_id)
        if replica is not None:
            replica.stop()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            ids = list(self._replicas)
        for rid in ids:
            self.stop_replica(rid)
        self.server.close()
        self.directory.close()


# ---- Ray ---------------------------------------------------------------------------------------
class ReplicaActor:
    """One replica in a Ray actor. If its server dies, the actor exits, and Ray restarts it
    (``max_restarts``): a fresh server, registered again with the directory."""

    def __init__(self, replica_id, cfg, spec, operator_key, directory, log_path):
        import ray
        self.replica = Replica(replica_id, cfg, spec, operator_key, log_path, on_exit=self._died)
        ray.get(directory.register.remote(self.replica.describe()))

    def _died(self, code):
        os._exit(1)             # Ray sees the actor die and restarts it

    def describe(self) -> dict:
        return self.replica.describe()

    def stop(self) -> None:
        self.replica.stop()


class DirectoryActor:
    """The directory and its endpoint inside a named Ray actor."""

    def __init__(self, cfg, operator_key):
        self.directory = Directory(cfg, operator_key)
        self.server = DirectoryServer(self.directory, cfg.host, cfg.directory_port)

    def address(self) -> str:
        return self.server.address

    def register(self, desc: dict) -> None:
        self.directory.register(desc)

    def unregister(self, replica_id: str) -> None:
        self.directory.unregister(replica_id)

    def run(self, method: str, *args):
        """``Directory.<method>(*args)`` for the ``up`` process (``Cluster``)."""
        if method not in DIRECTORY_METHODS:
            raise AttributeError(method)
        return getattr(self.directory, method)(*args)

    def close(self) -> None:
        self.server.close()
        self.directory.close()


class RayBackend:
    """Replica actors placed by Ray; the directory actor on this node (its endpoint is the
    address clients are given)."""

    def __init__(self, cfg: ClusterConfig, operator_key: str, log_dir=None):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        opts = cfg.ray or {}
        if not ray.is_initialized():
            ray.init(address=opts.get("address"), namespace=opts.get("namespace", "djinn"),
                     num_cpus=opts.get("num_cpus"), include_dashboard=False,
                     log_to_driver=bool(opts.get("log_to_driver", False)))
        self.cfg = cfg
        here = ray.get_runtime_context().get_node_id()
        self.directory = ray.remote(DirectoryActor).options(
            name=opts.get("directory_name", DIRECTORY_ACTOR), num_cpus=0, max_concurrency=16,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(cfg, operator_key)
        self.address = ray.get(self.directory.address.remote())
        self.actors: dict = {}
        try:
            for replica_id, spec in cfg.replica_ids():
                self.actors[replica_id] = ray.remote(ReplicaActor).options(
                    name=f"djinn-replica-{replica_id}", num_cpus=spec.num_cpus,
                    num_gpus=spec.num_gpus, memory=spec.memory, max_restarts=spec.max_restarts,
                    max_task_retries=0, max_concurrency=4,
                ).remote(replica_id, cfg, spec, operator_key, self.directory,
                         _log_path(log_dir, replica_id))
            # every replica has started (its constructor registered it) before up() returns
            ray.get([a.describe.remote() for a in self.actors.values()],
                    timeout=cfg.start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def run(self, method: str, *args):
        import ray
        return ray.get(self.directory.run.remote(method, *args))

    def stop_replica(self, replica_id: str) -> None:
        import ray
        actor = self.actors.pop(replica_id, None)
        ray.get(self.directory.unregister.remote(replica_id))
        if actor is not None:
            try:
                ray.get(actor.stop.remote(), timeout=60)
            except Exception as exc:        # (already dead)
                log.warning("replica %s: %s", replica_id, exc)
            ray.kill(actor, no_restart=True)

    def stop(self) -> None:
        import ray
        for rid in list(self.actors):
            self.stop_replica(rid)
        try:
            ray.get(self.directory.close.remote(), timeout=30)
        except Exception:
            pass
        ray.kill(self.directory, no_restart=True)
