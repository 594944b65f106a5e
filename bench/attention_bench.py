"""Decode attention kernels side by side, in one run (kernel_server/model/exact_attention.py):

- ``triton``: the deterministic split-KV kernel (the default on CUDA where Triton imports);
- ``math``: the float32 math kernel over the whole static cache (the former default);
- ``sdpa``: PyTorch's fused SDPA, not reproducible on GPU (the speed to match).

For each context (512 / 4k / 8k positions) and kernel: the server's decode step (fast
decode: static cache + CUDA graphs, ms per token, median of the server's forward time),
the eager server step, exactness (graphs vs eager, repeated run, Hugging Face ``generate``
in the same process), and the attention op alone per layer (``triton.testing.do_bench``).

    python bench/attention_bench.py --device cuda                  # random:llama-7b bfloat16
    python bench/attention_bench.py --model random:llama-1b --contexts 512
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, environment, write_result  # noqa: E402

from kernel_server.model import exact_attention  # noqa: E402
from kernel_server.model.registry import load_model  # noqa: E402
from kernel_server.model.validation import Limits  # noqa: E402
from kernel_server.runtime import fast_decode  # noqa: E402
from kernel_server.runtime.generation import install_layer_hooks  # noqa: E402
from kernel_server.runtime.session_state import Session  # noqa: E402


def fresh_slots(loaded) -> None:
    """Drop the model's slots and graphs: a kernel switch needs new captures."""
    dec = loaded.fast_decoder
    if dec is not None:
        for slot in dec.slots:
            slot.drop()
    loaded.fast_decoder = None
    torch.cuda.empty_cache()


def generate(loaded, ids, tokens: int, mode: str, rule: bool = False) -> dict:
    fast_decode.set_mode(mode)
    s = Session(loaded, Limits(max_prompt_tokens=16384), owner="bench")
    if rule:
        s.steer(layer=loaded.num_layers // 2, scale=0.9)
    ev = s.generate(list(ids), max_new_tokens=tokens, stop_at_eos=False, return_logits=True)
    assert ev["event"] == "finished", ev
    res = ev["result"]
    res["ms_per_token"] = statistics.median(r["forward_ms"] for r in res["steps"][1:])
    if s.run._fast is not None:
        res["fast_stats"] = {k: s.run._fast.stats[k] for k in ("graph_steps", "eager_steps")}
    return res


def same_bits(a: dict, b: dict) -> dict:
    eq = [bool(np.array_equal(x, y)) for x, y in zip(a["logits"], b["logits"])]
    return {"bit_identical": all(eq), "first_differing_step": None if all(eq) else eq.index(False),
            "same_tokens": a["tokens"] == b["tokens"],
            "max_abs_logit_diff": float(np.abs(np.asarray(a["logits"]) - np.asarray(b["logits"])).max())}


def hf_generate(loaded, ids, tokens: int) -> dict:
    x = torch.tensor([ids], device=loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=0)
    return {"tokens": out.sequences[0, x.shape[1]:].tolist(),
            "logits": [t[0].float().cpu().numpy() for t in out.logits]}


def attention_op_us(loaded, context: int) -> dict:
    """One layer's decode attention alone (its shape, the static bucket the server uses)."""
    import triton.testing
    cfg = loaded.model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads
    bucket = fast_decode._bucket(context + 32)
    dev, dt = loaded.device, loaded.dtype
    q = torch.randn(1, heads, 1, dim, device=dev, dtype=dt)
    k = torch.randn(1, kv_heads, bucket, dim, device=dev, dtype=dt)
    v = torch.randn(1, kv_heads, bucket, dim, device=dev, dtype=dt)
    mask = (torch.arange(bucket, device=dev) < context).view(1, 1, 1, bucket)
    sc = dim ** -0.5
    fns = {
        "triton": lambda: exact_attention.fused_single_query_attention(q, k, v, mask, sc),
        "math": lambda: exact_attention.single_query_attention(q, k, v, mask, sc),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sc),
        "sdpa_exact_length": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k[:, :, :context], v[:, :, :context], scale=sc),
    }
    for fn in fns.values():
        fn()                                          # compile outside the capture
    out = {name: triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3 for name, fn in fns.items()}
    kv_bytes = 2 * kv_heads * context * dim * k.element_size()
    out["triton_GBps"] = kv_bytes / (out["triton"] * 1e-6) / 1e9
    out["bucket"] = bucket
    return out


