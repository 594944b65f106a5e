"""The Triton kernels of the decode engine's lane steps, alone (no server):

- the ranged split-KV attention (``exact_attention.fused_single_query_attention(ranges=)``,
  what a lane step runs inside ``rows_apart(first, last)``) gives every row, active or
  padding, the bits of the mask path with the mask of its range, whatever the other rows;
  ``decode_attention`` takes the ranges only for a call of as many rows;
- the fused RMSNorm (kernel_server/model/lane_kernels.py) agrees with a float64 reference
  and with LlamaRMSNorm to rounding, and a row's bits do not depend on the other rows or
  on its index; the wrapper runs it only inside ``fused_norms()`` in the calling thread
  (every other pass gets the module's own forward, bit for bit) and only on the norms
  whose forward is LlamaRMSNorm's.

On CUDA the kernels run compiled. On CPU they run in Triton's interpreter, which Triton
fixes when it is first imported (TRITON_INTERPRET=1 must be set before): there the one test
``test_kernels_in_the_triton_interpreter`` runs this file in a child process with it set,
and the parent process collects only that test (its other tests never see the variable).
Needs Triton installed (the ``test`` extra installs it on Linux x86-64).
Run on a GPU: DJINN_TEST_DEVICE=cuda pytest tests/unit/test_lane_kernels.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from kernel_server.model import exact_attention, lane_kernels

CUDA = (os.environ.get("DJINN_TEST_DEVICE") == "cuda" and torch.cuda.is_available()
        and exact_attention.triton_available())
#: this process is the interpreter child (the kernels run on CPU tensors)
CHILD = (os.environ.get("DJINN_LANE_KERNELS_CHILD") == "1"
         and os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if CUDA else "cpu"


def kernel_test(fn):
    """A test of the kernels: collected on CUDA and in the interpreter child only (elsewhere
    ``test_kernels_in_the_triton_interpreter`` runs it in the child)."""
    if not (CUDA or CHILD):
        fn.__test__ = False
    return fn


def not_in_child(fn):
    """A test the interpreter child does not collect (it runs the kernel tests only)."""
    if CHILD:
        fn.__test__ = False
    return fn


@not_in_child
@pytest.mark.slow                 # (about a minute on the 2-core CI machine)
@pytest.mark.skipif(CUDA, reason="on CUDA the kernel tests run in this process")
@pytest.mark.skipif(not exact_attention.triton_available(),
                    reason="Triton is not installed (pip install triton; in the test extra on "
                           "Linux x86-64): its interpreter runs these kernels on CPU")
def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "DJINN_LANE_KERNELS_CHILD": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-o", "addopts=",
                            "-p", "no:cacheprovider"], env=env, capture_output=True, text=True,
                           timeout=900)
    lines = child.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary, summary


@pytest.fixture
def device(monkeypatch):
    """Where the kernels run. In the interpreter child: Triton 3.9's interpreter turns a loop
    bound into an int with int() of a 1-element array, which numpy 2.4 refuses; it reads the
    element instead here (a test-only shim)."""
    if CHILD:
        import triton.runtime.interpreter as interpreter
        patch = getattr(interpreter, "_patch_lang_tensor", None)
        if patch is not None:
            def patched(tensor, scope):
                patch(tensor, scope)
                scope.set_attr(tensor, "__index__",
                               lambda self: int(self.handle.data.reshape(-1)[0]))
            monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
    return DEVICE


def _mask(first, last, width):
    ar = torch.arange(width, device=first.device)
    return ((ar >= first[:, None]) & (ar <= last[:, None])).view(len(first), 1, 1, width)


def _reference(q, k, v, first, last, scale):
    """float64 attention of each row's query over its range, [b, 1, heads, d]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    outs = []
    for r in range(q.shape[0]):
        lo, hi = int(first[r]), int(last[r])
        kk = k[r:r + 1, :, lo:hi + 1].double().repeat_interleave(heads // kv_heads, 1)
        vv = v[r:r + 1, :, lo:hi + 1].double().repeat_interleave(heads // kv_heads, 1)
        w = torch.softmax(q[r:r + 1].double() @ kk.transpose(-1, -2) * scale, -1)
        outs.append((w @ vv).transpose(1, 2))
    return torch.cat(outs)


# (heads, kv_heads, dim, width, ranges): a lane of 257 positions (256 + the scratch column)
# with an active row, padding rows (the scratch column only) and a row not starting at 0;
# a lane of 2200 positions: more blocks than splits, so a split owns several blocks
CASES = [
    (4, 2, 64, 257, [(0, 133), (256, 256), (70, 200)]),
    (2, 2, 32, 257, [(0, 0), (256, 256), (0, 255)]),
    (2, 1, 64, 2200, [(0, 2150), (2199, 2199), (100, 2199)]),
]


@kernel_test
@pytest.mark.parametrize("heads,kv_heads,dim,width,ranges", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16] + [torch.float32] * CUDA)   # (interpreter: slow)
def test_ranged_attention_equals_the_mask_path_bit_for_bit(device, heads, kv_heads, dim, width,
                                                           ranges, dtype):
    gen = torch.Generator().manual_seed(0)
    b = len(ranges)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
               for shape in ((b, heads, 1, dim), (b, kv_heads, width, dim), (b, kv_heads, width, dim)))
    first = torch.tensor([lo for lo, _ in ranges], device=device)
    last = torch.tensor([hi for _, hi in ranges], device=device)
    scale = dim ** -0.5
    masked = exact_attention.fused_single_query_attention(q, k, v, _mask(first, last, width), scale)
    ranged = exact_attention.fused_single_query_attention(q, k, v, None, scale, ranges=(first, last))
    assert ranged.shape == (b, 1, heads, dim) and ranged.dtype == dtype
    assert torch.isfinite(ranged).all()           # padding rows too
    assert torch.equal(ranged, masked)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    ref = _reference(q, k, v, first, last, scale)
    assert torch.allclose(ranged.double(), ref, atol=tol, rtol=0), (ranged.double() - ref).abs().max()
    # a row alone (its own range, batch of one) gets the bits it gets among the others
    for r in range(b):
        alone = exact_attention.fused_single_query_attention(
            q[r:r + 1], k[r:r + 1], v[r:r + 1], None, scale, ranges=(first[r:r + 1], last[r:r + 1]))
        assert torch.equal(alone, ranged[r:r + 1]), r


