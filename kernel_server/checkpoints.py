"""Checkpoints of generation state: non-blocking device-to-host snapshots of the KV cache
plus everything else a run needs to continue exactly, a store with a host-memory budget,
and the durable file format (safetensors + JSON metadata + a content hash).
"""
from __future__ import annotations

import dataclasses

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
from djinn_nb.errors import CheckpointError, DjinnError, LimitExceededError
from .generation import GenerationConfig, GenState
from .interventions import Breakpoint, Interventions, SteeringRule
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
    copy: object = None  # BackgroundCopy while the copy may run (None: loaded from a file)
    dispatch_ms: float = 0.0
    release: object = None     # gives a pinned-arena block back
    kv_nbytes: int = 0         # of nbytes, the keys and values

    def ready(self) -> bool:
        return self.copy is None or self.copy.query()

    def wait(self) -> None:
        if self.copy is not None:
            self.copy.synchronize()

    def free(self) -> None:
        """Give the host memory back (after the copy finished)."""
        self.wait()
        if self.release is not None:
            self.release()
            self.release = None
        self.kv = []

    def describe(self) -> dict:
        return {"id": self.id, "model": self.model, "step": self.state.step,
                "positions": self.state.kv_length, "tokens": len(self.state.tokens),
                "nbytes": self.nbytes, "kv_nbytes": self.kv_nbytes,
                "ready": self.ready(), "created": self.created,
                "dispatch_ms": self.dispatch_ms}


def copy_interventions(iv: Interventions) -> Interventions:
    # breakpoints and rules are frozen; their vectors are never written in place
    return Interventions(list(iv.breakpoints), list(iv.rules))


def kv_slices(cache, length: int) -> list:
    """(keys, values) of each layer cut to ``length`` positions (views, no copy). Paused
    mid-forward, the layers before the pause already hold this token's entries: cut off."""
    if cache is None or length == 0:
        return []
    from transformers.cache_utils import DynamicLayer, StaticLayer
    out = []
    for layer in cache.layers:
        # StaticLayer: a fast-decode slot (kernel_server/fast_decode.py), max_len positions
        if type(layer) not in (DynamicLayer, StaticLayer):
            raise CheckpointError(
                f"checkpoints support full-attention caches only; this model's cache has "
                f"{type(layer).__name__} layers (sliding-window attention)")
        if layer.is_initialized:
            k, v = layer.keys, layer.values
            if k.shape[-2] != length:
                k, v = k.narrow(-2, 0, length), v.narrow(-2, 0, length)
            if type(layer) is StaticLayer and k.device.type != "cuda":
                # a slot is rewritten in place once its run ends: the background copy
                # off CUDA (no stream ordering) must not read it later
                k, v = k.clone(), v.clone()
            out.append((k, v))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class PinnedArena:
    """Pinned host memory allocated once, handed out in blocks to checkpoints.

    A fresh pinned allocation (cudaHostAlloc) takes 7 ms for 4 MiB and about 50 ms for
    128 MiB, and holds the CUDA driver meanwhile: no way to make ``checkpoint()``
    non-blocking. The arena pays that once, at server start; a checkpoint that does not
    fit falls back to torch's caching pinned allocator."""

    ALIGN = 512

    def __init__(self, nbytes: int, buffer: torch.Tensor | None = None):
        self.buffer = buffer if buffer is not None else torch.empty(nbytes, dtype=torch.uint8,
                                                                     pin_memory=True)
        self._free = [(0, nbytes)]            # (offset, size), sorted by offset
        self._lock = threading.Lock()

    def take(self, nbytes: int):
        """A block of at least ``nbytes``: (uint8 tensor view, release function) or None."""
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        with self._lock:
            for i, (off, free) in enumerate(self._free):
                if free >= size:
                    self._free[i:i + 1] = [(off + size, free - size)] if free > size else []
                    return self.buffer[off:off + nbytes], lambda: self._give_back(off, size)
        return None

    def _give_back(self, off: int, size: int) -> None:
        with self._lock:
            blocks = sorted(self._free + [(off, size)])
            merged = [blocks[0]]
            for o, n in blocks[1:]:
                last_o, last_n = merged[-1]
                if last_o + last_n == o:
                    merged[-1] = (last_o, last_n + n)
                else:
                    merged.append((o, n))
            self._free = merged


class BackgroundCopy:
    """A copy to host memory still in flight: ``query``/``synchronize`` as on a CUDA event.
    On CPU the copy is a plain clone run by one background thread."""
    _pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="djinn-ckpt-copy")

    def __init__(self, event=None, job=None):
        self.event = event
        self._future = self._pool.submit(job) if job is not None else None

    def query(self) -> bool:
        if self._future is not None and not self._future.done():
            return False
        return self.event is None or self.event.query()

    def synchronize(self) -> None:
        if self._future is not None:
            self._future.result()
        if self.event is not None:
            self.event.synchronize()


