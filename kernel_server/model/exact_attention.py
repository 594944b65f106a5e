"""Bit-reproducible single-query attention on CUDA: every decode step of a run gives the
same numbers whatever ran on the GPU before it.

Why: on an H200 (torch 2.11, bfloat16) the fused SDPA kernels that serve a decode step
(one query token: flash attention without a mask on a DynamicCache, the memory-efficient
kernel with the static cache's mask) are not reproducible from run to run. The same
layer, fed bit-identical queries, keys and values, now and then returns an output a few
bfloat16 ulps off, depending on what the allocator handed out before (the same step
repeated in a loop never differs). Two generations of the same prompt with the same
rules then part after a few tokens, and so do a fresh run and a restored checkpoint; a
steering sweep from a checkpoint could not reproduce fresh generations, with or without
CUDA graphs (``.gpu/diag_fast.py``: the first op that differs is always ``sdpa``; with
the math kernel no run differs). Float32 happened to be reproducible in those runs.

What: transformers' ``sdpa`` attention entry is wrapped once per process, by ``install()``,
which ``kernel_server.model.registry.load_model`` calls before it builds a model (code that builds a
``LoadedModel`` by hand - tests, benchmarks - calls ``install()`` itself; constructing a
``LoadedModel`` patches nothing). The wrapper is process-wide because transformers' attention
registry is: every model of the process then decodes through it. A call with
one query position on a CUDA device runs ``aten::_scaled_dot_product_attention_math``
(a matmul, a softmax and a matmul: cuBLAS and elementwise kernels, deterministic) in
float32, the grouped query heads packed onto their key/value heads (no copy of the
cache per head). Everything else - the prefill, CPU, any call with dropout or extras
this wrapper does not know - goes to the original function unchanged. Decode attention
reads one row of scores per head, so the math kernel costs little next to the weights;
in float32 it reads the cache in place, in half precision it converts one layer's keys
and values to float32 per step. ``DJINN_EXACT_DECODE_ATTENTION=0`` leaves transformers'
attention as it is (faster on very long contexts, not reproducible on GPU).
"""
from __future__ import annotations

import os
import threading

import torch

#: device types whose single-query attention takes the math kernel
DEVICE_TYPES = {"cuda"}
_lock = threading.Lock()
_original = None


def single_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Attention of one query position, deterministic on every device.

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


def _exact_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                is_causal=None, **kwargs):
    if (query.shape[2] != 1 or query.device.type not in DEVICE_TYPES or dropout
            or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks", "head_mask"))
            or query.shape[1] % key.shape[1] != 0 or kwargs.get("output_attentions")):
        return _original(module, query, key, value, attention_mask, dropout=dropout,
                         scaling=scaling, is_causal=is_causal, **kwargs)
    return single_query_attention(query, key, value, attention_mask, scaling), None


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
