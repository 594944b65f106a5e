"""Fast decode (static KV cache + CUDA graphs, steering inside the graph) vs eager decode,
both through the kernel server's generation executor (layer hooks installed), in one run:

- decode tokens/s, eager vs fast, with no rule and with one standing steering rule;
- exactness: the same tokens, the largest logit difference, fast vs eager;
- the cost of a capture (the first fast run of a rule signature);
- a plain in-process Hugging Face loop (no hooks) as a reference;
- where an eager step's time goes (torch.profiler: CPU ops, kernel launches, GPU time).

    python bench/fast_decode_bench.py --device cuda                 # GPT-2 124M, Llama 1B, 7B
    python bench/fast_decode_bench.py --smoke                       # tiny, CPU, static mode

With ``--peers`` (issue #16): one model at several contexts, in one run, ms per decode token -
the server's graph step (no rule, one standing rule, a standing expression inside the graph),
a step with a breakpoint (segmented graph replay, the client's time taken out), the eager
server, Hugging Face ``generate`` (fused SDPA) and nnsight 0.8 (``generate`` with a
``tracer.iter`` edit), each with and without a standing rule; the bit-for-bit relations
between them; the first checkpoint's dispatch at 4096 positions with the pinned pool sized
at load; a profile of the segmented step.

    python bench/fast_decode_bench.py --peers --device cuda          # random llama-7b bfloat16, 512/4k/8k
    python bench/fast_decode_bench.py --peers --smoke                # tiny, CPU, static mode
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_result  # noqa: E402

from kernel_server.model import exact_attention
from kernel_server.runtime import fast_decode  # noqa: E402
from kernel_server.runtime.generation import install_layer_hooks  # noqa: E402
from kernel_server.runtime.session_state import Session  # noqa: E402
from kernel_server.model.validation import Limits  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# random-init shapes (GPU timing does not depend on weight values); vocabulary: the tiny
# tokenizer's (49152), so that every generated id decodes
MODELS = {
    "gpt2-124m": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024)),
    "tiny-gpt2": ("gpt2", dict(n_layer=8, n_embd=64, n_head=4, n_positions=2048)),
    "tiny-llama": ("llama", dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=4, num_key_value_heads=2)),
    "llama-1b": ("llama", dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                               num_attention_heads=32, num_key_value_heads=8)),
    "llama-7b": ("llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                               num_attention_heads=32, num_key_value_heads=32)),
}
PROMPT = ("The history of the city begins with a small harbour on the river, where traders "
          "from the north and the south met every spring to exchange salt, wool and iron. ")


def build(name: str, device: str, dtype: str):
    """A LoadedModel around a seeded random-init model, built directly on ``device``."""
    import inspect
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from kernel_server.model.registry import LoadedModel, find_layers
    from kernel_server.model.loading import tiny_tokenizer
    tok = tiny_tokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    family, shape = MODELS[name]
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with torch.device(device):
            if family == "gpt2":
                model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), **shape))
            else:
                model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096,
                                                     **shape))
    finally:
        torch.set_default_dtype(before)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    model.requires_grad_(False)
    params = inspect.signature(model.forward).parameters
    exact_attention.install()         # as the server's load_model does
    loaded = LoadedModel(name=f"random-{name}", model=model, tokenizer=tok, layers=find_layers(model),
                         device=torch.device(device), dtype=DTYPES[dtype],
                         cache_kwarg="cache" if "cache" in params else "past_key_values")
    install_layer_hooks(loaded)
    return loaded


def prompt_ids(loaded, n: int) -> list:
    ids = loaded.tokenizer(PROMPT * 8, add_special_tokens=False)["input_ids"]
    return ids[:n]


def run_once(s: Session, ids, tokens: int, mode: str, return_logits=False) -> tuple[dict, float]:
    before = fast_decode.get_mode()
    fast_decode.set_mode(mode)
    try:
        t0 = time.perf_counter()
        ev = s.generate(list(ids), max_new_tokens=tokens, stop_at_eos=False, return_logits=return_logits)
        wall = time.perf_counter() - t0
    finally:
        fast_decode.set_mode(before)
    assert ev["event"] == "finished", ev
    return ev["result"], wall


def decode_stats(res: dict, wall: float) -> dict:
    fwd = [r["forward_ms"] for r in res["steps"][1:]]
    med = statistics.median(fwd)
    return {"decode_ms_per_token": med, "decode_tokens_per_s": 1e3 / med,
            "end_to_end_tokens_per_s": len(res["steps"]) / wall, "prefill_ms": res["steps"][0]["forward_ms"]}


def plain_hf_ms_per_token(loaded, ids, n: int) -> float:
    """A plain KV-cache greedy loop, no hooks dispatching anywhere (reference)."""
    from transformers import DynamicCache
    model, dev = loaded.model, loaded.device
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        x = torch.tensor([ids], device=dev)
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1,
                    **{loaded.cache_kwarg: cache})
        tok = out.logits[:, -1].argmax(-1)
        length = x.shape[1]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            length += 1
            out = model(input_ids=tok.view(1, 1), attention_mask=torch.ones((1, length), dtype=torch.long, device=dev),
                        use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: cache})
            tok = out.logits[:, -1].argmax(-1)
            int(tok)
        return (time.perf_counter() - t0) * 1e3 / (n - 1)


def exactness(fast: dict, ref: dict) -> dict:
    same = [a == b for a, b in zip(fast["tokens"], ref["tokens"])]
    first = same.index(False) if not all(same) else None
    k = len(same) if first is None else first + 1      # compare logits up to the first divergence
    diff = float(np.abs(fast["logits"][:k] - ref["logits"][:k]).max())
    return {"same_tokens": all(same), "first_divergent_step": first,
            "logits_max_abs_diff": diff, "logits_bit_identical": bool(np.array_equal(fast["logits"], ref["logits"]))}


def profile_eager_step(loaded, ids, steps: int = 5) -> dict:
    """torch.profiler over a few eager decode steps of the server's forward (hooks installed,
    none hot): CPU ops by self time, kernel launches and GPU kernel time per step."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache
    model, dev = loaded.model, loaded.device
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        x = torch.tensor([ids], device=dev)
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1,
                    **{loaded.cache_kwarg: cache})
        tok = out.logits[:, -1].argmax(-1)
        length = x.shape[1]

        def step():
            nonlocal tok, length
            length += 1
            o = model(input_ids=tok.view(1, 1), attention_mask=torch.ones((1, length), dtype=torch.long, device=dev),
                      use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: cache})
            tok = o.logits[:, -1].argmax(-1)
            int(tok)
        for _ in range(3):
            step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                         "cuLaunchKernel", "cuLaunchKernelEx"))
    # every kernel's time is the self device time of exactly one op
    gpu_us = sum(getattr(e, "self_device_time_total", 0.0) or 0.0 for e in events)
    top = sorted(((e.key, e.self_cpu_time_total / steps / 1e3, e.count / steps) for e in events),
                 key=lambda r: -r[1])[:12]
    return {"steps": steps, "wall_ms_per_step": wall_ms,
            "kernel_launches_per_step": launches / steps,
            "gpu_kernel_ms_per_step": gpu_us / steps / 1e3,
            "top_cpu_self_ms_per_step": [{"op": k, "ms": round(ms, 4), "calls": c} for k, ms, c in top],
            "table": table}


