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
