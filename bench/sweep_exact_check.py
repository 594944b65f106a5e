"""The exact patching sweep (``patch_sweep``) on one model: the incremental method against
whole-prompt rows (every cell a row of a forward over the whole corrupted prompt), and both
timed. Meant for the GPU, where the CPU benchmark (bench/analysis_bench.py) cannot say what
the incremental path does:

    python bench/sweep_exact_check.py --model random:llama-7b --device cuda --dtype bfloat16

Two random prompts of ``--tokens`` tokens that differ from position ``--differ`` on, all
layers x all positions at each site. Prints one JSON line per site; exit status 1 when the
incremental sweep fell back or differs from the rows by more than ``--tol`` (relative to the
grid's largest value); with ``--reference-dtype float32`` (for a 16-bit model, where the two
methods differ from each other by rounding) when the incremental grid is further from the
float32 rows grid than 1.5x the 16-bit rows grid is.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-gpt2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--tokens", type=int, default=9)
    p.add_argument("--differ", type=int, default=3)
    p.add_argument("--sites", default="resid,attn,mlp")
    p.add_argument("--reference-dtype", default=None,
                   help="also load the model in this dtype (float32) and compare both methods "
                        "with its whole-prompt rows grid (random: models are the same weights cast)")
    p.add_argument("--tol", type=float, default=None,
                   help="relative tolerance (default 1e-4 in float32, 2e-2 in 16-bit types)")
    args = p.parse_args(argv)
    import torch
    from kernel_server.model import patching
    from kernel_server.model.registry import load_model
    from kernel_server.runtime.generation import install_layer_hooks
    loaded = load_model(args.model, args.device, args.dtype, progress=False)
    install_layer_hooks(loaded)          # (the server does this at load: the site hooks)
    ref = None
    if args.reference_dtype:
        ref = load_model(args.model, args.device, args.reference_dtype, progress=False)
        install_layer_hooks(ref)
    g = torch.Generator().manual_seed(0)
    vocab = loaded.vocab_size
    corrupted = torch.randint(0, vocab, (args.tokens,), generator=g).tolist()
    clean = list(corrupted)
    for i in range(args.differ, args.tokens - 1):
        clean[i] = int(torch.randint(0, vocab, (1,), generator=g))
    answer = tuple(torch.randint(0, vocab, (2,), generator=g).tolist())
    layers, positions = list(range(loaded.num_layers)), list(range(args.tokens))
    tol = args.tol if args.tol is not None else (1e-4 if loaded.dtype == torch.float32 else 2e-2)
    ok = True

    def timed(fn):
        if str(loaded.device).startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if str(loaded.device).startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    from kernel_server.model import sites
    def rows_grid(model, site):
        real = patching.incremental_sweep
        patching.incremental_sweep = lambda *a, **k: None          # force whole-prompt rows
        try:
            return patching.patch_cells(model, clean, corrupted, site, layers, positions, answer)
        finally:
            patching.incremental_sweep = real

    def forced_incremental(site):
        """The incremental grid whatever its self-check says."""
        tol, eps = patching.SELF_CHECK_TOL, patching.SELF_CHECK_EPS
        patching.SELF_CHECK_TOL, patching.SELF_CHECK_EPS = float("inf"), float("inf")
        try:
            return patching.patch_cells(loaded, clean, corrupted, site, layers, positions, answer)
        finally:
            patching.SELF_CHECK_TOL, patching.SELF_CHECK_EPS = tol, eps

    for site in args.sites.split(","):
        for model in (loaded, ref) if ref is not None else (loaded,):
            for layer in layers:          # hook the site as a session's patch_sweep does
                model.hooks.install_site(sites.resolve(model, layer, site))
        patching.patch_cells(loaded, clean, corrupted, site, layers, positions, answer)  # warm
        inc, t_inc = timed(lambda: patching.patch_cells(loaded, clean, corrupted, site, layers,
                                                       positions, answer))
        real = patching.incremental_sweep
        patching.incremental_sweep = lambda *a, **k: None          # force whole-prompt rows
        try:
            patching.patch_cells(loaded, clean, corrupted, site, layers, positions, answer)
            rows, t_rows = timed(lambda: patching.patch_cells(loaded, clean, corrupted, site,
                                                             layers, positions, answer))
        finally:
            patching.incremental_sweep = real
        a, b = torch.tensor(inc["metric"]), torch.tensor(rows["metric"])
        diff = float((a - b).abs().max())
        scale = float(b.abs().max().clamp_min(1.0))
        good = inc["method"] == "incremental" and diff <= tol * scale
        extra = {}
        if ref is not None:
            # in a 16-bit type the two methods differ from each other by rounding; the
            # question is whether the incremental grid is as close to the float32 one as the
            # rows grid is (within 1.5x of its error, or the tolerance)
            r = torch.tensor(rows_grid(ref, site)["metric"])
            forced = torch.tensor(forced_incremental(site)["metric"])
            inc_err, rows_err = float((a - r).abs().max()), float((b - r).abs().max())
            extra = {"reference_dtype": args.reference_dtype,
                     "incremental_vs_reference": inc_err, "rows_vs_reference": rows_err,
                     "incremental_unchecked_vs_rows": float((forced - b).abs().max())}
            good = inc["method"] == "incremental" and inc_err <= max(1.5 * rows_err, tol * scale)
        ok &= good
        print(json.dumps({**extra, "model": args.model, "device": args.device, "dtype": str(loaded.dtype),
                          "site": site, "cells": [len(layers), len(positions)],
                          "method": inc["method"], "max_abs_diff_vs_rows": diff,
                          "grid_max_abs": scale, "tolerance": tol * scale, "ok": good,
                          "incremental_s": round(t_inc, 4), "rows_s": round(t_rows, 4),
                          "speedup": round(t_rows / t_inc, 2)}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