@kernel_test
def test_decode_attention_reads_the_ranges_inside_rows_apart(device):
    gen = torch.Generator().manual_seed(1)
    b, heads, dim, width = 3, 2, 32, 257
    q = torch.randn(b, heads, 1, dim, generator=gen).to(device)
    k = torch.randn(b, 1, width, dim, generator=gen).to(device)
    v = torch.randn(b, 1, width, dim, generator=gen).to(device)
    first = torch.tensor([0, 256, 5], device=device)
    last = torch.tensor([40, 256, 100], device=device)
    every = torch.ones(b, 1, 1, width, dtype=torch.bool, device=device)   # a mask that disagrees
    by_mask = exact_attention.decode_attention(q, k, v, every, None)
    with exact_attention.rows_apart(first, last):
        by_ranges = exact_attention.decode_attention(q, k, v, every, None)
        # another batch size (not the lane's rows): the mask serves, as outside
        other = exact_attention.decode_attention(q[:2], k[:2], v[:2], every[:2], None)
    expected = exact_attention.fused_single_query_attention(q, k, v, _mask(first, last, width),
                                                            dim ** -0.5)
    assert torch.equal(by_ranges, expected)
    assert not torch.equal(by_ranges, by_mask)
    assert torch.equal(other, by_mask[:2])
    assert getattr(exact_attention._rows, "ranges", None) is None      # left as it was


@not_in_child
@pytest.mark.skipif(not CUDA, reason="needs CUDA (graph capture)")
def test_ranged_attention_under_a_cuda_graph_follows_the_ranges_of_each_replay():
    gen = torch.Generator(device="cuda").manual_seed(2)
    b, heads, dim, width = 8, 32, 128, 1025
    q = torch.randn(b, heads, 1, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, heads, width, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, heads, width, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    first = torch.full((b,), width - 1, device="cuda")
    last = torch.full((b,), width - 1, device="cuda")
    run = lambda: exact_attention.fused_single_query_attention(q, k, v, None, None, ranges=(first, last))
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for length in (1, 64, 65, 700, 1024):
        first[0], last[0] = 0, length - 1          # row 0 active, the rest padding
        first[3], last[3] = length // 2, length - 1
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, run()), length


# ---- the fused RMSNorm ------------------------------------------------------------------------
def _norm_reference(x, weight, eps):
    xd = x.double()
    h = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * h


