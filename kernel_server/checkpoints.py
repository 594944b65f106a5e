"""Checkpoints of generation state: non-blocking device-to-host snapshots of the KV cache
plus everything else a run needs to continue exactly, a store with a host-memory budget,
and the durable file format (safetensors + JSON metadata + a content hash).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from djinn_nb import __version__
from djinn_nb.errors import CheckpointError, LimitExceededError
from .generation import GenerationConfig, GenState
from .interventions import Breakpoint, EditOp, Interventions, SteeringRule
from .models import LoadedModel

FORMAT = "djinn-checkpoint/1"
_side_streams: dict = {}
_side_lock = threading.Lock()


def side_stream(device: torch.device):
    """One copy stream per CUDA device, shared by all checkpoints on it."""
    with _side_lock:
        if device not in _side_streams:
            _side_streams[device] = torch.cuda.Stream(device=device)
        return _side_streams[device]


@dataclass
class Checkpoint:
    id: str
    owner: str
    model: str
    state: GenState
    interventions: Interventions
    kv: list                   # [(keys, values)] on the host, [batch, heads, positions, head_dim]
    nbytes: int
    created: float = field(default_factory=time.time)
    done_event: object = None  # torch.cuda.Event (or _HostCopy on CPU) while the copy may run
    dispatch_ms: float = 0.0

    def ready(self) -> bool:
        return self.done_event is None or self.done_event.query()

    def wait(self) -> None:
        if self.done_event is not None:
            self.done_event.synchronize()

    def describe(self) -> dict:
        return {"id": self.id, "model": self.model, "step": self.state.step,
                "positions": self.state.kv_length, "tokens": len(self.state.tokens),
                "nbytes": self.nbytes, "ready": self.ready(), "created": self.created,
                "dispatch_ms": self.dispatch_ms}


def copy_interventions(iv: Interventions) -> Interventions:
    # breakpoints and rules are frozen; their vectors are never written in place
    return Interventions(list(iv.breakpoints), list(iv.rules))


def kv_slices(cache, length: int) -> list:
    """(keys, values) of each layer cut to ``length`` positions (views, no copy). Paused
    mid-forward, the layers before the pause already hold this token's entries: cut off."""
    if cache is None or length == 0:
        return []
    out = []
    for layer in cache.layers:
        if layer.is_initialized:
            k, v = layer.keys, layer.values
            if k.shape[-2] != length:
                k, v = k.narrow(-2, 0, length), v.narrow(-2, 0, length)
            out.append((k, v))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _HostCopy:
    """On CPU the copy is a plain clone, run by one background thread so that
    ``checkpoint()`` returns at once; ``query``/``synchronize`` as a CUDA event has."""
    _pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="djinn-ckpt-copy")

    def __init__(self, slices: list, out: list):
        def copy():
            with torch.inference_mode():
                out.extend((k.clone(), v.clone()) for k, v in slices)
        self._future = self._pool.submit(copy)

    def query(self) -> bool:
        return self._future.done()

    def synchronize(self) -> None:
        self._future.result()


def copy_to_host(slices: list, device: torch.device):
    """Host copies of ``slices``, without waiting for anything on CUDA: the keys and
    values are stacked into one device buffer by one kernel queued on the current
    stream (so after the kernels that wrote the cache, and before any that free it), and
    a side stream copies that buffer into one pinned host buffer (from torch's caching
    pinned-memory pool) while generation goes on. Returns (host tensor pairs, done event)."""
    if not slices:
        return [], None
    if device.type != "cuda":
        hosts: list = []        # filled by the copy thread: read only after wait()
        return hosts, _HostCopy(slices, hosts)
    flat = [t for pair in slices for t in pair]
    stream = side_stream(device)
    if all(t.shape == flat[0].shape for t in flat):
        staged = torch.stack(flat)                           # [2 * layers, batch, heads, pos, dim]
        stream.wait_stream(torch.cuda.current_stream(device))
        host = torch.empty(staged.shape, dtype=staged.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(staged, non_blocking=True)
            staged.record_stream(stream)      # freed by the allocator only after the copy
            done = torch.cuda.Event()
            done.record(stream)
        hosts = list(host.unbind(0))
    else:                                                    # layers of different shapes
        stream.wait_stream(torch.cuda.current_stream(device))
        hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in flat]
        with torch.cuda.stream(stream):
            torch._foreach_copy_(hosts, flat, non_blocking=True)
            for t in flat:
                t.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
    return list(zip(hosts[0::2], hosts[1::2])), done


