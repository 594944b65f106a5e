"""The checkpoints of one server: ids, owners, the host-memory budget, the pinned pool."""
from __future__ import annotations

import logging
import threading
import time
import uuid

import torch

from djinn_protocol.errors import CheckpointError, LimitExceededError
from kernel_server.runtime.generation import GenState
from kernel_server.model.interventions import Interventions
from kernel_server.model.registry import LoadedModel
from kernel_server.checkpoints.snapshot import (Checkpoint, DeviceStaging, PinnedArena,
                                                 copy_interventions, copy_per_device,
                                                 copy_to_host, kv_slices, side_stream,
                                                 tensor_nbytes)

log = logging.getLogger("kernel_server.checkpoints")


def kv_layout(loaded) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of ``loaded``'s KV cache, from its config."""
    cfg = loaded.model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) \
        or loaded.num_layers
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def kv_bytes_per_position(loaded) -> int:
    """Bytes of keys and values one position of context holds in ``loaded``'s cache, from
    its config (every layer: keys + values, key/value heads x head size, the model dtype)."""
    layers, kv_heads, head_dim = kv_layout(loaded)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=loaded.dtype).element_size()


class CheckpointStore:
    """All checkpoints of a server, each owned by one client, within a host-memory budget."""

    def __init__(self, budget_bytes: int, pinned_pool_bytes: int = 0):
        self.budget_bytes = budget_bytes
        self.pinned_pool_bytes = min(pinned_pool_bytes, budget_bytes)
        self.arena: PinnedArena | None = None
        self.staging: DeviceStaging | None = None     # single-device CUDA models (prepare)
        self._items: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()

    def prepare(self, device, context: int | None = None) -> None:
        """Allocate the pinned arena now (CUDA only), so no checkpoint pays for it; one
        side stream per device. ``device``: a device, a list of them (a model over several
        devices), or a ``LoadedModel``: then the arena is sized by ``pool_bytes_for`` to
        hold a checkpoint of the model's whole context (``context`` positions, default the
        model's limit), the device buffer checkpoints are stacked into is allocated with
        the same size (``DeviceStaging``, one device only, when it takes at most a quarter
        of the free device memory), and one dummy checkpoint is dispatched (``warm``): the
        first checkpoint is as quick to dispatch as any other."""
        want = self.pinned_pool_bytes
        loaded = None
        if hasattr(device, "devices"):                     # a LoadedModel
            loaded = device
            want = self.pool_bytes_for(device, context)
            device = device.devices
        for device in (device if isinstance(device, (list, tuple)) else [device]):
            if device.type == "cuda":
                side_stream(device)
                if want > 0 and (self.arena is None
                                 or (self.arena.nbytes < want and self.arena.idle())):
                    self.arena = None                      # the old buffer goes before the new
                    self.arena = PinnedArena(want)
                    self.pinned_pool_bytes = want
        if loaded is not None and loaded.device_map is None and loaded.device.type == "cuda" \
                and self.arena is not None:
            self._prepare_staging(loaded.device, self.arena.nbytes)
        if loaded is not None:
            self.warm(loaded)

    def _prepare_staging(self, device, nbytes: int) -> None:
        with self._lock:
            if self.staging is not None and self.staging.nbytes >= nbytes:
                return
            free, _ = torch.cuda.mem_get_info(device)
            old = self.staging.nbytes if self.staging is not None else 0
            if nbytes - old > free // 4:
                log.info("no checkpoint staging buffer (%d MiB; %d MiB free on %s): the first "
                         "checkpoint of a long context allocates its own", nbytes >> 20,
                         free >> 20, device)
                return
            if self.staging is not None:
                self.staging.wait()
                self.staging = None                        # the old buffer goes before the new
            self.staging = DeviceStaging(nbytes, device)

    def warm(self, loaded) -> None:
        """One dispatch of a checkpoint of the model's shape with one position, for each
        layout a cache can have (a DynamicCache's contiguous layers, a fast-decode slot's
        strided views), waited for and given back: the stacking kernels are loaded here,
        not by the first checkpoint (the profile showed a 46 us lazy load of the kernel
        there). CUDA only; a failure only costs that speed."""
        devices = [loaded.layer_device(i) for i in range(loaded.num_layers)] \
            if loaded.device_map is not None else [loaded.device] * loaded.num_layers
        if not any(d.type == "cuda" for d in devices):
            return
        try:
            _, kv_heads, head_dim = kv_layout(loaded)
            for width in (1, 2):                 # 2: narrowed to 1 position, as a slot's layers
                slices = []
                for d in devices:
                    k, v = (torch.zeros((1, kv_heads, width, head_dim), dtype=loaded.dtype,
                                        device=d) for _ in range(2))
                    slices.append((k.narrow(-2, 0, 1), v.narrow(-2, 0, 1)))
                with self._lock:
                    _, done, release = (copy_per_device(slices, self.arena)
                                        if loaded.device_map is not None else
                                        copy_to_host(slices, loaded.device, self.arena,
                                                     staging=self.staging))
                done.synchronize()
                if release is not None:
                    release()
        except Exception as exc:  # (an exotic config): the first checkpoint is slower, that is all
            log.warning("checkpoint warm-up skipped for %s: %s: %s", loaded.name,
                        type(exc).__name__, exc)

    def pool_bytes_for(self, loaded, context: int | None = None) -> int:
        """Pinned bytes for one checkpoint of ``loaded`` at ``context`` positions (default:
        the model's limit; neither: the configured pool): its keys and values, never less
        than the configured pool, never more than the host-memory budget."""
        limit = loaded.max_positions
        positions = min(p for p in (context, limit) if p) if (context or limit) else 0
        need = kv_bytes_per_position(loaded) * positions
        return min(self.budget_bytes, max(self.pinned_pool_bytes, need))

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
        stamps = [("start", t0)]           # where the dispatch time goes (ck.dispatch_parts)
        slices = kv_slices(cache, state.kv_length)
        # the budget counts what the checkpoint holds: keys/values and any logit rows
        kv_nbytes = sum(tensor_nbytes(k) + tensor_nbytes(v) for k, v in slices)
        nbytes = kv_nbytes + sum(r.nbytes for r in state.logits)
        stamps.append(("slices", time.perf_counter()))
        with self._lock:
            self._reserve(nbytes)
            hosts, done, release = (copy_per_device(slices, self.arena)      # layers over devices
                                    if loaded.device_map is not None else
                                    copy_to_host(slices, loaded.device, self.arena, stamps,
                                                 self.staging))
            ck = Checkpoint(uuid.uuid4().hex[:12], owner, loaded.name, state,
                            copy_interventions(interventions), hosts, nbytes, copy=done,
                            release=release, kv_nbytes=kv_nbytes)
            self._items[ck.id] = ck
        stamps.append(("bookkeeping", time.perf_counter()))
        ck.dispatch_ms = (stamps[-1][1] - t0) * 1e3
        ck.dispatch_parts = {name: (t - prev) * 1e3
                             for (_, prev), (name, t) in zip(stamps, stamps[1:])}
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


