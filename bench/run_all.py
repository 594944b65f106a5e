"""Run the whole benchmark suite: each benchmark in its own process, each writing its JSON
and PNG to the results directory, then the README tables regenerated from them.

    python -m bench --device cpu  --model smollm2-135m                       # (= bench/run_all.py)
    python -m bench --device cuda --model random:llama-1b --dtype bfloat16 --tag llama-1b
    python -m bench --smoke                                                   # tiny, no results

Per device, the defaults are the sizes the README reports: CPU (2 threads, the CI machine)
runs the real SmolLM2 weights and SmolLM2's shape for checkpoints; CUDA a random-init Llama.
``--tag`` suffixes every result name (``decode_cuda_<tag>``), for several models per device.
``bench/fast_decode_bench.py`` joins on CUDA; ``bench/multi_gpu_bench.py`` (several GPUs) runs
on its own.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BENCHMARKS = ("decode", "checkpoint", "sweep", "nnsight", "fast_decode", "fast_decode_peers", "tenants")


def commands(args) -> list[tuple[str, list[str]]]:
    cuda = args.device.startswith("cuda")
    dtype = ["--dtype", args.dtype] if args.dtype else []
    model = ["--model", args.model, "--device", args.device, *dtype]
    tag = f"_{args.tag}" if args.tag else ""
    dev = "cuda" if cuda else "cpu"

    out_dir = Path(args.out).resolve()
    out_dir = out_dir.relative_to(ROOT) if out_dir.is_relative_to(ROOT) else out_dir

    where = [] if out_dir == RESULTS.relative_to(ROOT) else ["--out", str(out_dir)]

    def out(name):          # (the defaults left out: the recorded command stays short)
        return where + ([] if not tag else ["--name", f"{name}_{dev}{tag}"])
    if cuda:
        shape, ck_dtype = args.checkpoint_shape or "llama-1b", args.dtype or "bfloat16"
        contexts, sweep_context = ["128", "1024", "4096"], "1024"
    else:
        shape, ck_dtype = args.checkpoint_shape or "smollm2-shape", args.dtype or "float32"
        contexts, sweep_context = ["1024"], "512"
    sweep_context = str(args.sweep_context or sweep_context)
    smoke = ["--smoke"] if args.smoke else []
    runs = {
        "decode": ["bench/decode_bench.py", *model, *out("decode"), "--reps", str(args.reps)],
        "checkpoint": ["bench/checkpoint_bench.py", "--device", args.device, "--shape", shape,
                       "--dtype", ck_dtype, "--contexts", *contexts, "--reps", str(max(args.reps, 5)),
                       *out("checkpoint")],
        "sweep": ["bench/sweep_bench.py", *model, "--context", sweep_context, *out("sweep")],
        "nnsight": ["bench/nnsight_bench.py", *model, *out("nnsight"), "--reps", str(args.reps)],
        # clients at once on one server (engine on / off) vs HF batched generate
        "tenants": ["bench/tenants_bench.py", *model, *out("tenants")]
        + ([] if cuda else ["--tokens", "16", "--layer", "6"]),
    }
    if cuda and (HERE / "fast_decode_bench.py").exists():   # (its owner's options, its own names)
        runs["fast_decode"] = ["bench/fast_decode_bench.py", "--device", args.device,
                               *where]
        # breakpoint steps in graph segments, expressions, HF generate and nnsight at 512/4k/8k
        runs["fast_decode_peers"] = ["bench/fast_decode_bench.py", "--peers", "--device",
                                     args.device, *where]
    chosen = [b for b in BENCHMARKS if b in runs and (not args.only or b in args.only)
              and b not in (args.skip or [])]
    if args.smoke:   # each script's --smoke: tiny model, CPU, a temporary directory
        return [(b, [runs[b][0], *smoke]) for b in chosen
                if not b.startswith("fast_decode")]
    return [(b, runs[b]) for b in chosen]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--model", default=None,
                   help="server model (default: smollm2-135m on cpu, random:llama-1b on cuda)")
    p.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default per device)")
    p.add_argument("--checkpoint-shape", default=None, help="random-init shape for the checkpoint "
                   "benchmark (default smollm2-shape on cpu, llama-1b on cuda)")
    p.add_argument("--sweep-context", type=int, default=None, help="prompt tokens of the sweep "
                   "(default 512 on cpu, 1024 on cuda; GPT-2 takes 1024 positions in all)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tag", default="", help="suffix of every result name")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS)
    p.add_argument("--skip", nargs="+", choices=BENCHMARKS)
    p.add_argument("--no-report", action="store_true", help="leave the README tables alone")
    p.add_argument("--smoke", action="store_true", help="every benchmark at tiny size, nothing kept")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "random:llama-1b" if args.device.startswith("cuda") else "smollm2-135m"
    if args.device.startswith("cuda") and args.dtype is None:
        args.dtype = "bfloat16"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    failed = []
    for name, cmd in commands(args):
        print(f"== {name}: python {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env).returncode
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if not args.smoke and not args.no_report and Path(args.out).resolve() == RESULTS.resolve():
        subprocess.run([sys.executable, "bench/report.py"], cwd=ROOT, check=True)
        print("README tables regenerated from", RESULTS)
    if failed:
        print("FAILED:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