def copy_to_host(slices: list, device: torch.device, arena: PinnedArena | None = None):
    """Start copying ``slices`` to host memory without waiting for anything. Returns
    (list of (keys, values) host pairs, BackgroundCopy, release function or None).

    CUDA: the keys and values are stacked into one device buffer by one kernel queued on
    the current stream (after the kernels that wrote the cache, before any that free it);
    a side stream copies that into one pinned host buffer (from the arena, else torch's
    caching pinned allocator) while generation goes on. CPU: clones, in a thread."""
    if not slices:
        return [], None, None
    flat = [t for pair in slices for t in pair]
    if device.type != "cuda":
        out: list = []

        def clone():
            with torch.inference_mode():
                hosts = [t.clone() for t in flat]
            out.extend(zip(hosts[0::2], hosts[1::2]))
        return out, BackgroundCopy(job=clone), None
    stream = side_stream(device)
    release = None
    if all(t.shape == flat[0].shape for t in flat):
        staged = torch.stack(flat)                           # [2 * layers, batch, heads, pos, dim]
        nbytes = staged.numel() * staged.element_size()
        block = arena.take(nbytes) if arena is not None else None
        if block is not None:
            raw, release = block
            host = raw.view(staged.dtype).view(staged.shape)
        else:
            host = torch.empty(staged.shape, dtype=staged.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            host.copy_(staged, non_blocking=True)
            staged.record_stream(stream)      # freed by the allocator only after the copy
            event = torch.cuda.Event()
            event.record(stream)
        hosts = list(host.unbind(0))
    else:                                                    # layers of different shapes
        stream.wait_stream(torch.cuda.current_stream(device))
        hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in flat]
        with torch.cuda.stream(stream):
            torch._foreach_copy_(hosts, flat, non_blocking=True)
            for t in flat:
                t.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
    return list(zip(hosts[0::2], hosts[1::2])), BackgroundCopy(event=event), release


def cache_from_host(ck: Checkpoint, loaded: LoadedModel):
    """A fresh DynamicCache on the model's device holding the checkpoint's keys/values
    (non-blocking copies from pinned memory, ordered after the checkpoint's own copy)."""
    from transformers import DynamicCache
    if loaded.device_map is not None:
        return cache_from_host_per_layer(ck, loaded)
    cache = DynamicCache(config=loaded.model.config)
    device = loaded.device
    copy = ck.copy
    if copy is not None and device.type != "cuda":
        copy.synchronize()               # (on CUDA the copy back is ordered after the event)
    if not ck.kv:
        return cache
    flat = [t for pair in ck.kv for t in pair]
    if device.type == "cuda":
        if copy is not None and copy.event is not None:
            torch.cuda.current_stream(device).wait_event(copy.event)
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


# ---- models over several devices (an accelerate device map) ---------------------------------
class MultiCopy:
    """Copies to host memory in flight on several devices (one BackgroundCopy each)."""
    event = None

    def __init__(self, parts: list):
        self.parts = parts
        self.events = [p.event for p in parts if p.event is not None]

    def query(self) -> bool:
        return all(p.query() for p in self.parts)

    def synchronize(self) -> None:
        for p in self.parts:
            p.synchronize()


def copy_per_device(slices: list, arena: PinnedArena | None = None):
    """``copy_to_host`` for a KV cache whose layers live on several devices: each CUDA
    device's layers go through ``copy_to_host`` on that device's side stream (stacked into
    one block of the pinned arena, one event per device), so the devices copy at once; CPU
    layers are cloned by the background thread. Same return value as ``copy_to_host``; the
    host pairs keep the layer order."""
    from .sharding import group_by_device
    if not slices:
        return [], None, None
    hosts: list = [None] * len(slices)
    parts, releases = [], []
    for device, index in group_by_device([k.device for k, _ in slices]).items():
        group = [slices[i] for i in index]
        if device.type == "cuda":
            pairs, done, release = copy_to_host(group, device, arena)
            for i, pair in zip(index, pairs):
                hosts[i] = pair
            parts.append(done)
            if release is not None:
                releases.append(release)
        else:
            def clone(group=group, index=index):
                with torch.inference_mode():
                    for i, (k, v) in zip(index, group):
                        hosts[i] = (k.clone(), v.clone())
            parts.append(BackgroundCopy(job=clone))
    release = (lambda: [r() for r in releases]) if releases else None
    return hosts, MultiCopy(parts), release