def graph_replay_ms(loaded, reps: int = 50) -> float | None:
    """The no-rule decode graph replayed alone (an idle slot; positions rewritten after):
    what a fast step costs on the GPU, without sampling, records and the host sync."""
    dec = loaded.fast_decoder
    slot = next((sl for sl in dec.slots if not sl.busy), None) if dec is not None else None
    entry = slot.graphs.get(()) if slot is not None else None
    if entry is None or entry.graph is None:
        return None
    with torch.inference_mode():
        slot.set_length(8)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            entry.graph.replay()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / reps
        slot.set_length(0)
    return ms


def bench_model(name: str, dtype: str, args) -> dict:
    t_build = time.perf_counter()
    loaded = build(name, args.device, dtype)
    build_s = time.perf_counter() - t_build
    fast_mode = "auto" if loaded.device.type == "cuda" else "static"
    tokens = args.tokens if name != "llama-7b" else min(args.tokens, 64)
    ids = prompt_ids(loaded, args.prompt_tokens)
    layer = loaded.num_layers // 2
    s = Session(loaded, Limits(), owner="bench")
    out = {"model": name, "dtype": dtype, "layers": loaded.num_layers, "hidden_size": loaded.hidden_size,
           "params_m": sum(p.numel() for p in loaded.model.parameters()) / 1e6,
           "prompt_tokens": len(ids), "new_tokens": tokens, "steer_layer": layer, "build_s": build_s,
           "fast_mode": fast_decode.effective_mode(loaded.device, fast_mode)}
    # warm-up, and the capture cost: the first fast run of a signature captures its graph
    run_once(s, ids, tokens, "off")
    _, first_wall = run_once(s, ids, tokens, fast_mode)
    _, second_wall = run_once(s, ids, tokens, fast_mode)
    out["first_fast_run_s"], out["second_fast_run_s"] = first_wall, second_wall
    s.steer(layer=layer, scale=0.9)
    run_once(s, ids, tokens, fast_mode)
    s.clear_steering()
    timings = {k: [] for k in ("eager", "fast", "eager_steered", "fast_steered")}
    for _ in range(args.reps):            # interleaved: drift hits all four alike
        for steered in (False, True):
            if steered:
                s.steer(layer=layer, scale=0.9)
            for mode, key in (("off", "eager"), (fast_mode, "fast")):
                res, wall = run_once(s, ids, tokens, mode)
                timings[key + ("_steered" if steered else "")].append(decode_stats(res, wall))
                if mode != "off":
                    assert s.run._fast.stats["graph_steps"] == tokens - 1, s.run._fast.stats
            s.clear_steering()
    for key, rows in timings.items():
        out[key] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["fast_vs_eager_decode"] = out["fast"]["decode_tokens_per_s"] / out["eager"]["decode_tokens_per_s"]
    out["fast_vs_eager_end_to_end"] = (out["fast"]["end_to_end_tokens_per_s"]
                                       / out["eager"]["end_to_end_tokens_per_s"])
    out["steered_fast_vs_eager_decode"] = (out["fast_steered"]["decode_tokens_per_s"]
                                           / out["eager_steered"]["decode_tokens_per_s"])
    out["fast_steered_vs_fast"] = (out["fast_steered"]["decode_tokens_per_s"]
                                   / out["fast"]["decode_tokens_per_s"])
    out["plain_hf_ms_per_token"] = statistics.median(
        plain_hf_ms_per_token(loaded, ids, tokens) for _ in range(max(1, args.reps)))
    # exactness: tokens and logits, without and with a steering rule
    ref, _ = run_once(s, ids, tokens, "off", return_logits=True)
    fast, _ = run_once(s, ids, tokens, fast_mode, return_logits=True)
    out["exactness"] = exactness(fast, ref)
    s.steer(layer=layer, scale=0.9)
    ref, _ = run_once(s, ids, tokens, "off", return_logits=True)
    fast, _ = run_once(s, ids, tokens, fast_mode, return_logits=True)
    out["exactness_steered"] = exactness(fast, ref)
    s.clear_steering()
    if fast_mode == "auto":
        # graph replay vs the same static-cache forward run eagerly (the breakpoint fallback)
        static, _ = run_once(s, ids, tokens, "static", return_logits=True)
        fast, _ = run_once(s, ids, tokens, fast_mode, return_logits=True)
        out["graph_vs_eager_static_cache"] = exactness(fast, static)
    dec = loaded.fast_decoder
    out["decoder_stats"] = dict(dec.stats) if dec is not None else None
    if fast_mode == "auto":
        out["graph_replay_ms"] = graph_replay_ms(loaded)
        out["gpu"] = torch.cuda.get_device_name(loaded.device)
    if args.profile and name == args.profile_model and not args.profiled:
        args.profiled = True
        out["profile_eager_step"] = profile_eager_step(loaded, ids)
    s.close()
    del s, loaded
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- peers at several contexts (--peers) -----------------------------------------------------
def _direction_ablation(width: int) -> dict:
    v = np.random.default_rng(0).standard_normal(width).astype(np.float32)
    v /= np.linalg.norm(v)
    H, c = {"op": "h"}, {"op": "const", "value": v}
    return {"op": "sub", "args": [H, {"op": "mul", "args": [{"op": "dot", "args": [H, c]}, c]}]}