def cache_from_host(ck: Checkpoint, loaded: LoadedModel):
    """A fresh DynamicCache on the model's device holding the checkpoint's keys/values
    (one host-to-device copy when the host tensors share one buffer)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=loaded.model.config)
    device = loaded.device
    if device.type != "cuda":
        ck.wait()                # (on CUDA the copy back is ordered after the event instead)
    if not ck.kv:
        return cache
    flat = [t for pair in ck.kv for t in pair]
    if device.type == "cuda":
        if isinstance(ck.done_event, torch.cuda.Event):
            torch.cuda.current_stream(device).wait_event(ck.done_event)
        base = flat[0]._base
        if base is not None and all(t._base is base for t in flat) and base.shape[0] == len(flat):
            flat = list(base.to(device, non_blocking=True).unbind(0))
        else:
            flat = [t.to(device, non_blocking=True) for t in flat]
    else:
        flat = [t.to(device, copy=True) for t in flat]   # never alias the checkpoint's tensors
    for i in range(len(ck.kv)):
        _fill_layer(cache, i, flat[2 * i], flat[2 * i + 1])
    return cache


def _fill_layer(cache, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put restored keys/values into an empty cache layer. ``update()`` would copy them
    once more on the device (a cat onto an empty tensor); a DynamicLayer takes them as
    they are. Other layer types go through ``update()``."""
    from transformers.cache_utils import DynamicLayer
    layer = cache.layers[index] if index < len(cache.layers) else None
    if type(layer) is DynamicLayer and not layer.is_initialized:
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    else:
        cache.update(keys, values, index)


