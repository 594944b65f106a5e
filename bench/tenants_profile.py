"""Where a solo session's time goes on the decode engine (issue #15): one process, the model
loaded once, no connection in the way.

- intrinsic: the GPU time of one decode step as the 8-row lane graph replay (one row in use,
  the rest padding; and all 8 rows in use) against the 1-row fast-decode graph replay of the
  same rule (each replayed back to back, then one sync: pure device time per step);
- kernels: the CUDA kernels of one *eager* step of each shape (torch.profiler), summed by
  name: which kernels the 8-row step adds or makes slower (and the lane's step with its
  norms by PyTorch's ops instead of the fused kernel of kernel_server/model/lane_kernels.py);
- engine vs off: the same greedy run with the engine off and on, tokens and logits compared
  (not claimed equal: another shape of step);
- the decode loop: generation runs driven in this process, engine on and off, the same
  prompt and rule; per-step interval (between consecutive samplings), and on the engine the
  per-step hand-offs measured by timestamps when every step goes through the loop thread
  (worker -> loop thread, the loop's step in Python); a session alone runs
  its step in its own worker (the default) and pays none of them.

    python -m bench.tenants_profile --device cuda --model random:llama-7b --dtype bfloat16
    python -m bench.tenants_profile --smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, environment, load_local, sync, write_result, RESULTS, smoke_dir  # noqa: E402

PROMPT = "The capital of France is"


def _run(loaded, mode: str, tokens: int, layer: int, logits: bool = False):
    from kernel_server.model.interventions import EditOp, Interventions, SteeringRule
    from kernel_server.runtime import scheduler
    from kernel_server.runtime.generation import GenerationConfig, GenerationRun, GenState
    scheduler.set_mode(mode)
    ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    cfg = GenerationConfig(max_new_tokens=tokens, stop_at_eos=False, return_logits=logits)
    rules = [SteeringRule(layer, EditOp("scale", scale=0.9), id=1)]
    run = GenerationRun(loaded, GenState.fresh(ids, cfg), Interventions([], rules))
    picks: list = []
    pick = run._pick

    def timed_pick(logits):
        picks.append(time.perf_counter())
        return pick(logits)
    run._pick = timed_pick
    ev = run.start()
    assert ev["event"] == "finished", ev
    intervals = [(b - a) * 1e3 for a, b in zip(picks[1:], picks[2:])]   # decode steps only
    return run, intervals


def _replay_ms(graph, reps: int, device, rewind=lambda: None) -> tuple[float, float]:
    """(device ms per replay back to back, ms per replay + sync); ``rewind`` (untimed) puts
    the cache length back before each series (a static cache advances on every replay)."""
    rewind()
    for _ in range(5):
        graph.replay()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    sync(device)
    pipelined = (time.perf_counter() - t0) * 1e3 / reps
    rewind()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        graph.replay()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return pipelined, statistics.median(samples)


def _kernels(fn, steps: int) -> dict:
    """CUDA kernel time per step of ``fn`` (eager), by kernel name (us), and kernel count."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    by: dict = {}
    count = 0
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        count += 1
        by[e.name] = by.get(e.name, 0.0) + e.device_time / steps
    return {"total_us": sum(by.values()), "kernels_per_step": count / steps, "by_name_us": by}


def _lane_all_rows(lane, length: int) -> None:
    """All rows of ``lane`` in use at ``length`` positions (timing only: row 0's values)."""
    inputs = lane.inputs
    row0 = inputs[:, 0].clone()
    for r in range(lane.rows):
        inputs[:, r] = row0
    inputs[1:3, :] = length
    inputs[3, :] = 0