def profile_graph_step(loaded, ids, kernel: str) -> str:
    """Kernel time of a few graph decode steps (torch.profiler, CUDA time table)."""
    from torch.profiler import ProfilerActivity, profile
    exact_attention.set_kernel(kernel)
    fresh_slots(loaded)
    generate(loaded, ids, 4, "auto")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(loaded, ids, 8, "auto")
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="random:llama-7b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--contexts", default="512,4000,4096,8064")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--hf-contexts", default="512,4000", help="contexts that also run HF generate")
    p.add_argument("--profile-context", type=int, default=8064)
    p.add_argument("--out", default=None, help="also write the JSON and profile text here")
    args = p.parse_args(argv)
    loaded = load_model(args.model, args.device, args.dtype, progress=False)
    install_layer_hooks(loaded)
    kernels = ["triton", "math", "sdpa"] if exact_attention.triton_available() else ["math", "sdpa"]
    gen = torch.Generator().manual_seed(0)
    result = {"command": command_line(), "environment": environment(loaded.device),
              "model": args.model, "dtype": args.dtype, "tokens": args.tokens,
              "kv_splits": exact_attention.KV_SPLITS, "contexts": {}}
    t_start = time.perf_counter()
    for context in [int(c) for c in args.contexts.split(",")]:
        ids = torch.randint(0, loaded.vocab_size, (context,), generator=gen).tolist()
        row = {"bucket": fast_decode._bucket(context + args.tokens), "kernels": {}}
        for kernel in kernels:
            exact_attention.set_kernel(kernel)
            fresh_slots(loaded)
            generate(loaded, ids, 4, "auto")                         # capture
            graph = generate(loaded, ids, args.tokens, "auto")
            again = generate(loaded, ids, args.tokens, "auto")
            ruled = generate(loaded, ids, args.tokens, "auto", rule=True)
            eager = generate(loaded, ids, args.tokens, "off")
            k = {"graph_ms_per_token": graph["ms_per_token"],
                 "graph_with_rule_ms_per_token": ruled["ms_per_token"],
                 "eager_ms_per_token": eager["ms_per_token"], "graph_stats": graph.get("fast_stats"),
                 "repeated_vs_first": same_bits(graph, again), "graph_vs_eager": same_bits(graph, eager)}
            if str(context) in args.hf_contexts.split(","):
                k["hf_generate_vs_eager"] = same_bits(hf_generate(loaded, ids, args.tokens), eager)
            row["kernels"][kernel] = k
            print(context, kernel, {x: k[x] for x in ("graph_ms_per_token", "eager_ms_per_token")},
                  "graph=eager" if k["graph_vs_eager"]["bit_identical"] else "graph!=eager", flush=True)
        if "triton" in kernels:
            row["attention_op_us_per_layer"] = attention_op_us(loaded, context)
            base = row["kernels"]["sdpa"]["graph_ms_per_token"]
            row["triton_vs_sdpa_graph_ratio"] = row["kernels"]["triton"]["graph_ms_per_token"] / base
            row["math_vs_sdpa_graph_ratio"] = row["kernels"]["math"]["graph_ms_per_token"] / base
            print(context, "ratio triton/sdpa", round(row["triton_vs_sdpa_graph_ratio"], 3),
                  row["attention_op_us_per_layer"], flush=True)
        result["contexts"][str(context)] = row
    result["wall_s"] = time.perf_counter() - t_start
    profiles = {}
    if args.profile_context and "triton" in kernels:
        ids = torch.randint(0, loaded.vocab_size, (args.profile_context,), generator=gen).tolist()
        for kernel in ("triton", "sdpa"):
            profiles[kernel] = profile_graph_step(loaded, ids, kernel)
    exact_attention.set_kernel(None)
    name = f"attention_{args.model.replace(':', '_').replace('/', '_')}_{args.dtype}"
    path = write_result(name, result)
    print("wrote", path)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_result(name, result, out)
        (out / f"{name}_profile.txt").write_text(
            "\n\n".join(f"== {k} ==\n{v}" for k, v in profiles.items()))
    for k, v in profiles.items():
        print(f"== profile {k} (context {args.profile_context}) ==\n{v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