def _decode_ms(res: dict) -> float:
    return statistics.median(r["forward_ms"] for r in res["steps"][1:])


def _bits(a: dict, b: dict) -> dict:
    la, lb = np.asarray(a["logits"]), np.asarray(b["logits"])
    eq = [bool(np.array_equal(x, y)) for x, y in zip(la, lb)]
    return {"bit_identical": all(eq), "first_differing_step": None if all(eq) else eq.index(False),
            "same_tokens": list(a["tokens"]) == list(b["tokens"]),
            "max_abs_logit_diff": float(np.abs(la - lb).max())}


def _hf_generate(loaded, ids, n: int, hook=None, reps: int = 2) -> tuple[float, dict]:
    """Hugging Face ``generate`` (greedy, n tokens whatever comes): ms per decode token as
    (time of n tokens - time of 1 token) / (n - 1), best of ``reps``; its tokens and logits."""
    x = torch.tensor([ids], device=loaded.device)
    handle = loaded.layers[hook[0]].register_forward_hook(hook[1]) if hook else None
    try:
        def once(k):
            _sync(loaded.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = loaded.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k,
                                            min_new_tokens=k, do_sample=False, output_logits=True,
                                            return_dict_in_generate=True, pad_token_id=0)
            _sync(loaded.device)
            return (time.perf_counter() - t0) * 1e3, out
        once(2)
        per = min((once(n)[0] - once(1)[0]) / (n - 1) for _ in range(reps))
        _, out = once(n)
    finally:
        if handle is not None:
            handle.remove()
    return per, {"tokens": out.sequences[0, x.shape[1]:].tolist(),
                 "logits": [t[0].float().cpu().numpy() for t in out.logits]}


