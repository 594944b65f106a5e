"""The deterministic decode attention (kernel_server/model/exact_attention.py) and the
exactness the server states in ``info()["exactness"]``.

- The fused split-KV Triton kernel, on CUDA: close to a float32 reference; the same bits
  on every call; a row's bits independent of the other rows of the batch and of the padded
  cache length; positions past a row's extent never read (they hold NaN here); under a
  CUDA graph it follows the mask of each replay (the length lives on the device).
- Through a server Session: the relations ``info()["exactness"]`` states for the model's
  device and dtype, checked one by one (on CPU in CI: float32 tiny Llama; on CUDA:
  random-init Llama-1B shape in bfloat16), and a pause at a middle layer on every decode
  step for 32 steps giving the uninterrupted run's logits bit for bit.
Run on a GPU: DJINN_TEST_DEVICE=cuda pytest tests/integration/test_exact_attention.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_server.checkpoints.store import CheckpointStore
from kernel_server.model import exact_attention
from test_fast_decode import (DEVICE, HAS_CUDA, event, fast_mode, finished, generate, get_model,
                              session)

needs_fused = pytest.mark.skipif(
    not (HAS_CUDA and exact_attention.triton_available()),
    reason="needs CUDA and Triton (the fused decode attention); CPU decode attention is "
           "PyTorch's own, checked through the stated relations below")


def reference(q, k, v, extent: int, scale: float) -> torch.Tensor:
    """float64 attention of one query over the first ``extent`` positions, [b, 1, heads, d]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k[:, :, :extent].double().repeat_interleave(heads // kv_heads, 1)
    v = v[:, :, :extent].double().repeat_interleave(heads // kv_heads, 1)
    w = torch.softmax(q.double() @ k.transpose(-1, -2) * scale, -1)
    return (w @ v).transpose(1, 2)


SHAPES = [(32, 32, 128), (32, 8, 128), (9, 3, 64), (12, 12, 64)]   # 7B, GQA 4, SmolLM2, GPT-2


@needs_fused
@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_kernel_matches_a_float64_reference(heads, kv_heads, dim, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    bucket = 8192
    for extent in (1, 5, 511, 4000, 8192):
        q = torch.randn(1, heads, 1, dim, device="cuda", dtype=dtype, generator=gen)
        k = torch.randn(1, kv_heads, bucket, dim, device="cuda", dtype=dtype, generator=gen)
        v = torch.randn(1, kv_heads, bucket, dim, device="cuda", dtype=dtype, generator=gen)
        mask = (torch.arange(bucket, device="cuda") < extent).view(1, 1, 1, bucket)
        out = exact_attention.fused_single_query_attention(q, k, v, mask, dim ** -0.5)
        ref = reference(q, k, v, extent, dim ** -0.5)
        assert out.shape == (1, 1, heads, dim) and out.dtype == dtype
        # float32 accumulation throughout: the output's own rounding is the error
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        assert torch.allclose(out.double(), ref, atol=tol, rtol=0), (extent, (out.double() - ref).abs().max())


@needs_fused
@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES[:3])
def test_fused_kernel_is_deterministic_batch_invariant_and_reads_only_the_extent(heads, kv_heads, dim):
    """Eight rows of different extents in one padded 8192-position cache whose unused
    positions hold NaN: each row equals the same row computed alone on a cache of exactly
    its extent without a mask (a DynamicCache's layout), bit for bit, on every call."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    dtype, bucket = torch.bfloat16, 8192
    extents = [1, 63, 64, 65, 512, 3000, 4097, 8192]
    b = len(extents)
    q = torch.randn(b, heads, 1, dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(b, kv_heads, bucket, dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b, kv_heads, bucket, dim, device="cuda", dtype=dtype, generator=gen)
    mask = torch.zeros(b, 1, 1, bucket, dtype=torch.bool, device="cuda")
    for i, e in enumerate(extents):
        mask[i, ..., :e] = True
        k[i, :, e:] = float("nan")
        v[i, :, e:] = float("nan")
    mask[5, ..., 7] = False                          # a hole inside an extent (left padding)
    batch = exact_attention.fused_single_query_attention(q, k, v, mask, 0.125)
    assert torch.isfinite(batch).all()               # no position past an extent was read
    for _ in range(3):
        assert torch.equal(exact_attention.fused_single_query_attention(q, k, v, mask, 0.125), batch)
    for i, e in enumerate(extents):
        kk, vv = k[i:i + 1, :, :e].contiguous(), v[i:i + 1, :, :e].contiguous()
        row_mask = mask[i:i + 1, ..., :e] if i == 5 else None
        alone = exact_attention.fused_single_query_attention(q[i:i + 1], kk, vv, row_mask, 0.125)
        assert torch.equal(alone, batch[i:i + 1]), f"row {i} (extent {e})"
        # the row again inside a 1024-position cache (when it fits) and in a batch of 3
        if e <= 1024:
            small = exact_attention.fused_single_query_attention(
                q[i:i + 1].expand(3, -1, -1, -1), k[i:i + 1, :, :1024].expand(3, -1, -1, -1),
                v[i:i + 1, :, :1024].expand(3, -1, -1, -1), mask[i:i + 1, ..., :1024], 0.125)
            assert torch.equal(small, batch[i:i + 1].expand(3, -1, -1, -1))


@needs_fused
def test_fused_kernel_under_a_cuda_graph_follows_the_mask_of_each_replay():
    gen = torch.Generator(device="cuda").manual_seed(2)
    heads, dim, bucket = 32, 128, 4096
    q = torch.randn(1, heads, 1, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = torch.randn(2, 1, heads, bucket, dim, device="cuda", dtype=torch.bfloat16,
                       generator=gen).unbind(0)
    mask = torch.zeros(1, 1, 1, bucket, dtype=torch.bool, device="cuda")
    mask[..., :100] = True
    exact_attention.fused_single_query_attention(q, k, v, mask, 0.1)      # compile off-capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = exact_attention.fused_single_query_attention(q, k, v, mask, 0.1)
    for extent in (100, 3000, 1, 4096):
        mask.zero_()
        mask[..., :extent] = True
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, exact_attention.fused_single_query_attention(q, k, v, mask, 0.1))
        assert torch.equal(out, exact_attention.fused_single_query_attention(
            q, k[:, :, :extent].contiguous(), v[:, :, :extent].contiguous(), None, 0.1))


def test_rows_apart_makes_cpu_single_query_attention_independent_of_the_slot():
    """Inside ``rows_apart()`` (the engine's lane steps) a CPU single-query call with several
    rows runs row by row: a row's bits are the same in every slot of the batch, the other
    rows being lane padding (attending to one scratch position). Without it, on the 2-core
    CI machine, rows in slots 4-7 differ from slots 0-3 in the last bits (PyTorch splits
    the batch over its threads)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    exact_attention.install()
    if not exact_attention.installed():
        pytest.skip("DJINN_EXACT_DECODE_ATTENTION=0: the wrapper is not installed")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    rows, heads, kv_heads, n, dim, extent = 8, 4, 2, 257, 16, 11
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, heads // kv_heads
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(rows, heads, 1, dim, generator=gen)
    k = torch.randn(rows, kv_heads, n, dim, generator=gen)
    v = torch.randn(rows, kv_heads, n, dim, generator=gen)

    def in_slot(slot):
        mask = torch.zeros(rows, 1, 1, n, dtype=torch.bool)
        mask[..., n - 1] = True                       # padding rows: the scratch column
        mask[slot] = False
        mask[slot, ..., :extent] = True
        qq, kk, vv = q.clone(), k.clone(), v.clone()
        qq[slot], kk[slot], vv[slot] = q[0], k[0], v[0]
        with exact_attention.rows_apart():
            out = sdpa(module, qq, kk, vv, mask, dropout=0.0, scaling=dim ** -0.5)[0]
        assert out.shape == (rows, 1, heads, dim)
        return out[slot]
    first = in_slot(0)
    for slot in range(1, rows):
        assert torch.equal(in_slot(slot), first), f"slot {slot}"
    ref = reference(q[:1], k[:1], v[:1], extent, dim ** -0.5)
    assert torch.allclose(first.double(), ref[0], atol=1e-5)


# ---- the relations info() states, checked through a server Session ------------------------------
CASES = [("tiny-llama", DEVICE, "float32")] + [
    pytest.param("random:llama-1b", "cuda", "bfloat16",
                 marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (the GPU relation)"))]
N = 32


def _prompt(loaded, length: int) -> list:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, loaded.vocab_size, (length,), generator=gen).tolist()


@pytest.mark.parametrize("name,device,dtype", CASES)
def test_the_stated_exactness_holds(monkeypatch, name, device, dtype):
    """Each pair of modes ``info()["exactness"]`` says agree bit for bit does; each pair it
    says agree to rounding gives the same tokens and logits within the stated bound."""
    loaded = get_model(name, device, dtype)
    monkeypatch.setattr(loaded, "fast_decoder", None)      # slots of its own
    stated = loaded.info()["exactness"]
    assert stated["device"] == loaded.device.type and stated["dtype"] == dtype
    fast = "auto" if device == "cuda" else "static"
    prompt = _prompt(loaded, 512 if device == "cuda" else 40)
    s = session(loaded)
    runs = {}
    with fast_mode("off"):
        runs["eager"] = generate(s, prompt, N)
    with fast_mode(fast):
        runs["fast"] = generate(s, prompt, N)
        runs["repeated"] = generate(s, prompt, N)
        s.set_breakpoint(layer=0, steps=[1])
        ev = s.generate(prompt, max_new_tokens=N, return_logits=True, stop_at_eos=False)
        assert ev["event"] == "paused"
        ck = s.checkpoint(CheckpointStore(4096 << 20))
        ck.wait()
        event(s.stop())
        s.restore(ck)
        s.clear_breakpoints()                  # the checkpoint holds the breakpoint too
        runs["restored"] = finished(s.resume())
        if device == "cuda":
            assert s.run._fast.stats["graph_steps"] == N - 1
    for group in stated["same_bits"]:
        for other in group[1:]:
            a, b = runs[group[0]], runs[other]
            diff = [i for i in range(N) if not np.array_equal(a["logits"][i], b["logits"][i])]
            assert not diff, f"{group[0]} vs {other}: logits differ from step {diff[0]}"
            assert a["tokens"] == b["tokens"]
    for a, b, bound in stated["within"]:
        gap = float(np.abs(runs[a]["logits"] - runs[b]["logits"]).max())
        assert runs[a]["tokens"] == runs[b]["tokens"] and gap <= bound, (a, b, gap)


@pytest.mark.parametrize("name,device,dtype", CASES)
def test_a_pause_at_a_middle_layer_on_every_step_gives_the_uninterrupted_logits(
        monkeypatch, name, device, dtype):
    loaded = get_model(name, device, dtype)
    monkeypatch.setattr(loaded, "fast_decoder", None)
    prompt = _prompt(loaded, 512 if device == "cuda" else 40)
    middle = loaded.num_layers // 2
    s = session(loaded)
    with fast_mode("auto" if device == "cuda" else "static"):
        base = generate(s, prompt, N)
        s.set_breakpoint(layer=middle, phase="decode")
        ev = s.generate(prompt, max_new_tokens=N, return_logits=True, stop_at_eos=False)
        pauses = 0
        while ev["event"] == "paused":
            pauses += 1
            ev = event(s.resume())
        assert ev["event"] == "finished" and pauses == N - 1
    assert ev["result"]["tokens"] == base["tokens"]
    assert np.array_equal(ev["result"]["logits"], base["logits"])
