"""Checkpoint costs on the server: dispatch, device-to-host copy, restore, and
restore+continue vs recomputing the prefix, each against a baseline from the same run.

    python bench/checkpoint_bench.py --device cuda --shape llama-1b --dtype bfloat16
    python bench/checkpoint_bench.py --smoke          # tiny, CPU: proves the script runs

With ``--dispatch`` (issue #16): the first and the later dispatches of ``checkpoint()`` as a
server meets them, each in a fresh process (load, ``CheckpointStore.prepare(model)`` as the
server does before "ready", a prefill, then checkpoints): where the time goes (the parts
``Checkpoint.dispatch_parts`` stamps, device allocations made), for a finished run's
DynamicCache and for a run paused in a fast-decode slot; the same with the dispatch path
of 251dee3 (``before``: no device staging buffer, no warm-up), and a torch.profiler table
of a first and a later dispatch. Results go into the ``dispatch`` key of the named result
(its other keys kept).

    python bench/checkpoint_bench.py --dispatch --device cuda --shape llama-7b --contexts 4096 \
        --name checkpoint_cuda_llama-7b
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

from common import (command_line, environment, finish, median_ms, pyplot, random_llama,  # noqa: E402
                    RESULTS, save_plot, sync)
from kernel_server.checkpoints.store import CheckpointStore, kv_bytes_per_position  # noqa: E402
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
    store.prepare(loaded)            # as the server before "ready": pool, staging, warm-up
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


# ---- --dispatch: the first checkpoint's dispatch, in fresh processes -------------------------
def _device_allocs(device) -> int:
    """cudaMalloc calls of torch's caching allocator so far (0 off CUDA)."""
    if torch.device(device).type != "cuda":
        return 0
    return int(torch.cuda.memory_stats(device).get("num_device_alloc", 0))


def _dispatches(s, store, device, n: int, profile: bool) -> dict:
    """``n`` checkpoints of the session as it stands: the first and the later ones' time in
    ``Session.checkpoint`` (``call_ms``) and in ``CheckpointStore.take`` (``dispatch_ms``,
    with its parts), device allocations made by each; a torch.profiler table of the first
    and of the last with ``profile``."""
    out, tables = [], {}
    for i in range(n):
        sync(device)
        allocs = _device_allocs(device)
        prof = None
        if profile and i in (0, n - 1):
            from torch.profiler import ProfilerActivity, profile as torch_profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                             if torch.device(device).type == "cuda" else [])
            prof = torch_profile(activities=acts)
            prof.__enter__()
        t0 = time.perf_counter()
        ck = s.checkpoint(store)
        t1 = time.perf_counter()
        if prof is not None:
            prof.__exit__(None, None, None)
            tables["first" if i == 0 else "later"] = prof.key_averages().table(
                sort_by="cpu_time_total", row_limit=25, max_name_column_width=48)
        out.append({"call_ms": (t1 - t0) * 1e3, "dispatch_ms": ck.dispatch_ms,
                    "parts_ms": dict(ck.dispatch_parts),
                    "device_allocs": _device_allocs(device) - allocs})
        ck.wait()
        store.delete(ck.id, "bench")
    later = out[1:]
    med = lambda key: statistics.median(r[key] for r in later)        # noqa: E731
    summary = {"first": out[0], "later_median_dispatch_ms": med("dispatch_ms"),
               "later_max_dispatch_ms": max(r["dispatch_ms"] for r in later),
               "later_median_call_ms": med("call_ms"),
               "later_median_parts_ms": {k: statistics.median(r["parts_ms"][k] for r in later)
                                         for k in out[0]["parts_ms"]},
               "later_device_allocs": sum(r["device_allocs"] for r in later),
               "samples": out}
    if tables:
        summary["profile"] = tables
    return summary