@kernel_test
@pytest.mark.parametrize("n", [64, 576, 4096, 9000])      # (9000: two chunks of 8192)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_norm_matches_a_float64_reference_and_llama(device, n, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(8, 1, n, generator=gen) * 3).to(device=device, dtype=dtype)
    norm = LlamaRMSNorm(n, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_((torch.rand(n, generator=gen) + 0.5).to(dtype))
    out = lane_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert out.shape == x.shape and out.dtype == dtype
    # two roundings to the output dtype (h, then weight * h): two units in the last place
    rtol = {torch.float32: 2e-6, torch.float16: 2 * 2 ** -10, torch.bfloat16: 2 * 2 ** -7}[dtype]
    ref = _norm_reference(x, norm.weight, norm.variance_epsilon)
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max()
    assert err <= rtol, err
    with torch.no_grad():
        eager = norm(x)
    step = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    assert ((out.double() - eager.double()).abs() / eager.double().abs().clamp_min(1e-3)).max() <= 2 * step


@kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_norm_rows_do_not_depend_on_the_others(device, dtype):
    gen = torch.Generator().manual_seed(3)
    n = 4096
    x = torch.randn(8, 1, n, generator=gen).to(device=device, dtype=dtype)
    weight = torch.rand(n, generator=gen).to(device=device, dtype=dtype)
    eight = lane_kernels.rms_norm(x, weight, 1e-6)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled = lane_kernels.rms_norm(x[perm.to(device)], weight, 1e-6)
    other = x.clone()
    other[1:] = torch.randn(7, 1, n, generator=gen).to(device=device, dtype=dtype) * 100
    for r in range(8):
        alone = lane_kernels.rms_norm(x[r:r + 1], weight, 1e-6)
        assert torch.equal(alone, eight[r:r + 1]), r
        assert torch.equal(shuffled[int((perm == r).nonzero())], eight[r]), r
    assert torch.equal(lane_kernels.rms_norm(other, weight, 1e-6)[0], eight[0])
    # a [rows, heads, dim] input (Qwen3's per-head norms) is rows of dim
    heads = x.view(8, 32, 128)
    w = weight[:128].contiguous()
    assert torch.equal(lane_kernels.rms_norm(heads, w, 1e-6)[2:3],
                       lane_kernels.rms_norm(heads[2:3], w, 1e-6))


def _tiny_llama(device):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(device).eval()


@kernel_test
def test_norm_wrapper_fuses_only_inside_fused_norms_in_its_thread(device, monkeypatch):
    model = _tiny_llama(device)
    plain = _tiny_llama(device)                 # the same weights, never wrapped
    assert lane_kernels.install(model) == 2 * 2 + 1         # two per layer and the final one
    assert lane_kernels.install(model) == 5                 # once per model
    ids = torch.tensor([[3, 9, 27, 17, 51]], device=device)
    with torch.no_grad():
        expected = plain(ids).logits
        assert torch.equal(model(ids).logits, expected)     # outside: the module's own forward
        calls = []
        fused = lane_kernels.rms_norm
        monkeypatch.setattr(lane_kernels, "rms_norm", lambda *a: calls.append(1) or fused(*a))
        other: dict = {}
        with lane_kernels.fused_norms():
            inside = model(ids).logits
            # another thread meanwhile (an engine-off pass while a lane step is paused)
            t = threading.Thread(target=lambda: other.update(logits=model(ids).logits))
            t.start()
            t.join()
    assert len(calls) == 5                                   # this thread's pass only
    assert torch.equal(other["logits"], expected)
    assert torch.allclose(inside, expected, atol=1e-4, rtol=0)
    monkeypatch.setattr(lane_kernels, "FUSED", False)        # switched off: the own forward
    with torch.no_grad(), lane_kernels.fused_norms():
        assert torch.equal(model(ids).logits, expected)
    assert len(calls) == 5


def test_only_norms_with_llamas_math_are_wrapped():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    assert lane_kernels.same_math(LlamaRMSNorm(8)) and lane_kernels.same_math(Qwen2RMSNorm(8))
    assert not lane_kernels.same_math(GemmaRMSNorm(8))     # (1 + weight), another order
    assert not lane_kernels.same_math(torch.nn.LayerNorm(8))
    assert not lane_kernels.same_math(torch.nn.RMSNorm(8))