def _scale_hook(scale: float):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * scale,) + tuple(output[1:])
        return output * scale
    return hook


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _nnsight_ms(loaded, ids, n: int, layer: int | None, scale: float, reps: int = 2) -> dict:
    """nnsight 0.8 around the model (wraps every module's forward for good: run last):
    ``generate`` with, when ``layer`` is given, the block's output scaled on every step."""
    import nnsight
    from nnsight.modeling.transformers import TransformersModel
    from kernel_server.model.layers import layers_path
    model = getattr(loaded, "_bench_nnsight", None)
    if model is None:
        model = TransformersModel(loaded.model, tokenizer=loaded.tokenizer, task="text-generation")
        loaded._bench_nnsight = model
    blocks = model
    for part in layers_path(loaded.model).split("."):
        blocks = getattr(blocks, part)
    x = torch.tensor([ids], device=loaded.device)

    def once(k):
        _sync(loaded.device)
        t0 = time.perf_counter()
        with model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, eos_token_id=None,
                            pad_token_id=0) as tracer:
            if layer is not None:
                block = blocks[layer]
                for _ in tracer.iter[:k]:          # prefill + k-1 decode steps
                    block.output = block.output * scale
            result = tracer.result.save()
        _sync(loaded.device)
        return (time.perf_counter() - t0) * 1e3, result
    once(2)
    per = min((once(n)[0] - once(1)[0]) / (n - 1) for _ in range(reps))
    _, result = once(n)
    return {"ms_per_token": per, "tokens": result[0, len(ids):].tolist(), "version": nnsight.__version__}


def _first_checkpoint(loaded, ids) -> dict:
    """The first checkpoint's dispatch at len(ids) positions: a store whose pinned pool has
    the configured 512 MiB (grows on demand) against one sized at load for the model's
    whole context (``CheckpointStore.prepare(loaded)``, what the server does)."""
    from kernel_server.checkpoints.store import CheckpointStore
    out = {"context": len(ids)}
    s = Session(loaded, Limits(max_prompt_tokens=16384), owner="bench")
    fast_decode.set_mode("off")
    s.generate(list(ids), max_new_tokens=1, stop_at_eos=False)
    for name, sized in (("pool_512mib", False), ("pool_sized_at_load", True)):
        store = CheckpointStore(4096 << 20, 512 << 20)
        t0 = time.perf_counter()
        store.prepare(loaded if sized else loaded.device)
        prepare_s = time.perf_counter() - t0
        dispatch = []
        for _ in range(4):
            _sync(loaded.device)
            ck = s.checkpoint(store)
            dispatch.append(ck.dispatch_ms)
            ck.wait()
            store.delete(ck.id, "bench")
        out[name] = {"prepare_s": prepare_s, "pool_mib": store.pinned_pool_bytes / 2**20,
                     "kv_mib": ck.kv_nbytes / 2**20, "first_dispatch_ms": dispatch[0],
                     "later_dispatch_ms": statistics.median(dispatch[1:])}
        store.arena = None
        del store
        gc.collect()
    s.close()
    return out


