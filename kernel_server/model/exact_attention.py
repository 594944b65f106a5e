"""Bit-reproducible single-query attention: every decode step of a run gives the same
numbers whatever ran on the GPU before it, whichever cache holds the keys, and whoever
else is in the batch.

Why: on an H200 (torch 2.11, bfloat16) the fused SDPA kernels that serve a decode step
(one query token: flash attention without a mask on a DynamicCache, the memory-efficient
kernel with the static cache's mask) are not reproducible from run to run. The same
layer, fed bit-identical queries, keys and values, now and then returns an output a few
bfloat16 ulps off, depending on what the allocator handed out before (the same step
repeated in a loop never differs). Two generations of the same prompt with the same
rules then part after a few tokens, and so do a fresh run and a restored checkpoint
(``.gpu/diag_fast.py``: the first op that differs is always ``sdpa``).

What: transformers' ``sdpa`` attention entry is wrapped once per process, by ``install()``,
which ``kernel_server.model.registry.load_model`` calls before it builds a model (code that
builds a ``LoadedModel`` by hand - tests, benchmarks - calls ``install()`` itself). The
wrapper is process-wide because transformers' attention registry is. A call with one
query position on a CUDA device takes one of two deterministic kernels:

- ``triton`` (the default where Triton imports): a split-KV ("flash-decoding") kernel of
  our own, ``split_kernel`` + ``combine_kernel`` (kernel_server/model/triton_kernels.py,
  imported on first use). Each program owns one (batch row,
  key/value head, split); block j of ``block_n`` positions belongs to split
  ``j % KV_SPLITS``, whatever the cache's length. A block with no attended position (the
  padded tail of a static cache: the mask says so on the device, so one CUDA graph serves
  every length) is skipped before its keys and values are read: only the positions in use
  are read, spread evenly over the splits. Each split keeps a running max, sum and float32
  accumulator (online softmax); a second kernel merges a row's ``KV_SPLITS`` partials in
  one fixed order. No atomics, no autotuning (the configuration is a function of the model's head
  shape only), so: the same inputs give the same bits every time; a row's numbers depend
  on its own extent, queries, keys and values only - not on the batch size or the other
  rows (batch-invariant), and not on the cache's padded length (a 1024- or 8192-position
  static cache and the DynamicCache of eager decode give the same bits). Inside
  ``rows_apart(first, last)`` (the engine's lane steps) a call of that many rows reads each
  row's attended range from those device tensors instead of the mask: a program walks
  only the blocks of its row's range (the same blocks in the same order as the mask path,
  so the same bits: tested, CPU interpreter and H200) and serves several splits in turn,
  one program per block of the lane, so a padding row (the scratch column only) costs
  next to nothing.
- ``math``: ``aten::_scaled_dot_product_attention_math`` in float32 over the whole cache
  (a matmul, a softmax and a matmul: deterministic, but it pays for the padded bucket).
  The fallback when Triton is missing or a call has a shape the fused kernel does not
  take (an additive float mask, a mask per query head, a head size over 256).

Everything else - the prefill, CPU, any call with dropout or extras this wrapper does not
know - goes to the original function unchanged, with one exception: inside ``rows_apart()``
(the multi-tenant engine's lane steps, kernel_server/runtime/scheduler.py) a single-query
call on CPU with several batch rows runs row by row, each row the same [1, ...] call: on
CPU, PyTorch's fused SDPA splits a batch over threads so that a row's rounding depends on
its slot in the batch (measured: rows 4-7 of 8 differ from rows 0-3 by ~3e-7 with 2
threads), and a lane row's bits must not. ``DJINN_EXACT_DECODE_ATTENTION=0`` leaves
transformers' attention as it is (not reproducible on GPU); ``=math`` forces the float32
math kernel; ``set_kernel`` switches at run time (benchmarks compare the three).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

#: device types whose single-query attention takes a deterministic kernel
DEVICE_TYPES = {"cuda"}
#: splits of the fused kernel: fixed, so a row's reduction order is a function of its
#: attended positions alone (changing it changes the numbers, as a different kernel would)
KV_SPLITS = 32
KERNELS = ("triton", "math", "sdpa")
_lock = threading.Lock()
_original = None
_kernel: str | None = None      # None: "triton" where it imports, else "math"
_rows = threading.local()       # .apart: inside rows_apart() in this thread


@contextlib.contextmanager
def rows_apart(first: torch.Tensor | None = None, last: torch.Tensor | None = None):
    """In this thread, inside the block: single-query attention with several batch rows on
    a device without the deterministic kernel (CPU) runs one row at a time, so a row's
    numbers do not depend on its slot in the batch (the engine's lane steps).

    ``first``, ``last``: [rows] integer device tensors, the positions each row attends to
    (``first`` to ``last`` inclusive; the engine's ``Lane.inputs`` rows 3 and 2). Given, a
    single-query call of that many rows on the fused kernel reads them instead of its
    mask (``fused_single_query_attention(ranges=...)``): each program walks only the
    blocks of its row's range, so padding rows cost next to nothing. The lane's mask says
    the same positions, so a row's bits are those of the mask path."""
    before = (getattr(_rows, "apart", False), getattr(_rows, "ranges", None))
    _rows.apart = True
    _rows.ranges = None if first is None else (first, last)
    try:
        yield
    finally:
        _rows.apart, _rows.ranges = before


def _row_by_row(module, query, key, value, attention_mask, **kwargs):
    outs = []
    for r in range(query.shape[0]):
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[0] > 1:
            mask = mask[r:r + 1]
        outs.append(_original(module, query[r:r + 1], key[r:r + 1], value[r:r + 1], mask,
                              **kwargs)[0])
    return torch.cat(outs, 0), None


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports (the fused kernel then serves CUDA decode attention)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:      # not installed, or a broken install: the math kernel serves
        return False
    return True


def kernel() -> str:
    """The kernel single-query CUDA attention takes now: ``triton``, ``math`` or ``sdpa``
    (transformers' own, not reproducible)."""
    if _kernel is not None:
        return _kernel
    env = os.environ.get("DJINN_EXACT_DECODE_ATTENTION", "1")
    if env == "math" or not triton_available():
        return "math"
    return "triton"


def set_kernel(name: str | None) -> None:
    """Choose the decode attention kernel for the whole process (None: the default). For
    benchmarks and tests: runs before and after the switch do not agree bit for bit."""
    global _kernel
    if name is not None and name not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError("the fused decode attention needs Triton, which does not import here")
    _kernel = name


def single_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Attention of one query position by the float32 math kernel, deterministic on every
    device.

    query [batch, heads, 1, head_dim]; key, value [batch, kv_heads, positions, head_dim];
    mask None, bool (True: attend) or additive, broadcastable to [batch, heads, 1,
    positions]. Returns [batch, 1, heads, head_dim] (the layout attention modules take)."""
    b, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    dtype = query.dtype
    q = query.reshape(b, kv_heads, groups, dim)         # the group's queries share one K/V head
    if mask is not None and mask.dim() == 4 and mask.shape[1] != 1:
        # a mask per query head: [b, heads, 1, n] -> [b, kv_heads, groups, n]
        mask = mask.reshape(mask.shape[0], kv_heads, groups, mask.shape[-1])
    if dtype in (torch.float16, torch.bfloat16):
        q, key, value = q.float(), key.float(), value.float()
    if mask is not None:
        # the math op adds its mask to the scores (SDPA's front end converts a bool mask)
        mask = (torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool else mask.to(q.dtype))
    out = torch.ops.aten._scaled_dot_product_attention_math(q, key, value, mask, 0.0, False,
                                                             scale=scale)[0]
    return out.to(dtype).reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous()


# ---- the fused split-KV kernel ----------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def fused_config(groups: int, head_dim: int) -> dict:
    """The fused kernel's fixed configuration for a head shape (no autotuning: a tuned
    choice could differ between runs, and with it the numbers)."""
    g_pad = _next_pow2(groups)
    block_n = 64 if g_pad <= 2 else 32 if g_pad <= 4 else 16
    return {"G_PAD": g_pad, "D_PAD": _next_pow2(head_dim), "BLOCK_N": block_n,
            "SPLITS": KV_SPLITS, "num_warps": 4, "num_stages": 2}


def fused_supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None) -> bool:
    """Whether the fused kernel takes this call (else the math kernel serves it)."""
    b, heads, q_len, dim = query.shape
    if q_len != 1 or dim > 256 or value.shape[-1] != dim or key.shape[1] != value.shape[1]:
        return False
    if heads % key.shape[1] or heads // key.shape[1] > 16:
        return False
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        return False
    if mask is not None:
        if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
                or mask.shape[-1] != key.shape[2] or mask.shape[0] not in (1, b)):
            return False
    return True


def _kernels():
    """The split and combine kernels (kernel_server/model/triton_kernels.py, imported on
    first use: importing this module needs no Triton)."""
    from kernel_server.model import triton_kernels
    return triton_kernels.split_kernel, triton_kernels.combine_kernel


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_single_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 mask: torch.Tensor | None, scale: float | None,
                                 ranges: tuple | None = None) -> torch.Tensor:
    """Attention of one query position by the split-KV Triton kernel (shapes as
    ``single_query_attention``; ``fused_supports`` must hold). Deterministic and
    batch-invariant; reads each row's keys and values up to its extent only.

    ``ranges``: (first, last), [batch] integer tensors on the device: row b attends to
    positions first[b]..last[b] (inclusive), ``mask`` is not read. A row then gets the bits
    of the mask path with the mask of that range (same blocks, same order, same code)."""
    split_kernel, combine_kernel = _kernels()
    b, heads, _, dim = query.shape
    kv_heads, n_pos = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    cfg = fused_config(groups, dim)
    if scale is None:
        scale = dim ** -0.5
    parts = b * kv_heads * cfg["SPLITS"] * cfg["G_PAD"]
    f32 = dict(dtype=torch.float32, device=query.device)
    opart = torch.empty(parts * cfg["D_PAD"], **f32)
    mpart = torch.empty(parts, **f32)
    lpart = torch.empty(parts, **f32)
    out = torch.empty((b, 1, heads, dim), dtype=query.dtype, device=query.device)
    if ranges is not None:
        first, last = ranges
        if first.shape != (b,) or last.shape != (b,):
            raise ValueError(f"ranges must be two [{b}] tensors; got {tuple(first.shape)}, "
                             f"{tuple(last.shape)}")
        mask_args = (query, 0, 0, 0)        # never read (RANGED)
        range_args = (first, last, first.stride(0), last.stride(0))
        # a program per (row, head) and block of the lane, up to SPLITS: splits beyond the
        # lane's blocks are empty and cost one store each in a program that exists anyway
        grid_splits = min(cfg["SPLITS"], -(-n_pos // cfg["BLOCK_N"]))
    else:
        if mask is not None:
            rows = mask.expand(b, 1, 1, n_pos)[:, 0, 0, :].view(torch.uint8)
            mask_args = (rows, rows.stride(0), rows.stride(1), 1)
        else:
            mask_args = (query, 0, 0, 0)        # never read (has_mask 0)
        range_args = (query, query, 0, 0)       # never read (not RANGED)
        grid_splits = cfg["SPLITS"]
    split_kernel[(b * kv_heads, grid_splits)](
        query, key, value, mask_args[0], range_args[0], range_args[1], opart, mpart, lpart,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask_args[1], mask_args[2],
        range_args[2], range_args[3], n_pos, mask_args[3], kv_heads, float(scale), grid_splits,
        GROUPS=groups, G_PAD=cfg["G_PAD"], D=dim, D_PAD=cfg["D_PAD"], SPLITS=cfg["SPLITS"],
        BLOCK_N=cfg["BLOCK_N"], RANGED=ranges is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    combine_kernel[(b * kv_heads,)](
        opart, mpart, lpart, out, out.stride(0), out.stride(2), kv_heads,
        GROUPS=groups, G_PAD=cfg["G_PAD"], D=dim, D_PAD=cfg["D_PAD"], SPLITS=cfg["SPLITS"],
        num_warps=cfg["num_warps"])
    return out


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Single-query attention by the process's deterministic kernel (``kernel()``): the
    fused one where it takes the call, else the float32 math kernel. Inside
    ``rows_apart(first, last)`` a call of as many rows as the ranges on the fused kernel
    reads the ranges instead of ``mask`` (which must say the same positions)."""
    if kernel() == "triton" and query.device.type != "cpu" or _interpreted():
        ranges = getattr(_rows, "ranges", None)
        if (ranges is not None and ranges[0].shape[0] == query.shape[0]
                and fused_supports(query, key, value, None)):
            return fused_single_query_attention(query, key, value, None, scale, ranges=ranges)
        if fused_supports(query, key, value, mask):
            return fused_single_query_attention(query, key, value, mask, scale)
    return single_query_attention(query, key, value, mask, scale)


def _interpreted() -> bool:
    # TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors (tests without a GPU)
    return _interpret() and kernel() == "triton"


def _exact_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                is_causal=None, **kwargs):
    if (query.shape[2] == 1 and query.shape[0] > 1 and getattr(_rows, "apart", False)
            and (query.device.type not in DEVICE_TYPES or kernel() == "sdpa")):
        return _row_by_row(module, query, key, value, attention_mask, dropout=dropout,
                           scaling=scaling, is_causal=is_causal, **kwargs)
    if (query.shape[2] != 1 or query.device.type not in DEVICE_TYPES or dropout
            or kernel() == "sdpa"
            or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks", "head_mask"))
            or query.shape[1] % key.shape[1] != 0 or kwargs.get("output_attentions")):
        return _original(module, query, key, value, attention_mask, dropout=dropout,
                         scaling=scaling, is_causal=is_causal, **kwargs)
    return decode_attention(query, key, value, attention_mask, scaling), None


