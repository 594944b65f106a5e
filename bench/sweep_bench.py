"""A steering sweep of N scales from one checkpoint vs N fresh generations, through the
kernel server from a client, in one run:

- fresh: for each scale, ``steer(scale)`` then ``generate(prompt)``: the prompt's prefill is
  computed N times;
- sweep: ``generate(prompt)`` to the first decode step, ``checkpoint()``, then for each scale
  ``restore()``, ``steer(scale)``, ``resume()``: the prefill is computed once.

The server runs in its own process (``python -m kernel_server``). The rule acts on decode
steps only (``phase="decode"``), so both ways must give the same
tokens for every scale (checked). Fresh and sweep alternate between repetitions.

    python bench/sweep_bench.py --device cpu --model smollm2-135m
    python bench/sweep_bench.py --device cuda --model random:llama-1b --dtype bfloat16 --context 4096
    python bench/sweep_bench.py --smoke
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

from common import (command_line, connect, environment, finish, pyplot, RESULTS, save_plot,  # noqa: E402
                    start_server)

med = statistics.median


def fresh(s, prompt, scales, layer, tokens) -> tuple[float, list, list]:
    """N fresh generations, one per scale: total ms, ms per scale, tokens per scale."""
    walls, out = [], []
    t0 = time.perf_counter()
    for x in scales:
        t1 = time.perf_counter()
        s.clear_steering()
        s.steer(layer=layer, scale=float(x), phase="decode")
        out.append(s.generate(prompt, max_new_tokens=tokens, stop_at_eos=False).tokens)
        walls.append((time.perf_counter() - t1) * 1e3)
    s.clear_steering()
    return (time.perf_counter() - t0) * 1e3, walls, out


def sweep(s, prompt, scales, layer, tokens) -> tuple[float, float, list, list, bool]:
    """One prefill, a checkpoint at the first decode step, then restore + steer + resume per
    scale: total ms, the prefix's ms (prefill, checkpoint), ms per scale, tokens per scale,
    and whether every restored run reports the very same prefill record (not recomputed)."""
    t0 = time.perf_counter()
    s.clear_steering()
    s.breakpoint(layer=0, steps=[1])
    assert s.generate(prompt, max_new_tokens=tokens, stop_at_eos=False).paused
    ck = s.checkpoint().wait()
    s.stop()
    s.clear_breakpoints()
    prefix = (time.perf_counter() - t0) * 1e3
    walls, out, prefills = [], [], []
    for x in scales:
        t1 = time.perf_counter()
        s.restore(ck)                     # (brings back the checkpoint's breakpoint)
        s.clear_breakpoints()
        s.steer(layer=layer, scale=float(x), phase="decode")
        res = s.resume().result
        walls.append((time.perf_counter() - t1) * 1e3)
        out.append(res.tokens)
        prefills.append(res.steps[0].forward_ms)
    total = (time.perf_counter() - t0) * 1e3
    ck.delete()
    s.clear_steering()
    return total, prefix, walls, out, len(set(prefills)) == 1


def run(args) -> dict:
    srv = start_server(args.model, args.device, args.dtype)      # its own process
    c = connect(srv.address)
    s = c.session()
    layer = min(args.layer, s.layers - 1)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, s.vocab_size, (args.context,), generator=gen).tolist()
    scales = np.linspace(args.scale_min, args.scale_max, args.scales)
    fresh(s, prompt[:32], scales[:1], layer, 2)                 # warm-up
    rows = {"fresh_ms": [], "sweep_ms": [], "prefix_ms": [], "fresh_per_scale_ms": [],
            "sweep_per_scale_ms": []}
    match, restored_prefill = True, True
    for rep in range(args.reps):
        order = ("fresh", "sweep") if rep % 2 == 0 else ("sweep", "fresh")
        for kind in order:
            if kind == "fresh":
                total, walls, fresh_tokens = fresh(s, prompt, scales, layer, args.tokens)
                rows["fresh_ms"].append(total)
                rows["fresh_per_scale_ms"].append(walls)
            else:
                total, prefix, walls, sweep_tokens, same_prefill = sweep(s, prompt, scales, layer,
                                                                         args.tokens)
                rows["sweep_ms"].append(total)
                rows["prefix_ms"].append(prefix)
                rows["sweep_per_scale_ms"].append(walls)
                restored_prefill &= same_prefill
        match &= fresh_tokens == sweep_tokens
        print(f"rep {rep}: fresh {rows['fresh_ms'][-1]:.0f} ms, sweep {rows['sweep_ms'][-1]:.0f} ms",
              flush=True)
    distinct = len({tuple(t) for t in sweep_tokens})
    c.close()
    srv.close()
    speedups = [f / w for f, w in zip(rows["fresh_ms"], rows["sweep_ms"])]
    return {
        "benchmark": "sweep", "model": args.model, "device": s.device, "dtype": s.dtype,
        "env": environment(s.device),
        "command": command_line(), "reps": args.reps, "context": args.context,
        "tokens": args.tokens, "scales": [float(x) for x in scales], "layer": layer,
        **rows,
        "fresh_ms_median": med(rows["fresh_ms"]), "sweep_ms_median": med(rows["sweep_ms"]),
        "prefix_ms_median": med(rows["prefix_ms"]),
        "sweep_speedup": med(speedups), "sweep_speedup_min": min(speedups),
        "prefills_fresh": args.scales, "prefills_sweep": 1,
        "prefix_not_recomputed": restored_prefill,
        "tokens_match": match, "distinct_continuations": distinct,
    }


def plot(d: dict, name: str, out_dir: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].bar(["N fresh generations", "sweep from one checkpoint"],
              [d["fresh_ms_median"], d["sweep_ms_median"]], color=["C1", "C0"])
    ax[0].bar(["sweep from one checkpoint"], [d["prefix_ms_median"]], color="C2",
              label="prefix: prefill + checkpoint (once)")
    ax[0].set_ylabel("ms for the whole sweep")
    ax[0].set_title(f"{len(d['scales'])} scales, {d['context']}-token prompt, {d['tokens']} tokens "
                    f"each: {d['sweep_speedup']:.1f}x")
    ax[0].legend()
    per_fresh = np.median(np.array(d["fresh_per_scale_ms"]), axis=0)
    per_sweep = np.median(np.array(d["sweep_per_scale_ms"]), axis=0)
    ax[1].plot(d["scales"], per_fresh, "o-", color="C1", label="fresh generate()")
    ax[1].plot(d["scales"], per_sweep, "o-", color="C0", label="restore + steer + resume()")
    ax[1].set_xlabel("steering scale")
    ax[1].set_ylabel("ms per scale")
    ax[1].set_ylim(bottom=0)
    ax[1].legend()
    fig.suptitle(f"{d['model']} on {d['env'].get('gpu', 'CPU')} ({d['command']})", fontsize=9)
    return save_plot(fig, name, out_dir)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--context", type=int, default=512, help="prompt tokens (random ids)")
    p.add_argument("--tokens", type=int, default=8, help="tokens generated per scale")
    p.add_argument("--scales", type=int, default=8, help="N")
    p.add_argument("--scale-min", type=float, default=0.5)
    p.add_argument("--scale-max", type=float, default=1.5)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--name", default=None, help="result name (default sweep_<device>)")
    p.add_argument("--smoke", action="store_true", help="tiny model, no result file")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.context, args.tokens, args.scales, args.reps = \
            "tiny-gpt2", "cpu", 64, 3, 3, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    return finish(args, result, "sweep", plot)


if __name__ == "__main__":
    raise SystemExit(main())
