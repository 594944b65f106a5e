"""A fused RMSNorm for the decode engine's lane steps (kernel_server/runtime/scheduler.py):
one Triton program per row, so a row's bits do not depend on the other rows of the lane.

Why: a lane step runs 8 rows; the RMSNorm of Llama-like models in eager PyTorch ops is
about 8 kernels per norm (cast, pow, mean, add, rsqrt, multiply, cast, the weight's
broadcast multiply) times 2 norms per layer plus the final one, and over 8 rows the mean
reduction and the stride-0 broadcast multiply cost ~0.4 ms more per step than over one
row (H200, random Llama-7B bf16: bench/results/tenants_profile_cuda.json). One kernel per
norm does the same math: float32 x, mean of squares in a fixed order, rsqrt(var + eps),
rounded to the input dtype, times the weight (``triton_kernels.rms_norm_kernel``).

Where: ``install(model)`` wraps the ``forward`` of each norm module whose class's forward
is LlamaRMSNorm's, op for op (compared by its byte code: Llama/SmolLM2, Mistral, Qwen2,
Qwen3, Phi-3, Granite, ... in transformers 5; Gemma's (1 + weight) and OLMo-2's differ and
are left alone, as is GPT-2's LayerNorm). The wrapper runs the fused kernel only inside
``fused_norms()`` in the calling thread (a lane step: the captured graph and the eager
step outside the batch, so a row gets the same bits in or out of the batch) and only on
CUDA with Triton; everywhere else it calls the module's own forward, so every other pass
(engine off, prefill, analysis, another thread while a lane step is paused) computes what
it computed before. The norm's bits differ from PyTorch's (another summation order):
engine runs agree with engine-off runs to rounding, not bit for bit.
``$DJINN_LANE_FUSED_NORM=0`` (or ``FUSED = False``) turns it off: lane steps run
PyTorch's ops (a lane's CUDA graphs keep what they captured).
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref

import torch

from kernel_server.model import exact_attention

#: the fused norm serves lane steps ("0": PyTorch's ops, as everywhere else)
FUSED = os.environ.get("DJINN_LANE_FUSED_NORM", "1") != "0"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_state = threading.local()          # .on: inside fused_norms() in this thread
_lock = threading.Lock()
_installed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> norms wrapped


@contextlib.contextmanager
def fused_norms():
    """In this thread, inside the block: the wrapped norms of installed models run the
    fused kernel (where it applies)."""
    before = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def _code_key(fn) -> tuple:
    code = fn.__code__
    return code.co_code, code.co_consts, code.co_names, code.co_varnames


def _reference_key() -> tuple | None:
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return None
    return _code_key(LlamaRMSNorm.forward)


def same_math(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an RMSNorm whose forward is LlamaRMSNorm's (the same byte code,
    a 1-D weight, a float epsilon) and nothing else wraps its forward (accelerate)."""
    forward = getattr(type(module), "forward", None)
    weight = getattr(module, "weight", None)
    if (forward is None or not hasattr(forward, "__code__")
            or not isinstance(getattr(module, "variance_epsilon", None), float)
            or not isinstance(weight, torch.Tensor) or weight.dim() != 1
            or hasattr(module, "_hf_hook") or "forward" in vars(module)):
        return False
    ref = _reference_key()
    return ref is not None and _code_key(forward) == ref


def norm_config(n: int) -> dict:
    """The kernel's configuration for rows of ``n`` values: a function of ``n`` only."""
    block = min(1 << max(0, (n - 1).bit_length()), 8192)
    return {"BLOCK": block, "CHUNKS": -(-n // block),
            "num_warps": max(1, min(16, block // 512))}


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused kernel takes ``x`` (on CUDA with Triton; on CPU only under
    TRITON_INTERPRET=1, for tests)."""
    if not (x.dtype == weight.dtype and x.dtype in DTYPES and x.device == weight.device
            and x.shape[-1] == weight.shape[0] and weight.is_contiguous() and x.numel()):
        return False
    if x.device.type == "cuda":
        return exact_attention.triton_available()
    return os.environ.get("TRITON_INTERPRET") == "1" and exact_attention.triton_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's forward on ``x`` [..., n] by the fused kernel (``applies`` must hold):
    each row's bits depend on that row and ``weight`` only."""
    from kernel_server.model import triton_kernels
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    cfg = norm_config(n)
    triton_kernels.rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, rows.stride(0), out.stride(0), n, float(eps),
        BLOCK=cfg["BLOCK"], CHUNKS=cfg["CHUNKS"], num_warps=cfg["num_warps"])
    return out.view(x.shape)


def _wrap(module: torch.nn.Module):
    original = module.forward

    def forward(hidden_states):
        if FUSED and getattr(_state, "on", False) and applies(hidden_states, module.weight):
            return rms_norm(hidden_states, module.weight, module.variance_epsilon)
        return original(hidden_states)
    return forward


def install(model: torch.nn.Module) -> int:
    """Wrap the norms of ``model`` that ``same_math`` accepts (once per model; thread-safe).
    Outside ``fused_norms()`` a wrapped norm calls its own forward: the same numbers as
    before. Returns how many norms are wrapped."""
    with _lock:
        count = _installed.get(model)
        if count is None:
            # (the instance attribute is the one way to change what nn.Module.__call__ runs
            # for one module without touching its class; hooks still fire around it)
            norms = [m for m in model.modules() if same_math(m)]
            for m in norms:
                m.forward = _wrap(m)
            count = _installed[model] = len(norms)
    return count


def installed(model: torch.nn.Module) -> int | None:
    """How many norms of ``model`` ``install`` wrapped (None: never installed)."""
    with _lock:
        return _installed.get(model)