class CheckpointStore:
    """All checkpoints of a server, each owned by one client, within a host-memory budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._items: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return sum(c.nbytes for c in self._items.values())

    def _reserve(self, nbytes: int) -> None:
        if self.used_bytes + nbytes > self.budget_bytes:
            raise LimitExceededError(
                f"checkpoint of {nbytes / 2**20:.1f} MiB would exceed the host-memory budget "
                f"({self.used_bytes / 2**20:.1f} of {self.budget_bytes / 2**20:.1f} MiB used; "
                "server option --checkpoint-budget-mb). Delete checkpoints with ck.delete().")

    def take(self, owner: str, loaded: LoadedModel, state: GenState, cache,
             interventions: Interventions) -> Checkpoint:
        t0 = time.perf_counter()
        slices = kv_slices(cache, state.kv_length)
        nbytes = sum(_nbytes(k) + _nbytes(v) for k, v in slices)
        with self._lock:
            self._reserve(nbytes)
            hosts, done = copy_to_host(slices, loaded.device)
            ck = Checkpoint(uuid.uuid4().hex[:12], owner, loaded.name, state,
                            copy_interventions(interventions), hosts, nbytes, done_event=done)
            self._items[ck.id] = ck
        ck.dispatch_ms = (time.perf_counter() - t0) * 1e3
        return ck

    def add(self, ck: Checkpoint) -> Checkpoint:
        with self._lock:
            self._reserve(ck.nbytes)
            self._items[ck.id] = ck
        return ck

    def get(self, ck_id, owner: str) -> Checkpoint:
        ck = self._items.get(ck_id) if isinstance(ck_id, str) else None
        if ck is None or ck.owner != owner:
            raise CheckpointError(f"no checkpoint {ck_id!r} on this server for this client")
        return ck

    def delete(self, ck_id, owner: str) -> None:
        ck = self.get(ck_id, owner)
        ck.wait()
        with self._lock:
            self._items.pop(ck.id, None)

    def list(self, owner: str) -> list[dict]:
        return [c.describe() for c in self._items.values() if c.owner == owner]

    def drop_owner(self, owner: str) -> None:
        with self._lock:
            for ck_id in [i for i, c in self._items.items() if c.owner == owner]:
                self._items.pop(ck_id).wait()


# ---- the file format ---------------------------------------------------------------------
def _model_identity(loaded: LoadedModel) -> dict:
    return {"model": loaded.name, "architecture": type(loaded.model).__name__,
            "layers": loaded.num_layers, "hidden_size": loaded.hidden_size,
            "vocab_size": loaded.vocab_size, "dtype": str(loaded.dtype).removeprefix("torch.")}


def _digest(meta_json: str, tensors: dict) -> str:
    h = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes()
                 if tensors[key].numel() else b"")
    return h.hexdigest()


def to_bytes(ck: Checkpoint, loaded: LoadedModel) -> bytes:
    """The checkpoint as a safetensors file whose metadata holds the rest, plus a hash."""
    import safetensors.torch
    import transformers
    ck.wait()
    s = ck.state
    tensors = {}
    for i, (k, v) in enumerate(ck.kv):
        tensors[f"kv.{i}.keys"], tensors[f"kv.{i}.values"] = k.contiguous(), v.contiguous()
    if s.rng_state is not None:
        tensors["rng_state"] = s.rng_state.contiguous()
    if s.logits:
        tensors["logits"] = torch.from_numpy(np.stack(s.logits))
    rules = []
    for r in ck.interventions.rules:
        if r.op.vector is not None:
            tensors[f"rule.{r.id}.vector"] = r.op.vector.detach().to("cpu").contiguous()
        rules.append({"id": r.id, "layer": r.layer, "phase": r.phase,
                      "steps": None if r.steps is None else sorted(r.steps), "kind": r.op.kind,
                      "scale": r.op.scale, "alpha": r.op.alpha,
                      "positions": list(r.op.positions) if isinstance(r.op.positions, tuple)
                      else r.op.positions})
    meta = {
        "format": FORMAT, "identity": _model_identity(loaded), "kv_layers": len(ck.kv),
        "versions": {"djinn_nb": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "created": ck.created, "step": s.step, "prompt_ids": s.prompt_ids, "tokens": s.tokens,
        "records": s.records, "config": vars(s.config), "seed": s.seed,
        "breakpoints": [b.describe() for b in ck.interventions.breakpoints], "rules": rules,
    }
    meta_json = json.dumps(meta, sort_keys=True)
    return safetensors.torch.save(tensors, metadata={"djinn": meta_json,
                                                     "sha256": _digest(meta_json, tensors)})


def _header(data) -> dict:
    if len(data) < 8:
        raise CheckpointError("not a djinn checkpoint: the file is too short")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > min(len(data) - 8, 100 << 20):
        raise CheckpointError("not a djinn checkpoint, or a truncated one: bad header length")
    try:
        return json.loads(bytes(data[8:8 + n]))
    except ValueError:
        raise CheckpointError("not a djinn checkpoint: unreadable header") from None


def read_metadata(data) -> dict:
    """The djinn metadata of a checkpoint file (not yet verified: from_bytes does that)."""
    meta = (_header(data).get("__metadata__") or {}).get("djinn")
    if not meta:
        raise CheckpointError("not a djinn checkpoint: no djinn metadata in the file")
    try:
        out = json.loads(meta)
        out["identity"]["model"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError("not a djinn checkpoint: unreadable metadata") from None
    return out


def from_bytes(data, loaded: LoadedModel, owner: str) -> Checkpoint:
    """Parse and verify a checkpoint file; refuses another model or any damage, whole."""
    import safetensors.torch
    meta_raw = _header(data).get("__metadata__") or {}
    if "djinn" not in meta_raw or "sha256" not in meta_raw:
        raise CheckpointError("not a djinn checkpoint: no djinn metadata in the file")
    try:
        tensors = safetensors.torch.load(bytes(data))
    except Exception as exc:
        raise CheckpointError(f"damaged checkpoint file (truncated?): {exc}") from None
    if _digest(meta_raw["djinn"], tensors) != meta_raw["sha256"]:
        raise CheckpointError("damaged or tampered checkpoint: its content hash does not match")
    meta = json.loads(meta_raw["djinn"])
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format {meta.get('format')!r}")
    want, have = meta["identity"], _model_identity(loaded)
    if want != have:
        diff = {k: (want.get(k), have[k]) for k in have if want.get(k) != have[k]}
        raise CheckpointError(f"checkpoint is from another model or setup: (file, this session) "
                              f"differ in {diff}")
    dev, dtype = loaded.device, loaded.dtype
    rules = []
    for r in meta["rules"]:
        vec = tensors.get(f"rule.{r['id']}.vector")
        pos = tuple(r["positions"]) if isinstance(r["positions"], list) else r["positions"]
        op = EditOp(r["kind"], scale=r["scale"], alpha=r["alpha"],
                    vector=None if vec is None else vec.to(dev, dtype), positions=pos)
        rules.append(SteeringRule(r["layer"], op, r["phase"],
                                  None if r["steps"] is None else frozenset(r["steps"]), r["id"]))
    bps = [Breakpoint(b["layer"], b["phase"], None if b["steps"] is None else frozenset(b["steps"]))
           for b in meta["breakpoints"]]
    kv = [(tensors[f"kv.{i}.keys"], tensors[f"kv.{i}.values"]) for i in range(meta["kv_layers"])]
    logits = list(tensors["logits"].numpy()) if "logits" in tensors else []
    state = GenState(meta["prompt_ids"], meta["tokens"], meta["step"], meta["records"], logits,
                     GenerationConfig(**meta["config"]), meta["seed"], tensors.get("rng_state"))
    nbytes = sum(_nbytes(k) + _nbytes(v) for k, v in kv)
    return Checkpoint(uuid.uuid4().hex[:12], owner, loaded.name, state, Interventions(bps, rules),
                      kv, nbytes, created=meta["created"])