#: the largest logit gap between eager and fast decode where they are not bit-identical
#: (float32, CPU: PyTorch's SDPA over the padded static cache vs over the DynamicCache)
ROUNDING_BOUND = 1e-3


def exactness(device, dtype) -> dict:
    """Which decode modes give the same bits for a model on ``device`` in ``dtype``, as
    tests/integration/test_exact_attention.py checks them (``LoadedModel.info()`` reports
    it). Modes: ``eager`` (fast decode off: a DynamicCache, every step eager), ``fast``
    (the server's fast path: CUDA graphs on CUDA, the static cache on CPU), ``repeated``
    (the same run again), ``restored`` (a checkpoint restored and continued). ``same_bits``
    lists groups whose logits agree bit for bit; ``within`` lists (mode, mode, max |logit
    difference|) that agree in tokens and to that bound only."""
    device = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    wrapped = _original is not None and installed()
    attention = (kernel() if wrapped and device.type in DEVICE_TYPES else "sdpa")
    out = {"device": device.type, "dtype": dtype_name, "decode_attention": {
        "triton": "split-KV Triton kernel: deterministic, batch-invariant, reads the extent only",
        "math": "float32 math kernel over the whole cache: deterministic",
        "sdpa": "PyTorch's scaled_dot_product_attention"}[attention]}
    if device.type == "cuda" and attention == "triton":
        # one kernel whose bits depend on a row's extent only: the padded static cache of
        # the graphs and the DynamicCache of eager decode give the same numbers
        out.update(same_bits=[["eager", "fast", "repeated", "restored"]], within=[])
    elif device.type == "cuda" and attention == "math":
        # the math kernel reduces over the padded bucket: another rounding than eager's
        out.update(same_bits=[["fast", "repeated", "restored"]], within=[],
                   differ=[["eager", "fast", "rounding: a reduction over the padded cache"]])
    elif device.type == "cuda":
        out.update(same_bits=[], within=[],
                   differ=[["fast", "repeated", "PyTorch's fused SDPA kernels vary from run to run"]])
    else:
        out.update(same_bits=[["fast", "repeated", "restored"]],
                   within=[["eager", "fast", ROUNDING_BOUND]])
    return out


def install() -> None:
    """Route transformers' ``sdpa`` attention through ``_exact_sdpa``, for the whole process.

    Idempotent and thread-safe: the first call wraps the original function, later calls do
    nothing. Does nothing with ``$DJINN_EXACT_DECODE_ATTENTION=0`` or a transformers without
    the attention registry."""
    global _original
    if os.environ.get("DJINN_EXACT_DECODE_ATTENTION", "1") == "0":
        return
    with _lock:
        if _original is not None:
            return
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
        except ImportError:        # a transformers without the attention registry
            return
        current = ALL_ATTENTION_FUNCTIONS.get("sdpa")
        if current is None:
            return
        _original = current
        AttentionInterface.register("sdpa", _exact_sdpa)


def installed() -> bool:
    """Whether transformers' ``sdpa`` attention goes through ``_exact_sdpa`` now."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS.get("sdpa") is _exact_sdpa
