"""Checkpoint costs on the server: dispatch, device-to-host copy, restore, and
restore+continue vs recomputing the prefix, each against a baseline from the same run.

    python bench/checkpoint_bench.py --device cuda --shape llama-1b --dtype bfloat16
    python bench/checkpoint_bench.py --smoke          # tiny, CPU: proves the script runs
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (command_line, environment, finish, median_ms, pyplot, random_llama,  # noqa: E402
                    RESULTS, save_plot, sync)
from kernel_server.checkpoints.store import CheckpointStore
from kernel_server.checkpoints.snapshot import cache_from_host  # noqa: E402
from kernel_server.runtime.session_state import Session  # noqa: E402
from kernel_server.model.validation import Limits  # noqa: E402


def raw_copy_ms(nbytes: int, device, reps: int) -> dict:
    """Baseline: one pinned device<->host copy of ``nbytes`` (plain .cpu() for reference)."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if torch.device(device).type != "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8)
        d2h, _ = median_ms(lambda: host.copy_(dev), reps, device)
        return {"d2h_ms": d2h, "h2d_ms": d2h, "naive_cpu_ms": d2h}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2h, _ = median_ms(lambda: host.copy_(dev, non_blocking=True), reps, device)
    h2d, _ = median_ms(lambda: dev.copy_(host, non_blocking=True), reps, device)
    naive, _ = median_ms(lambda: dev.cpu(), reps, device)
    return {"d2h_ms": d2h, "h2d_ms": h2d, "naive_cpu_ms": naive}


def run(args) -> dict:
    loaded = random_llama(args.shape, args.device, args.dtype, max_positions=max(args.contexts) + 64)
    store = CheckpointStore(budget_bytes=64 << 30, pinned_pool_bytes=args.pinned_pool_mb << 20)
    store.prepare(loaded.device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ctx in args.contexts:
        prompt = torch.randint(0, loaded.vocab_size, (ctx,), generator=gen).tolist()
        s = Session(loaded, Limits(max_prompt_tokens=ctx + 8), owner="bench")
        s.generate(prompt, max_new_tokens=1, stop_at_eos=False)      # cache holds ctx positions
        dispatch, copy = [], []
        first_dispatch = None
        for rep in range(args.reps + 1):
            sync(args.device)
            t0 = time.perf_counter()
            ck = s.checkpoint(store)
            t1 = time.perf_counter()
            ck.wait()
            t2 = time.perf_counter()
            if rep == 0:
                first_dispatch = (t1 - t0) * 1e3     # cold: pinned pool not yet warm
            else:
                dispatch.append((t1 - t0) * 1e3)
                copy.append((t2 - t0) * 1e3)
            if rep < args.reps:
                store.delete(ck.id, "bench")
        restore_ms, _ = median_ms(lambda: cache_from_host(ck, loaded), args.reps, args.device)
        base = raw_copy_ms(ck.nbytes, args.device, args.reps)
        # restore + continue one token vs recomputing the prefix and that token
        s.set_breakpoint(layer=0, steps=[1])
        s.generate(prompt, max_new_tokens=2, stop_at_eos=False)    # paused at the start of step 1
        ck_next = s.checkpoint(store)          # holds the ctx prompt positions + token 0
        ck_next.wait()
        s.resume(ignore_breakpoints=True).result()     # (a Future: the run's next event)
        store.delete(ck.id, "bench")
        ck = ck_next

        def restore_continue():                # one decode step on the restored cache
            s.restore(ck)
            s.resume(ignore_breakpoints=True).result()

        def recompute():                       # the prefix again, then the same token
            s.clear_breakpoints()              # (restore brought the breakpoint back)
            s.generate(prompt, max_new_tokens=2, stop_at_eos=False)
        recompute()                            # warm-up
        rc_ms, _ = median_ms(restore_continue, args.reps, args.device)
        re_ms, _ = median_ms(recompute, args.reps, args.device)
        ids = torch.tensor([prompt], device=args.device)

        def prefill():                         # the prefix alone, as a plain HF forward
            from transformers import DynamicCache
            loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                         **{loaded.cache_kwarg: DynamicCache(config=loaded.model.config)})
        prefill()
        prefill_ms, _ = median_ms(prefill, args.reps, args.device)
        store.delete(ck.id, "bench")
        copy_ms = sorted(copy)[len(copy) // 2]
        row = {
            "context": ctx, "kv_bytes": ck.nbytes,
            "dispatch_ms_median": sorted(dispatch)[len(dispatch) // 2], "dispatch_ms_max": max(dispatch),
            "dispatch_ms_cold": first_dispatch,
            "copy_ms_median": copy_ms, "restore_ms_median": restore_ms,
            "baseline_pinned_d2h_ms": base["d2h_ms"], "baseline_pinned_h2d_ms": base["h2d_ms"],
            "baseline_naive_cpu_ms": base["naive_cpu_ms"],
            "copy_vs_pinned_d2h": base["d2h_ms"] / copy_ms,
            "restore_vs_pinned_h2d": base["h2d_ms"] / restore_ms,
            "copy_gb_s": ck.nbytes / copy_ms / 1e6, "pinned_d2h_gb_s": ck.nbytes / base["d2h_ms"] / 1e6,
            "restore_continue_ms": rc_ms, "recompute_prefix_ms": re_ms,
            "restore_continue_speedup": re_ms / rc_ms,
            "prefill_ms": prefill_ms, "restore_vs_prefill_speedup": prefill_ms / restore_ms,
        }
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        s.close()
    return {"benchmark": "checkpoint", "model": loaded.name, "dtype": args.dtype,
            "env": environment(args.device), "reps": args.reps, "rows": rows,
            "command": command_line()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--pinned-pool-mb", type=int, default=512, help="as the server option (0: none)")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--name", default=None, help="result name (default checkpoint_<device>)")
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, 2 reps, no result file")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.shape, args.dtype, args.contexts, args.reps = "cpu", "tiny-llama", "float32", [16, 64], 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with torch.inference_mode():
        result = run(args)
    return finish(args, result, "checkpoint", plot)


def plot(d: dict, name: str, out_dir: Path) -> Path:
    plt = pyplot()
    rows = d["rows"]
    ctx = [r["context"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in [("dispatch_ms_median", "checkpoint() dispatch"), ("copy_ms_median", "copy"),
                       ("baseline_pinned_d2h_ms", "pinned D2H baseline"),
                       ("restore_ms_median", "restore"), ("baseline_pinned_h2d_ms", "pinned H2D baseline")]:
        ax[0].plot(ctx, [r[key] for r in rows], "o-", label=label)
    ax[0].set_xscale("log", base=2)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("context tokens")
    ax[0].set_ylabel("ms")
    ax[0].legend(fontsize=8)
    width = 0.35
    xs = range(len(rows))
    ax[1].bar([x - width / 2 for x in xs], [r["restore_continue_ms"] for r in rows], width,
              label="restore + continue")
    ax[1].bar([x + width / 2 for x in xs], [r["recompute_prefix_ms"] for r in rows], width,
              label="recompute prefix + token")
    ax[1].set_xticks(list(xs), [str(c) for c in ctx])
    ax[1].set_xlabel("context tokens")
    ax[1].set_ylabel("ms")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"{d['model']} {d['dtype']} on {d['env'].get('gpu', 'CPU')} ({d['command']})",
                 fontsize=9)
    return save_plot(fig, name, out_dir)


if __name__ == "__main__":
    raise SystemExit(main())