def cache_from_host_per_layer(ck: Checkpoint, loaded: LoadedModel):
    """``cache_from_host`` for a model over several devices: layer i's keys/values go to
    the device where decoder layer i computes now (the model's current device map, which
    may differ from the one the checkpoint was taken under); each device's copies are
    ordered after the checkpoint's copy events, with no host wait unless a CPU is involved."""
    from transformers import DynamicCache
    cache = DynamicCache(config=loaded.model.config)
    targets = [loaded.layer_device(i) for i in range(len(ck.kv))]
    copy = ck.copy
    if copy is not None:
        parts = getattr(copy, "parts", [copy])
        if any(p._future is not None for p in parts) or any(d.type != "cuda" for d in targets):
            copy.synchronize()
        else:
            events = getattr(copy, "events", None) or [copy.event]
            for device in dict.fromkeys(targets):
                for event in events:
                    torch.cuda.current_stream(device).wait_event(event)
    for i, (k, v) in enumerate(ck.kv):
        device = targets[i]
        if device.type == "cuda":
            k, v = k.to(device, non_blocking=True), v.to(device, non_blocking=True)
        else:
            k, v = k.to(device, copy=True), v.to(device, copy=True)   # never alias the host copy
        _fill_layer(cache, i, k, v)
    return cache