def _profile_segmented(s: Session, ids, layer: int, n: int = 6) -> str:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        _paused_run(s, ids, n, layer)
    # the run's forward passes are in its worker thread: the CPU side is not traced there,
    # the GPU's kernels are (graph replays included)
    return prof.key_averages().table(sort_by="self_device_time_total" if len(acts) > 1 else
                                     "self_cpu_time_total", row_limit=16, max_name_column_width=40)


def replay_only_ms(loaded, reps: int = 30) -> dict | None:
    """The whole-step graph and the per-layer segments replayed alone on an idle slot (no
    hand-over, no pause; positions rewritten after): the cost of the segmentation itself."""
    dec = loaded.fast_decoder
    slot = next((sl for sl in dec.slots if not sl.busy and sl.segments is not None
                 and sl.graphs.get(()) is not None), None) if dec is not None else None
    if slot is None or slot.graphs[()].graph is None:
        return None
    out = {}
    with torch.inference_mode():
        for name, graphs in (("graph", [slot.graphs[()].graph]), ("segments", slot.segments.graphs)):
            slot.set_length(8)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                for g in graphs:
                    g.replay()
            torch.cuda.synchronize()
            out[f"{name}_replay_ms"] = (time.perf_counter() - t0) * 1e3 / reps
        slot.set_length(0)
    out["segments"] = len(slot.segments.graphs)
    return out


def _paused_run(s: Session, ids, n: int, layer: int) -> tuple[dict, float]:
    """A breakpoint at ``layer`` on every decode step, resumed at once with no edit."""
    s.clear_breakpoints()
    s.set_breakpoint(layer=layer, phase="decode")
    ev = s.generate(list(ids), max_new_tokens=n, stop_at_eos=False, return_logits=True)
    pauses = []
    while ev["event"] == "paused":
        pauses.append(time.perf_counter())
        ev = s.resume().result(timeout=600)
    s.clear_breakpoints()
    assert ev["event"] == "finished" and len(pauses) == n - 1, (ev.get("event"), len(pauses))
    # pause to pause: one whole decode step as this in-process client sees it (its resume included)
    cycle = statistics.median(b - a for a, b in zip(pauses, pauses[1:])) if len(pauses) > 1 else 0.0
    return ev["result"], cycle