@torch.inference_mode()           # (the caches hold inference tensors)
def _device_side(loaded, sched, args, out: dict) -> None:
    """The graphs alone and the kernels of one eager step of each shape (CUDA)."""
    slot = next(s for s in loaded.fast_decoder.slots if s.graphs)
    one = next(g for g in slot.graphs.values() if g.graph is not None)
    lane = next(l for l in sched.lanes if l.program is not None)
    eight = lane.programs[lane.program]
    length = len(loaded.tokenizer(PROMPT)["input_ids"])
    assert length + args.reps + 5 < slot.max_len, "fewer --reps: the slot would overflow"
    lane.inputs.copy_(lane.step_inputs({0: (1, length)}).to(lane.inputs.device))
    g1 = _replay_ms(one.graph, args.reps, args.device, lambda: slot.set_length(length))
    g8 = _replay_ms(eight.graph, args.reps, args.device)
    _lane_all_rows(lane, length)
    g8_full = _replay_ms(eight.graph, args.reps, args.device)
    out["graph_ms"] = {"fast_1row": {"pipelined": g1[0], "with_sync": g1[1]},
                       "lane_8rows_1_used": {"pipelined": g8[0], "with_sync": g8[1]},
                       "lane_8rows_8_used": {"pipelined": g8_full[0], "with_sync": g8_full[1]}}
    out["intrinsic_lane_over_fast"] = g8[0] / g1[0]
    print("graphs", out["graph_ms"], flush=True)

    # ---- kernels of one eager step of each shape ----------------------------------
    def fast_step():
        slot.set_length(length)
        with loaded.hooks.active(one.buffers.proxy):
            loaded.model(input_ids=slot.ids, attention_mask=slot.mask, use_cache=True,
                         logits_to_keep=1, **{loaded.cache_kwarg: slot.cache})

    lane.inputs.copy_(lane.step_inputs({0: (1, length)}).to(lane.inputs.device))

    def lane_step():
        lane.forward(lane.inputs, eight.buffers.proxy)
    k1, k8 = _kernels(fast_step, 5), _kernels(lane_step, 5)
    from kernel_server.model import lane_kernels
    lane_kernels.FUSED = False            # the lane's norms by PyTorch's ops, for comparison
    try:
        k8_torch_norm = _kernels(lane_step, 5)
    finally:
        lane_kernels.FUSED = True
    names = set(k1["by_name_us"]) | set(k8["by_name_us"])
    diff = sorted(((k8["by_name_us"].get(n, 0.0) - k1["by_name_us"].get(n, 0.0), n) for n in names),
                  reverse=True)
    out["eager_kernels"] = {
        "fast_1row": {"total_us": k1["total_us"], "kernels_per_step": k1["kernels_per_step"]},
        "lane_8rows": {"total_us": k8["total_us"], "kernels_per_step": k8["kernels_per_step"]},
        "lane_8rows_pytorch_norm": {"total_us": k8_torch_norm["total_us"],
                                    "kernels_per_step": k8_torch_norm["kernels_per_step"]},
        "largest_differences_us": [{"kernel": n[:160], "lane_minus_fast_us": d,
                                    "fast_us": k1["by_name_us"].get(n, 0.0),
                                    "lane_us": k8["by_name_us"].get(n, 0.0)}
                                   for d, n in diff[:12] + diff[-6:]]}
    print("kernels", json.dumps(out["eager_kernels"], indent=1), flush=True)


def _engine_vs_off(loaded, args, out: dict) -> None:
    """The same run (prompt, rule, greedy) engine off and on: tokens equal up to which step,
    and the largest logit difference up to the first differing token (the contexts differ
    after it). Not claimed bit-equal: the lane's step is another shape (8-row matmuls, the
    fused norm); the engine's claim is solo == beside others."""
    import numpy as np
    off, _ = _run(loaded, "off", args.tokens, args.layer, logits=True)
    on, _ = _run(loaded, "on", args.tokens, args.layer, logits=True)
    a, b = off.tokens, on.tokens
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    la, lb = np.stack(off.logits).astype(np.float64), np.stack(on.logits).astype(np.float64)
    prompt = len(a) - len(la)
    upto = len(la) if first is None else max(1, first - prompt + 1)
    out["engine_vs_off"] = {"new_tokens": len(la), "tokens_equal": a == b,
                            "first_differing_new_token": None if first is None else first - prompt,
                            "logits_bit_equal": bool(np.array_equal(la, lb)),
                            "max_abs_logit_diff_until_first_difference": float(np.abs(la[:upto] - lb[:upto]).max()),
                            "first_step_max_abs_logit_diff": float(np.abs(la[0] - lb[0]).max())}
    print("engine vs off", out["engine_vs_off"], flush=True)