class CheckpointStore:
    """All checkpoints of a server, each owned by one client, within a host-memory budget."""

    def __init__(self, budget_bytes: int, pinned_pool_bytes: int = 0):
        self.budget_bytes = budget_bytes
        self.pinned_pool_bytes = min(pinned_pool_bytes, budget_bytes)
        self.arena: PinnedArena | None = None
        self._items: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()

    def prepare(self, device) -> None:
        """Allocate the pinned arena now (CUDA only), so no checkpoint pays for it; one
        side stream per device (``device`` may be a list: a model over several devices)."""
        for device in (device if isinstance(device, (list, tuple)) else [device]):
            if device.type == "cuda":
                side_stream(device)
                if self.arena is None and self.pinned_pool_bytes > 0:
                    self.arena = PinnedArena(self.pinned_pool_bytes)

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
        # the budget counts what the checkpoint holds: keys/values and any logit rows
        kv_nbytes = sum(_nbytes(k) + _nbytes(v) for k, v in slices)
        nbytes = kv_nbytes + sum(r.nbytes for r in state.logits)
        with self._lock:
            self._reserve(nbytes)
            hosts, done, release = (copy_per_device(slices, self.arena)      # layers over devices
                                    if loaded.device_map is not None else
                                    copy_to_host(slices, loaded.device, self.arena))
            ck = Checkpoint(uuid.uuid4().hex[:12], owner, loaded.name, state,
                            copy_interventions(interventions), hosts, nbytes, copy=done,
                            release=release, kv_nbytes=kv_nbytes)
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
        with self._lock:
            self._items.pop(ck.id, None)
        ck.free()

    def list(self, owner: str) -> list[dict]:
        return [c.describe() for c in self._items.values() if c.owner == owner]

    def drop_owner(self, owner: str) -> None:
        with self._lock:
            mine = [self._items.pop(i) for i, c in list(self._items.items()) if c.owner == owner]
        for ck in mine:
            ck.free()


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
    for index, r in enumerate(ck.interventions.rules):
        if r.op.vector is not None:
            tensors[f"rule.{index}.vector"] = r.op.vector.detach().to("cpu").contiguous()
        rules.append({"id": r.id, "layer": r.layer, "phase": r.phase, "site": r.site,
                      "head": r.op.head, "rows": None if r.rows is None else list(r.rows),
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


def from_bytes(data, loaded: LoadedModel, owner: str, limits=None) -> Checkpoint:
    """Parse and verify a checkpoint file; refuses another model or any damage, whole.

    The hash catches damage, not a forger (it has no key): every field is also checked
    as if it came through the API, against this model and this server's limits."""
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format {meta.get('format')!r}")
    want, have = meta.get("identity"), _model_identity(loaded)
    if want != have:
        diff = {k: ((want or {}).get(k), have[k]) for k in have if (want or {}).get(k) != have[k]}
        raise CheckpointError(f"checkpoint is from another model or setup: (file, this session) "
                              f"differ in {diff}")
    try:
        return _checked_checkpoint(meta, tensors, loaded, owner, limits)
    except CheckpointError:
        raise
    except (DjinnError, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"invalid checkpoint contents: {type(exc).__name__}: {exc}") from None


def _checked_checkpoint(meta: dict, tensors: dict, loaded: LoadedModel, owner: str, limits):
    from . import validation as V
    limits = limits or V.Limits()
    n_layers, vocab = loaded.num_layers, loaded.vocab_size
    dtype = loaded.dtype
    config_fields = set(GenerationConfig.__dataclass_fields__)
    if not isinstance(meta["config"], dict) or set(meta["config"]) - config_fields:
        raise CheckpointError("invalid checkpoint contents: unknown generation settings")
    config = GenerationConfig(**meta["config"])
    V.integer(config.max_new_tokens, "max_new_tokens", 1, limits.max_new_tokens)
    V.number(config.temperature, "temperature", 0.0, 100.0)
    V.integer(config.record_top_k, "record_top_k", 1, 100)
    prompt, tokens, step = meta["prompt_ids"], meta["tokens"], V.integer(meta["step"], "step", 0)
    for name, ids in (("prompt", prompt), ("tokens", tokens)):
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
            raise CheckpointError(f"invalid checkpoint contents: {name} are not token ids of this model")
    if (not prompt or len(prompt) > limits.max_prompt_tokens or tokens[:len(prompt)] != prompt
            or len(tokens) != len(prompt) + step or step > config.max_new_tokens):
        raise CheckpointError("invalid checkpoint contents: prompt, tokens and step disagree")
    records = meta["records"]
    if not isinstance(records, list) or len(records) != step or not all(
            isinstance(r, dict) and set(r) == _RECORD_KEYS for r in records):
        raise CheckpointError("invalid checkpoint contents: step records")
    bps = []
    for b in meta["breakpoints"]:
        site, _, _ = V.site(loaded, b["layer"], b.get("site", "resid"))   # files before sites: resid
        bps.append(Breakpoint(site.layer, V.choice(b["phase"], "phase", V.PHASES),
                              V.steps(b["steps"], limits), site=site.name))
    rules = []
    for index, r in enumerate(meta["rules"]):
        site, head, width = V.site(loaded, r["layer"], r.get("site", "resid"), r.get("head"))
        args = {"positions": r["positions"]}
        if r["kind"] == "scale":
            args["scale"] = r["scale"]
        else:
            vec = tensors.get(f"rule.{index}.vector")
            if vec is None:
                raise CheckpointError(f"invalid checkpoint contents: rule {index} has no vector")
            args[V.choice(r["kind"], "kind", ("add", "set"))] = vec.float().numpy()
            args["alpha"] = r["alpha"]
        op = V.edit_op(args, width, loaded.layer_device(site.layer) if site.layer >= 0 else loaded.device,
                       dtype, standing=True)      # the vector lives where its layer computes
        if head is not None:
            op = dataclasses.replace(op, head=head, head_dim=site.head_dim)
        rules.append(SteeringRule(site.layer, op,
                                  V.choice(r["phase"], "phase", V.PHASES), V.steps(r["steps"], limits),
                                  V.integer(r["id"], "rule id", 0), site=site.name,
                                  rows=V.rows(r.get("rows"), limits)))
    kv_len = len(tokens) - 1 if step > 0 else 0
    n_kv = V.integer(meta["kv_layers"], "kv_layers", 0, n_layers)
    if n_kv != (n_layers if kv_len else 0):
        raise CheckpointError("invalid checkpoint contents: KV cache layer count")
    kv = [(tensors[f"kv.{i}.keys"], tensors[f"kv.{i}.values"]) for i in range(n_kv)]
    for k, v in kv:
        if (k.dtype != dtype or v.dtype != dtype or k.dim() != 4 or k.shape[0] != 1
                or k.shape[2] != kv_len or v.shape[:3] != k.shape[:3]):
            raise CheckpointError("invalid checkpoint contents: KV cache shapes or dtype")
    logits = list(tensors["logits"].numpy()) if "logits" in tensors else []
    if logits and (len(logits) != step or logits[0].shape != (vocab,)):
        raise CheckpointError("invalid checkpoint contents: logit rows")
    rng = tensors.get("rng_state")
    if rng is not None and rng.dtype != torch.uint8:
        raise CheckpointError("invalid checkpoint contents: RNG state")
    state = GenState(prompt, tokens, step, records, logits, config,
                     V.integer(meta["seed"], "seed", 0, 2**63 - 1), rng)
    kv_nbytes = sum(_nbytes(k) + _nbytes(v) for k, v in kv)
    return Checkpoint(uuid.uuid4().hex[:12], owner, loaded.name, state, Interventions(bps, rules),
                      kv, kv_nbytes + sum(r.nbytes for r in logits),
                      created=float(meta.get("created", 0.0)), kv_nbytes=kv_nbytes)


_RECORD_KEYS = {"step", "token_id", "text", "top_ids", "top_probs", "forward_ms", "paused_ms",
                "breakpoints", "rules"}
