"""A checkpoint: the generation state at a token boundary, and its device-to-host copy
(pinned buffers, a side CUDA stream, an event; per device for a model over several)."""
from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from djinn_protocol.errors import CheckpointError
from kernel_server.runtime.generation import GenState
from kernel_server.model.interventions import Interventions
from kernel_server.model.registry import LoadedModel


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
    dispatch_parts: dict = field(default_factory=dict)   # ms per part of the dispatch (profiling)
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
    mid-forward, the layers before the pause already hold this token's entries: cut off.

    Sliding-window layers (Mistral, Gemma 2/3, GPT-OSS, ...: transformers'
    ``DynamicSlidingWindowLayer``) are taken while they still hold every position, i.e. the
    context has not yet passed the window (a layer keeps its last ``sliding_window - 1``
    positions); that is a plain cache, and restoring it through ``update()`` rebuilds the same
    layer. Once a layer has dropped a position the checkpoint is a ``CheckpointError``."""
    if cache is None or length == 0:
        return []
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer
    out = []
    for i, layer in enumerate(cache.layers):
        # StaticLayer: a fast-decode slot (kernel_server/runtime/fast_decode.py), max_len positions
        if type(layer) not in (DynamicLayer, StaticLayer, DynamicSlidingWindowLayer):
            raise CheckpointError(
                f"checkpoints support full-attention and not-yet-wrapped sliding-window KV caches "
                f"only; this model's cache has {type(layer).__name__} layers")
        if type(layer) is DynamicSlidingWindowLayer and layer.is_initialized \
                and layer.keys.shape[-2] < max(layer.cumulative_length, length):
            raise CheckpointError(
                f"layer {i} is a sliding-window layer (window {layer.sliding_window}) that has "
                f"already dropped its oldest positions ({layer.cumulative_length} positions seen, "
                f"{layer.keys.shape[-2]} kept); checkpoints of sliding-window caches work while "
                f"the context is at most {layer.sliding_window - 1} positions")
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


def tensor_nbytes(t: torch.Tensor) -> int:
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
        self.nbytes = nbytes
        self._free = [(0, nbytes)]            # (offset, size), sorted by offset
        self._lock = threading.Lock()

    def idle(self) -> bool:
        """No block is handed out (the arena can be replaced)."""
        with self._lock:
            return self._free == [(0, self.nbytes)]

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


def _no_stamp(_) -> None:
    pass


def copy_to_host(slices: list, device: torch.device, arena: PinnedArena | None = None,
                 stamps: list | None = None, staging: "DeviceStaging | None" = None):
    """Start copying ``slices`` to host memory without waiting for anything. Returns
    (list of (keys, values) host pairs, BackgroundCopy, release function or None).

    CUDA: the keys and values are stacked into one device buffer by one kernel queued on
    the current stream (after the kernels that wrote the cache, before any that free it);
    a side stream copies that into one pinned host buffer (from the arena, else torch's
    caching pinned allocator) while generation goes on; the device buffer is ``staging``
    when it is free, else one from torch's allocator. CPU: clones, in a thread.
    ``stamps``: a list that gets ``(part, perf_counter())`` after each part (profiling)."""
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
    stamp = stamps.append if stamps is not None else _no_stamp
    shape = flat[0].shape
    if all(t.shape == shape for t in flat):
        staged = staging.take((len(flat), *shape), flat[0].dtype) \
            if staging is not None and staging.device == flat[0].device else None
        if staged is not None:
            torch.stack(flat, out=staged)                # [2 * layers, batch, heads, pos, dim]
        else:
            staged = torch.stack(flat)     # (a cudaMalloc when torch's allocator has no block)
        stamp(("stage", time.perf_counter()))
        return _staged_to_host(staged, device, arena, stamp, staging)
    # layers of different shapes
    stream = side_stream(device)
    _order_after_current(stream, device)
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in flat]
    with torch.cuda.stream(stream):
        torch._foreach_copy_(hosts, flat, non_blocking=True)
        for t in flat:
            t.record_stream(stream)
        event = torch.cuda.Event()
        event.record(stream)
    return list(zip(hosts[0::2], hosts[1::2])), BackgroundCopy(event=event), None


def _staged_to_host(staged: torch.Tensor, device, arena, stamp, staging):
    """Copy the contiguous ``staged`` (queued on the current stream) into pinned host memory
    on the side stream; the arena's block when it fits. Returns copy_to_host's triple."""
    stream = side_stream(device)
    release = None
    nbytes = staged.numel() * staged.element_size()
    block = arena.take(nbytes) if arena is not None else None
    if block is not None:
        raw, release = block
        host = raw.view(staged.dtype).view(staged.shape)
    else:
        host = torch.empty(staged.shape, dtype=staged.dtype, pin_memory=True)
    stamp(("host_block", time.perf_counter()))
    _order_after_current(stream, device)
    stamp(("order", time.perf_counter()))
    mine = staging is not None and staging.holds(staged)
    with torch.cuda.stream(stream):
        host.copy_(staged, non_blocking=True)
        if not mine:
            staged.record_stream(stream)      # freed by the allocator only after the copy
        stamp(("copy_launch", time.perf_counter()))
        event = torch.cuda.Event()
        event.record(stream)
    if mine:
        staging.in_use_until(event)
    stamp(("event", time.perf_counter()))
    return StackedKV(host), BackgroundCopy(event=event), release   # views made when read


_order_events: dict = {}


def _order_after_current(stream, device) -> None:
    """``stream`` waits (on the GPU) for what the current stream has queued so far: the
    kernels that wrote the cache, and the stacking one. ``Stream.wait_stream`` does the same
    with a new event each time; one event per device, recorded and waited on under the lock
    (a later record does not move a wait already queued), is cheaper."""
    current = torch.cuda.current_stream(device)
    with _side_lock:
        event = _order_events.get(device)
        if event is None:
            event = _order_events[device] = torch.cuda.Event()
        event.record(current)
        stream.wait_event(event)


class StackedKV(Sequence):
    """The host keys and values of a checkpoint held as one stacked tensor
    ``[2 * layers, batch, heads, positions, head_dim]``; reads as a list of per-layer
    ``(keys, values)`` views (made on access: a dispatch does not pay for 2 x layers tensor
    objects it may never need)."""

    def __init__(self, host: torch.Tensor):
        self.host = host

    def __len__(self) -> int:
        return self.host.shape[0] // 2

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.host[2 * index], self.host[2 * index + 1]


class DeviceStaging:
    """A device buffer that a checkpoint's keys and values are stacked into before their
    copy to the host, allocated once (``CheckpointStore.prepare``, sized as the pinned
    pool): without it the stacked copy of a 2 GiB cache is a fresh 2 GiB block from torch's
    caching allocator, whose cudaMalloc made the first checkpoint 0.3-0.5 ms slower than
    the next ones (bench/results/checkpoint_cuda_llama-7b.json, ``dispatch``), and a later
    one too whenever the block had gone to other tensors (a fast-decode slot, say). While
    the copy of one checkpoint still reads it, the next stacks through the allocator."""

    def __init__(self, nbytes: int, device: torch.device):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.device = self.buffer.device          # (with its index: compared with the cache's)
        self.nbytes = nbytes
        self._reader = None           # the event of the copy that last read the buffer

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
        """A view of ``shape`` at the start of the buffer, or None (too small, or in use)."""
        need = math.prod(shape) * dtype.itemsize
        if need > self.nbytes or (self._reader is not None and not self._reader.query()):
            return None
        return self.buffer[:need].view(dtype).view(shape)

    def holds(self, t: torch.Tensor) -> bool:
        return t.data_ptr() == self.buffer.data_ptr()

    def in_use_until(self, event) -> None:
        self._reader = event

    def wait(self) -> None:
        if self._reader is not None:
            self._reader.synchronize()


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
    # one device tensor per layer (one copy of a whole stack would keep it alive until every
    # layer has moved on: twice the cache at the first eager step after the restore)
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
    from kernel_server.model.sharding import group_by_device
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