def peers_bench(args) -> dict:
    from common import random_llama
    shape, dtype = args.peer_model.split(":")
    cuda = args.device == "cuda"
    contexts = [int(c) for c in args.contexts.split(",")]
    n = args.tokens
    loaded = random_llama(shape, args.device, dtype, max_positions=max(contexts) + n + 64)
    install_layer_hooks(loaded)
    fast = "auto" if cuda else "static"
    bp_layer = min(6, loaded.num_layers - 1)
    rule_layer = loaded.num_layers // 2
    ablate = _direction_ablation(loaded.hidden_size)
    gen = torch.Generator().manual_seed(0)
    result = {"model": f"random:{shape}", "dtype": dtype, "layers": loaded.num_layers,
              "new_tokens": n, "breakpoint_layer": bp_layer, "rule_layer": rule_layer,
              "rule": "scale 0.9", "expression": "h - dot(h, v) * v (direction ablation, v unit)",
              "fast_mode": fast_decode.effective_mode(loaded.device, fast), "rows": []}
    prompts = {ctx: torch.randint(0, loaded.vocab_size, (ctx,), generator=gen).tolist() for ctx in contexts}
    for ctx in contexts:
        ids = prompts[ctx]
        row = {"context": ctx, "bucket": fast_decode._bucket(ctx + n)}
        s = Session(loaded, Limits(max_prompt_tokens=16384), owner="bench")
        fast_decode.set_mode(fast)

        def run(**steer):
            s.clear_steering()
            if steer:
                s.steer(layer=rule_layer, **steer)
            generate_once = lambda: s.generate(list(ids), max_new_tokens=n, stop_at_eos=False,  # noqa: E731
                                               return_logits=True)
            generate_once()                      # warm-up (captures)
            ev = generate_once()
            assert ev["event"] == "finished", ev
            return ev["result"], dict(s.run._fast.stats) if s.run._fast is not None else {}
        graph, st = run()
        assert st.get("graph_steps", 0) == n - 1 or not cuda, st
        row["graph_ms"] = _decode_ms(graph)
        ruled, _ = run(scale=0.9)
        row["graph_rule_ms"] = _decode_ms(ruled)
        expr, st = run(edit=ablate)
        row["graph_expression_ms"] = _decode_ms(expr)
        row["expression_in_graph"] = st.get("graph_steps") == n - 1
        hooked, st = run(edit=ablate, steps=list(range(n)))        # the same, by the run's hooks
        row["segmented_expression_ms"] = _decode_ms(hooked)
        row["expression_graph_vs_hooks"] = _bits(expr, hooked)
        s.clear_steering()
        _paused_run(s, ids, n, bp_layer)                            # warm-up (segment capture)
        paused, cycle = _paused_run(s, ids, n, bp_layer)
        row["breakpoint_step_ms"] = _decode_ms(paused)              # the client's time taken out
        row["pause_to_pause_ms"] = cycle * 1e3                      # with an in-process client
        row["breakpoint_vs_graph"] = row["breakpoint_step_ms"] / row["graph_ms"]
        row["breakpoint_vs_no_breakpoint"] = _bits(paused, graph)
        row["segmented_stats"] = {k: v for k, v in s.run._fast.stats.items()} if s.run._fast else {}
        if ctx == contexts[0]:
            result["segmented_profile"] = _profile_segmented(s, ids, bp_layer)
        if cuda:
            row["replay_only"] = replay_only_ms(loaded)
        fast_decode.set_mode("off")
        eager = s.generate(list(ids), max_new_tokens=n, stop_at_eos=False, return_logits=True)["result"]
        row["eager_ms"] = _decode_ms(eager)
        row["graph_vs_eager"] = _bits(graph, eager)
        fast_decode.set_mode(fast)
        s.close()
        # Hugging Face generate: with the server's exact decode attention (process-wide), then
        # with PyTorch's fused SDPA (the peer's own speed)
        _, hf_exact = _hf_generate(loaded, ids, n, reps=1)
        row["graph_vs_hf_generate_exact_attention"] = _bits(graph, hf_exact)
        exact_attention.set_kernel("sdpa")
        try:
            row["hf_generate_sdpa_ms"], hf = _hf_generate(loaded, ids, n)
            row["hf_generate_sdpa_rule_ms"], _ = _hf_generate(loaded, ids, n, (rule_layer, _scale_hook(0.9)))
        finally:
            exact_attention.set_kernel(None)
        row["graph_vs_hf_generate_sdpa"] = _bits(graph, hf)
        result["rows"].append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
               if not isinstance(v, dict)}, flush=True)
        if cuda:
            torch.cuda.empty_cache()
    ck_ctx = 4096 if max(contexts) >= 4096 else contexts[-1]
    ck_ids = torch.randint(0, loaded.vocab_size, (ck_ctx,), generator=gen).tolist()
    result["first_checkpoint"] = _first_checkpoint(loaded, ck_ids)
    print(result["first_checkpoint"], flush=True)
    # nnsight last: wrapping replaces every module's forward for good
    try:
        exact_attention.set_kernel("sdpa")
        for row in result["rows"]:
            ids = prompts[row["context"]]
            plain = _nnsight_ms(loaded, ids, n, None, 1.0)
            ruled = _nnsight_ms(loaded, ids, n, rule_layer, 0.9)
            row["nnsight_ms"], row["nnsight_rule_ms"] = plain["ms_per_token"], ruled["ms_per_token"]
            result["nnsight"] = plain["version"]
            print({"context": row["context"], "nnsight_ms": row["nnsight_ms"],
                   "nnsight_rule_ms": row["nnsight_rule_ms"]}, flush=True)
    except Exception as exc:       # the peer missing or failing must not lose the other numbers
        import traceback
        result["nnsight_error"] = f"{type(exc).__name__}: {exc}"
        result["nnsight_traceback"] = traceback.format_exc()[-2000:]
    finally:
        exact_attention.set_kernel(None)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="gpt2-124m:float32,gpt2-124m:float16,llama-1b:bfloat16,"
                                        "llama-7b:bfloat16")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip models once this much time has passed")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile-model", default="gpt2-124m")
    p.add_argument("--out", default=None, help="also write the JSON (and the profile text) here")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--peers", action="store_true", help="the context sweep with the peers (#16)")
    p.add_argument("--peer-model", default="llama-7b:bfloat16", help="random shape:dtype for --peers")
    p.add_argument("--contexts", default="512,4000,8000", help="prompt lengths for --peers")
    args = p.parse_args(argv)
    args.profiled = False
    if args.peers:
        if args.smoke:
            args.device, args.peer_model, args.contexts, args.tokens = "cpu", "tiny-llama:float32", "16,40", 6
        elif args.tokens == p.get_default("tokens"):
            args.tokens = 32
        t0 = time.perf_counter()
        result = {"benchmark": "fast_decode_peers", "device": args.device,
                  "env": environment(args.device),
                  "command": " ".join(["python", "bench/fast_decode_bench.py"] + sys.argv[1:]),
                  **peers_bench(args)}
        result["elapsed_s"] = time.perf_counter() - t0
        tag = f"fast_decode_peers_{torch.device(args.device).type}"
        if not args.smoke:
            print("wrote", write_result(tag, result))
        if args.out:
            write_result(tag, result, Path(args.out))
        return 0
    if args.smoke:
        args.device, args.models, args.tokens, args.prompt_tokens, args.reps = \
            "cpu", "tiny-gpt2:float32,tiny-llama:float32", 6, 8, 1
        args.profile_model = "tiny-gpt2"
    t0 = time.perf_counter()
    result = {"benchmark": "fast_decode", "device": args.device, "env": environment(args.device),
              "command": " ".join(["python", "bench/fast_decode_bench.py"] + sys.argv[1:]),
              "max_slots": fast_decode.MAX_SLOTS, "models": [], "skipped": []}
    for spec in args.models.split(","):
        name, dtype = spec.split(":")
        if time.perf_counter() - t0 > args.budget_s:
            result["skipped"].append({"model": name, "dtype": dtype, "why": "time budget"})
            continue
        try:
            row = bench_model(name, dtype, args)
        except Exception as exc:       # one model failing must not lose the others' numbers
            import traceback
            row = {"model": name, "dtype": dtype, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-3000:]}
            if args.device == "cuda":
                torch.cuda.empty_cache()
        result["models"].append(row)
        brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("model", "dtype", "fast_vs_eager_decode", "fast_vs_eager_end_to_end",
                          "steered_fast_vs_eager_decode", "graph_replay_ms", "error")}
        for k in ("eager", "fast", "exactness", "exactness_steered"):
            if k in row:
                brief[k] = {a: (round(b, 4) if isinstance(b, float) else b) for a, b in row[k].items()}
        print(brief, flush=True)
    result["elapsed_s"] = time.perf_counter() - t0
    tag = f"fast_decode_{torch.device(args.device).type}"
    if not args.smoke:
        print("wrote", write_result(tag, result))
    if args.out:
        out = Path(args.out)
        write_result(tag, result, out)
        for row in result["models"]:
            prof = row.get("profile_eager_step")
            if prof:
                (out / "fast_decode_profile.txt").write_text(
                    f"torch.profiler, {args.device} ({result['env'].get('gpu', '')}), {row['model']} "
                    f"{row['dtype']}: {prof['steps']} eager decode steps through the server's forward "
                    f"(layer hooks installed, none hot)\n"
                    f"wall {prof['wall_ms_per_step']:.3f} ms/step, GPU kernels "
                    f"{prof['gpu_kernel_ms_per_step']:.3f} ms/step, "
                    f"{prof['kernel_launches_per_step']:.0f} kernel launches/step\n\n" + prof["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
