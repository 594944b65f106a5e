"""The pinned pool of the checkpoint store is sized from the model at load
(kernel_server/checkpoints/store.py): a checkpoint of the model's whole context fits, so
the first checkpoint is dispatched as quickly as any later one; within the budget."""
from __future__ import annotations

import pytest
import torch

from kernel_server.checkpoints.store import CheckpointStore, kv_bytes_per_position
from kernel_server.model.registry import LoadedModel, find_layers


def _llama(dtype=torch.float32, layers=3, heads=4, kv_heads=2, hidden=64, positions=512):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, num_hidden_layers=layers, hidden_size=hidden,
                                         intermediate_size=96, num_attention_heads=heads,
                                         num_key_value_heads=kv_heads,
                                         max_position_embeddings=positions)).to(dtype).eval()
    return LoadedModel(name="tiny", model=model, tokenizer=None, layers=find_layers(model),
                       device=torch.device("cpu"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_position_is_what_the_cache_holds(dtype):
    loaded = _llama(dtype)
    with torch.no_grad():
        out = loaded.model(input_ids=torch.arange(10).view(1, 10), use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_bytes_per_position(loaded) * 10 == held
    # Llama-7B's shape in bfloat16: 32 layers x 2 x 32 heads x 128 = 512 KiB a position
    big = type("Cfg", (), {"num_hidden_layers": 32, "num_attention_heads": 32,
                           "num_key_value_heads": 32, "hidden_size": 4096})()
    fake = type("Loaded", (), {"model": type("M", (), {"config": big})(), "dtype": torch.bfloat16,
                               "num_layers": 32})()
    assert kv_bytes_per_position(fake) == 512 << 10


def test_pool_holds_the_whole_context_within_the_budget():
    loaded = _llama(torch.float32, positions=512)
    per_pos = kv_bytes_per_position(loaded)               # 3 x 2 x 2 x 16 x 4 = 768
    store = CheckpointStore(budget_bytes=1 << 30, pinned_pool_bytes=1024)
    assert store.pool_bytes_for(loaded) == per_pos * 512            # the model's limit
    assert store.pool_bytes_for(loaded, context=100) == per_pos * 100  # a shorter server limit
    assert store.pool_bytes_for(loaded, context=10_000) == per_pos * 512
    assert CheckpointStore(1 << 30, 1 << 20).pool_bytes_for(loaded) == 1 << 20   # never below the option
    assert CheckpointStore(50_000, 1024).pool_bytes_for(loaded) == 50_000         # never over the budget


def test_prepare_on_cpu_allocates_no_pinned_memory():
    store = CheckpointStore(budget_bytes=1 << 30, pinned_pool_bytes=1024)
    store.prepare(_llama())
    assert store.arena is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory)")
def test_prepare_sizes_the_arena_and_the_first_checkpoint_takes_it():
    from kernel_server.checkpoints.snapshot import copy_to_host
    loaded = _llama(torch.bfloat16, positions=2048)
    loaded.device = torch.device("cuda")
    loaded.model.to("cuda")
    store = CheckpointStore(budget_bytes=1 << 30, pinned_pool_bytes=1024)
    store.prepare(loaded)
    assert store.arena is not None and store.arena.nbytes == kv_bytes_per_position(loaded) * 2048
    kv = [(torch.zeros(1, 2, 2048, 16, dtype=torch.bfloat16, device="cuda"),) * 2 for _ in range(3)]
    hosts, done, release = copy_to_host(kv, loaded.device, store.arena)
    done.synchronize()
    assert release is not None                   # the whole context came from the arena
    release()
    assert store.arena.idle()


def test_dispatch_parts_add_up_to_the_dispatch_time():
    """Every checkpoint says where its dispatch time went (profiling evidence for #16):
    consecutive parts of one clock, so they add up to ``dispatch_ms``."""
    from kernel_server.model.interventions import Interventions
    from kernel_server.runtime.generation import GenerationConfig, GenState
    loaded = _llama()
    with torch.no_grad():
        out = loaded.model(input_ids=torch.arange(10).view(1, 10), use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    state = GenState(list(range(11)), list(range(11)), 1, [], [], GenerationConfig(), 0)
    store = CheckpointStore(budget_bytes=1 << 30)
    ck = store.take("me", loaded, state, cache, Interventions())
    ck.wait()
    assert set(ck.dispatch_parts) == {"slices", "bookkeeping"}        # CPU: a clone in a thread
    assert sum(ck.dispatch_parts.values()) == pytest.approx(ck.dispatch_ms, rel=1e-6, abs=1e-9)
    assert all(v >= 0 for v in ck.dispatch_parts.values())
    assert torch.equal(ck.kv[0][0], cache.layers[0].keys[:, :, :10])


def test_warm_up_never_fails_the_load(caplog, monkeypatch):
    """A model the warm-up cannot read costs only the warm-up (a warning), not the server."""
    from kernel_server.checkpoints import store as store_module

    def unreadable(loaded):
        raise AttributeError("no num_attention_heads")
    monkeypatch.setattr(store_module, "kv_layout", unreadable)
    loaded = _llama()
    loaded.device = torch.device("cuda")           # pretend: warm() then tries to run
    CheckpointStore(budget_bytes=1 << 30).warm(loaded)
    assert "checkpoint warm-up skipped" in caplog.text


def test_stacked_kv_reads_as_a_list_of_layer_pairs():
    from kernel_server.checkpoints.snapshot import StackedKV
    host = torch.arange(6 * 2 * 3, dtype=torch.float32).view(6, 1, 2, 3)
    kv = StackedKV(host)
    assert len(kv) == 3 and bool(kv)
    pairs = list(kv)
    assert [(k.data_ptr(), v.data_ptr()) for k, v in pairs] == \
        [(host[2 * i].data_ptr(), host[2 * i + 1].data_ptr()) for i in range(3)]
    assert torch.equal(kv[-1][1], host[5]) and len(kv[1:]) == 2
    with pytest.raises(IndexError):
        kv[3]


def test_a_stacked_host_copy_restores_layer_by_layer():
    """What a CUDA checkpoint holds (one stacked host tensor) restores into a DynamicCache
    of the same keys and values, none of them aliasing the checkpoint's memory."""
    from kernel_server.checkpoints.snapshot import Checkpoint, StackedKV, cache_from_host
    from kernel_server.model.interventions import Interventions
    from kernel_server.runtime.generation import GenerationConfig, GenState
    loaded = _llama()
    with torch.no_grad():
        out = loaded.model(input_ids=torch.arange(10).view(1, 10), use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    host = torch.stack([t for layer in cache.layers for t in (layer.keys, layer.values)])
    state = GenState(list(range(11)), list(range(11)), 1, [], [], GenerationConfig(), 0)
    ck = Checkpoint("c", "me", "tiny", state, Interventions(), StackedKV(host), host.numel() * 4)
    restored = cache_from_host(ck, loaded)
    for layer, (k, v) in zip(restored.layers, ck.kv):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
        assert layer.keys.data_ptr() != k.data_ptr()


def test_staging_buffer_is_handed_out_only_when_free():
    """The device staging buffer (CPU memory here: the logic is the same): a view at its
    start while no copy reads it; None when too small or while the last copy is in flight."""
    from kernel_server.checkpoints.snapshot import DeviceStaging

    class Copy:                                # a CUDA event's query(), by hand
        done = False

        def query(self):
            return self.done
    staging = DeviceStaging(4096, torch.device("cpu"))
    view = staging.take((4, 1, 2, 64), torch.bfloat16)              # 1024 bytes
    assert view.shape == (4, 1, 2, 64) and view.dtype == torch.bfloat16 and staging.holds(view)
    assert staging.take((4097,), torch.uint8) is None                # too big
    copy = Copy()
    staging.in_use_until(copy)
    assert staging.take((16,), torch.float32) is None                # a copy still reads it
    copy.done = True
    assert staging.take((16,), torch.float32) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, side stream)")
def test_prepare_makes_the_staging_buffer_and_checkpoints_stay_exact():
    """prepare(model) allocates the device staging buffer and dispatches the warm-up (its
    arena block comes back); a checkpoint then allocates no device memory and is bit-exact;
    one dispatched while the staging buffer is still read stacks through torch's allocator,
    as exact."""
    from kernel_server.checkpoints.snapshot import StackedKV, copy_to_host
    loaded = _llama(torch.bfloat16, positions=2048)
    loaded.device = torch.device("cuda")
    loaded.model.to("cuda")
    store = CheckpointStore(budget_bytes=1 << 30, pinned_pool_bytes=1024)
    store.prepare(loaded)
    assert store.arena.idle() and store.staging is not None
    assert store.staging.nbytes == store.arena.nbytes
    kv = [(torch.randn(1, 2, 2048, 16, dtype=torch.bfloat16, device="cuda"),
           torch.randn(1, 2, 2048, 16, dtype=torch.bfloat16, device="cuda")) for _ in range(3)]
    torch.cuda.synchronize()
    allocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
    hosts, done, release = copy_to_host(kv, loaded.device, store.arena, staging=store.staging)
    assert torch.cuda.memory_stats().get("num_device_alloc", 0) == allocs
    assert isinstance(hosts, StackedKV) and release is not None

    class InFlight:
        def query(self):
            return False
    held = store.staging._reader
    store.staging.in_use_until(InFlight())
    hosts2, done2, release2 = copy_to_host(kv, loaded.device, store.arena, staging=store.staging)
    store.staging.in_use_until(held)
    for d in (done, done2):
        d.synchronize()
    for pairs in (hosts, hosts2):
        for (k, v), (hk, hv) in zip(kv, pairs):
            assert torch.equal(hk, k.cpu()) and torch.equal(hv, v.cpu())
    release()
    if release2 is not None:
        release2()