def _prefill(loaded, args, out: dict) -> None:
    """A ``--prefill-tokens`` prompt prefilled alone on the engine, in one forward
    (``PREFILL_CHUNK`` 0) and in chunks (the default): wall ms of the prefill step and of each
    model forward (synchronised around it)."""
    from kernel_server.model.interventions import EditOp, Interventions, SteeringRule
    from kernel_server.runtime import scheduler
    from kernel_server.runtime.generation import GenerationConfig, GenerationRun, GenState
    scheduler.set_mode("on")
    ids = torch.randint(100, 1000, (args.prefill_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    forwards: list = []
    model = loaded.model

    def pre(module, a, kw):
        sync(args.device)
        forwards.append([time.perf_counter(), kw["input_ids"].shape[1]])

    def post(module, a, kw, result):
        sync(args.device)
        forwards[-1][0] = (time.perf_counter() - forwards[-1][0]) * 1e3
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    chunk = scheduler.PREFILL_CHUNK
    res: dict = {}
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        # (the same twice: the second shows what a warm worker thread pays; then cuDNN's SDPA
        # off, process-wide, to see whether the masked chunks' attention backend is the cost)
        for i, size in enumerate((0, chunk, 0, chunk, chunk, 0)):
            if i == 4:
                torch.backends.cuda.enable_cudnn_sdp(False)
            scheduler.PREFILL_CHUNK = size
            forwards.clear()
            cfg = GenerationConfig(max_new_tokens=1, stop_at_eos=False)
            run = GenerationRun(loaded, GenState.fresh(ids, cfg),
                                Interventions([], [SteeringRule(args.layer, EditOp("scale", scale=0.9), id=1)]))
            ev = run.start()
            assert ev["event"] == "finished", ev
            res[f"{i}_chunk_{size}" + ("_no_cudnn_sdp" if i >= 4 else "")] = {"prefill_step_ms": run.records[0]["forward_ms"],
                                    "forwards": [{"tokens": n, "ms": ms} for ms, n in forwards]}
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        scheduler.PREFILL_CHUNK = chunk
        for h in handles:
            h.remove()
    out["prefill"] = {"prompt_tokens": args.prefill_tokens, **res}
    print("prefill", out["prefill"], flush=True)


def _stall(loaded, args, out: dict) -> None:
    """A session decoding while another one's ``--stall-tokens`` prompt is prefilled, in one
    forward (``PREFILL_CHUNK`` 0) and in chunks (the default), each twice (the first pair
    pays first-use costs): the running session's step intervals (median, max) and the
    joiner's prefill."""
    import threading
    from kernel_server.runtime import scheduler
    from kernel_server.runtime.generation import GenerationConfig, GenerationRun, GenState
    from kernel_server.model.interventions import Interventions
    scheduler.set_mode("on")
    long_ids = torch.randint(100, 1000, (args.stall_tokens,),
                             generator=torch.Generator().manual_seed(1)).tolist()
    short = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    chunk = scheduler.PREFILL_CHUNK
    res: dict = {}
    try:
        for i, size in enumerate((0, chunk, 0, chunk)):
            scheduler.PREFILL_CHUNK = size
            a = GenerationRun(loaded, GenState.fresh(short, GenerationConfig(max_new_tokens=160, stop_at_eos=False)),
                              Interventions())
            picks: list = []
            started = threading.Event()
            pick = a._pick

            def timed(logits, pick=pick, picks=picks, started=started):
                picks.append(time.perf_counter())
                if len(picks) >= 8:
                    started.set()
                return pick(logits)
            a._pick = timed
            t = threading.Thread(target=a.start)
            t.start()
            assert started.wait(timeout=120)
            b = GenerationRun(loaded, GenState.fresh(long_ids, GenerationConfig(max_new_tokens=1, stop_at_eos=False)),
                              Interventions())
            assert b.start()["event"] == "finished"
            t.join(timeout=600)
            steps = [(y - x) * 1e3 for x, y in zip(picks[1:], picks[2:])]
            med = statistics.median(steps)
            res[f"{i}_chunk_{size}"] = {"running_step_median_ms": med, "running_step_max_ms": max(steps),
                                        "stall_ms": max(steps) - med,
                                        "joiner_prefill_ms": b.records[0]["forward_ms"]}
    finally:
        scheduler.PREFILL_CHUNK = chunk
    out["stall"] = {"joiner_prompt_tokens": args.stall_tokens, **res}
    print("stall", out["stall"], flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--layer", type=int, default=16)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None)
    p.add_argument("--prefill-tokens", type=int, default=900)
    p.add_argument("--stall-tokens", type=int, default=3000)
    p.add_argument("--only-prefill", action="store_true", help="only the prefill and stall timings")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.dtype, args.tokens, args.layer, args.reps = (
            "tiny-gpt2", "cpu", "float32", 12, 2, 5)
        args.prefill_tokens, args.stall_tokens = 300, 300
    from kernel_server.runtime import scheduler
    from kernel_server.runtime.generation import install_layer_hooks
    loaded = load_local(args.model, args.device, args.dtype)
    install_layer_hooks(loaded)
    cuda = torch.device(args.device).type == "cuda"
    out: dict = {"benchmark": "tenants_profile", "command": command_line(), "model": args.model,
                 "device": args.device, "dtype": args.dtype, "tokens": args.tokens,
                 "rule": f"scale=0.9 at layer {args.layer}", "env": environment(args.device)}

    _prefill(loaded, args, out)
    _stall(loaded, args, out)
    if args.only_prefill:
        print("wrote", write_result(args.name or "tenants_profile_prefill", out,
                                    smoke_dir() if args.smoke else Path(args.out)))
        return 0
    # ---- the decode loop, engine off and on, alternating (after a warm-up of each) -------
    for mode in ("off", "on"):
        _run(loaded, mode, 8, args.layer)
    sched = loaded.decode_scheduler
    stamps: dict = {"submit_end": [], "loop_start": [], "step_end": []}
    from kernel_server.runtime.scheduler import DecodeScheduler
    orig_submit, orig_batch = DecodeScheduler.submit, DecodeScheduler._run_batch

    def submit(self, members):
        orig_submit(self, members)
        stamps["submit_end"].append(time.perf_counter())

    def run_batch(self, batch):
        stamps["loop_start"].append(time.perf_counter())
        orig_batch(self, batch)
        stamps["step_end"].append(time.perf_counter())

    # "on": a session alone runs its lane step in its own worker (the default);
    # "on_handoff": every step handed to the scheduler's loop thread (timestamps taken)
    loop: dict = {"off": [], "on": [], "on_handoff": []}
    for rep in range(3):
        for mode in loop:
            if mode == "on_handoff":
                scheduler.INLINE_SOLO = False
                DecodeScheduler.submit, DecodeScheduler._run_batch = submit, run_batch
            try:
                _, intervals = _run(loaded, mode.split("_")[0], args.tokens, args.layer)
            finally:
                scheduler.INLINE_SOLO = True
                DecodeScheduler.submit, DecodeScheduler._run_batch = orig_submit, orig_batch
            loop[mode] += intervals
    n = min(len(v) for v in stamps.values())
    handoff_in = [(stamps["loop_start"][i] - stamps["submit_end"][i]) * 1e3 for i in range(n)]
    step_py = [(stamps["step_end"][i] - stamps["loop_start"][i]) * 1e3 for i in range(n)]
    med = statistics.median
    out["loop_ms_per_step"] = {m: {"median": med(v), "mean": statistics.fmean(v), "n": len(v)}
                               for m, v in loop.items()}
    out["loop_on_over_off_tokens_per_s"] = med(loop["off"]) / med(loop["on"])
    out["loop_on_handoff_over_off_tokens_per_s"] = med(loop["off"]) / med(loop["on_handoff"])
    out["engine_handoffs_ms"] = {"worker_to_loop": med(handoff_in),
                                 "loop_step_python_incl_launch": med(step_py)}
    # (the hand-off back to the worker overlaps the device's step: not on the critical path)
    print("loop", out["loop_ms_per_step"], out["engine_handoffs_ms"], flush=True)

    _engine_vs_off(loaded, args, out)
    # ---- the graphs alone -------------------------------------------------------------
    if cuda:
        _device_side(loaded, sched, args, out)
    scheduler.set_mode("off")
    name = args.name or f"tenants_profile_{torch.device(args.device).type}"
    print("wrote", write_result(name, out, smoke_dir() if args.smoke else Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
