"""The cluster's config file (YAML): which models, how many replicas of each, what each
replica asks of its node, where everything binds, and the token and TLS of every server.

    backend: ray                 # or "process": replicas as local subprocesses, no Ray
    host: 127.0.0.1              # where the directory and every replica bind
    directory_port: 18870        # 0: a free port
    token_file: ~/.djinn/token   # needed for any host but loopback (the same for all)
    certfile: null               # TLS for the directory and every replica (keyfile too)
    reconnect_grace_s: 600       # sessions moved by a drain wait this long to be attached
    ray: {address: null, namespace: djinn}    # null: a local Ray; "auto": the running one
    gpus: [0, 1]                 # process backend: GPUs handed to replicas by num_gpus
    drain_dir: null              # where a model's last replica leaves paused sessions' files
    models:
      - name: llama-7b           # what clients ask for: session(model="llama-7b")
        model: random:llama-7b   # what the kernel server loads (--model)
        replicas: 2
        num_gpus: 1              # Ray resources of one replica (placement)
        num_cpus: 1
        memory: 40GiB
        device: auto             # --device, --dtype, --device-map of the kernel server
        dtype: bfloat16
        max_restarts: 3          # Ray restarts a replica that dies this many times
        args: [--tenants, "on"]  # any other kernel server flags
        env: {}                  # e.g. {CUDA_VISIBLE_DEVICES: "1"} (process backend)
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from djinn_protocol.errors import InvalidArgumentError

#: kernel server flags the cluster sets itself: a replica's ``args`` may not give them
RESERVED_FLAGS = ("--host", "--port", "--token-file", "--certfile", "--keyfile", "--model",
                  "--reconnect-grace-s", "--exit-with-parent")
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(value) -> int | None:
    """``40GiB``, ``512MB``, ``1073741824`` or None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidArgumentError(f"memory must be bytes or e.g. '40GiB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclasses.dataclass
class ModelSpec:
    name: str
    model: str
    replicas: int = 1
    num_gpus: float = 0
    num_cpus: float = 1
    memory: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_restarts: int = 3
    args: list = dataclasses.field(default_factory=list)
    env: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ClusterConfig:
    models: list
    backend: str = "ray"
    host: str = "127.0.0.1"
    directory_port: int = 0
    token_file: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    reconnect_grace_s: float = 600.0
    ray: dict = dataclasses.field(default_factory=dict)
    start_timeout_s: float = 600.0
    drain_dir: str | None = None     # where the last replica of a model saves paused sessions
    gpus: list | None = None         # process backend: the GPU ids to hand out (default: all)

    def replica_ids(self) -> list[tuple[str, ModelSpec]]:
        """(replica id, its model spec), e.g. ("tiny-gpt2/0", ...), in config order."""
        return [(f"{m.name}/{i}", m) for m in self.models for i in range(m.replicas)]

    def token(self) -> str | None:
        import os
        if self.token_file:
            return Path(self.token_file).expanduser().read_text().strip() or None
        return os.environ.get("DJINN_TOKEN") or None


def _fields(cls, raw: dict, where: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidArgumentError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                                   f"{', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return raw


def from_dict(raw: dict) -> ClusterConfig:
    """A checked config from its parsed YAML (or a dict built in Python)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list) or not raw["models"]:
        raise InvalidArgumentError("a cluster config needs `models:`, a non-empty list")
    raw = dict(raw)
    models = []
    for i, m in enumerate(raw.pop("models")):
        if not isinstance(m, dict) or "name" not in m:
            raise InvalidArgumentError(f"models[{i}] needs at least `name:` (and `model:`)")
        m = dict(_fields(ModelSpec, m, f"models[{i}]"))
        m.setdefault("model", m["name"])
        m["memory"] = parse_bytes(m.get("memory"))
        spec = ModelSpec(**m)
        if not isinstance(spec.replicas, int) or spec.replicas < 1:
            raise InvalidArgumentError(f"models[{i}].replicas must be an int >= 1")
        bad = [a for a in map(str, spec.args) if a.split("=")[0] in RESERVED_FLAGS]
        if bad:
            raise InvalidArgumentError(f"models[{i}].args: {', '.join(bad)} is set by the cluster "
                                       "config itself (host, token_file, certfile, ...)")
        models.append(spec)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"model names must be unique, got {names}")
    cfg = ClusterConfig(models=models, **_fields(ClusterConfig, raw, "cluster config"))
    if cfg.backend not in ("ray", "process"):
        raise InvalidArgumentError(f"backend must be 'ray' or 'process', got {cfg.backend!r}")
    from kernel_server.transport.server import is_loopback
    if not is_loopback(cfg.host) and not cfg.token():
        raise InvalidArgumentError(f"refusing host {cfg.host} without a token: any address but "
                                   "loopback needs token_file (or $DJINN_TOKEN)")
    return cfg


def load(path) -> ClusterConfig:
    import yaml
    text = Path(path).expanduser().read_text()
    return from_dict(yaml.safe_load(text))