def dispatch_one(args) -> dict:
    """One fresh process: load, prepare, prefill, checkpoints (see the module docstring)."""
    from kernel_server.runtime import fast_decode
    ctx = args.contexts[-1]
    t0 = time.perf_counter()
    loaded = random_llama(args.shape, args.device, args.dtype, max_positions=args.max_positions)
    load_s = time.perf_counter() - t0
    store = CheckpointStore(budget_bytes=args.budget_mb << 20, pinned_pool_bytes=args.pinned_pool_mb << 20)
    if args.before:                               # the dispatch path of main at 251dee3:
        store.warm = lambda loaded: None          # no dummy dispatch at load,
        store._prepare_staging = lambda device, nbytes: None       # no staging buffer
    t0 = time.perf_counter()
    store.prepare(loaded)                         # as the server before "ready"
    prepare_s = time.perf_counter() - t0
    if args.profile:                              # the profiler's own first start, not ours
        from torch.profiler import profile as torch_profile
        with torch_profile():
            torch.ones(1, device=args.device).add_(1)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, loaded.vocab_size, (ctx,), generator=gen).tolist()
    s = Session(loaded, Limits(max_prompt_tokens=ctx + 8), owner="bench")
    fast_decode.set_mode("auto")                  # the server's default
    s.generate(prompt, max_new_tokens=1, stop_at_eos=False)     # finished: a DynamicCache
    result = {"variant": "before (251dee3 dispatch path)" if args.before else "this code",
              "profiled": args.profile, "context": ctx, "load_s": load_s, "prepare_s": prepare_s,
              "pool_mib": store.pinned_pool_bytes / 2**20}
    result["finished_run"] = _dispatches(s, store, args.device, args.reps + 1, args.profile)
    # paused in a fast-decode slot (CUDA: graph segments) at step 3: the slot's strided layers
    s.set_breakpoint(layer=loaded.num_layers // 2, steps=[3])
    event = s.generate(prompt, max_new_tokens=5, stop_at_eos=False)
    result["paused_event"] = {k: event.get(k) for k in ("event", "layer", "step")} \
        if isinstance(event, dict) else str(event)
    result["paused_in_slot"] = _dispatches(s, store, args.device, args.reps + 1, args.profile)
    result["paused_in_slot"]["cache"] = type(s.run.cache).__name__
    s.resume(ignore_breakpoints=True).result()
    s.close()
    result["kv_mib"] = kv_bytes_per_position(loaded) * ctx / 2**20
    if torch.device(args.device).type == "cuda":  # what one cudaMalloc of a checkpoint's staging costs
        nbytes = kv_bytes_per_position(loaded) * ctx
        torch.cuda.empty_cache()
        sync(args.device)
        allocs, t0 = _device_allocs(args.device), time.perf_counter()
        block = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
        result["fresh_device_alloc_ms"] = (time.perf_counter() - t0) * 1e3
        result["fresh_device_alloc_calls"] = _device_allocs(args.device) - allocs
        del block
        sync(args.device)
        t0 = time.perf_counter()
        block = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
        result["cached_device_alloc_ms"] = (time.perf_counter() - t0) * 1e3
        del block
    result["env"] = environment(args.device)
    return result


def dispatch(args) -> dict:
    """Each variant in a fresh process (a first dispatch happens once per process)."""
    import json
    import subprocess
    import tempfile
    runs = []
    for variant in args.variants:
        extra = [f"--{part}" for part in variant.split("+") if part != "now"]
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--dispatch-one", f.name, "--device", args.device,
                   "--shape", args.shape, "--dtype", args.dtype, "--reps", str(args.reps),
                   "--contexts", str(args.contexts[-1]), "--max-positions", str(args.max_positions),
                   "--pinned-pool-mb", str(args.pinned_pool_mb), "--budget-mb", str(args.budget_mb),
                   *extra]
            subprocess.run(cmd, check=True, timeout=900)
            runs.append(json.loads(Path(f.name).read_text()))
        r = runs[-1]
        print({"variant": r["variant"], "profiled": r["profiled"],
               **{case: {"first_ms": round(r[case]["first"]["dispatch_ms"], 3),
                         "later_ms": round(r[case]["later_median_dispatch_ms"], 3),
                         "first_parts": {k: round(v, 3) for k, v in r[case]["first"]["parts_ms"].items()},
                         "first_device_allocs": r[case]["first"]["device_allocs"]}
                  for case in ("finished_run", "paused_in_slot")}}, flush=True)
    return {"runs": runs, "command": command_line(), "model": f"random-{args.shape}",
            "dtype": args.dtype, "context": args.contexts[-1]}


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
    p.add_argument("--dispatch", action="store_true",
                   help="first and later dispatch, in fresh processes (see the docstring)")
    p.add_argument("--dispatch-one", metavar="JSON", help=argparse.SUPPRESS)   # one such process
    p.add_argument("--variants", nargs="+", default=["now", "before", "now+profile"],
                   help="--dispatch: the processes to run (now / before, +profile)")
    p.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-positions", type=int, default=8192, help="the model's context limit")
    p.add_argument("--budget-mb", type=int, default=16384, help="checkpoint host-memory budget")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.shape, args.dtype, args.contexts, args.reps = "cpu", "tiny-llama", "float32", [16, 64], 2
        args.max_positions = min(args.max_positions, 512)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dispatch_one:
        with torch.inference_mode():
            Path(args.dispatch_one).write_text(json.dumps(dispatch_one(args)))
        return 0
    if args.dispatch:
        result = dispatch(args)
        name = args.name or f"checkpoint_{torch.device(args.device).type}"
        path = Path(args.out) / f"{name}.json"
        if args.smoke or not path.exists():
            import tempfile
            path = Path(tempfile.mkdtemp()) / f"{name}.json" if args.smoke else path
            whole = {"benchmark": "checkpoint", "rows": [], "model": result["model"],
                     "dtype": args.dtype, "reps": args.reps, "env": result["runs"][0]["env"],
                     "command": result["command"]}
        else:
            whole = json.loads(path.read_text())
        whole["dispatch"] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(whole, indent=2, sort_keys=True))
        print(f"wrote {path}")
        return 0
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
