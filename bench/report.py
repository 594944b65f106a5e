"""Render the README's benchmark tables from bench/results/*.json (never typed by hand).

    python bench/report.py            # rewrite the tables between the README markers
    python bench/report.py --check    # exit 1 if the README is out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"


def _f(x, nd=2):
    return f"{x:.{nd}f}"


def checkpoint_table(name: str) -> str:
    d = json.loads((RESULTS / f"{name}.json").read_text())
    env = d["env"]
    where = env.get("gpu", f"CPU, {env['cpu_threads']} threads")
    lines = [
        f"`{d['command']}` — {where}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{d['model']} {d['dtype']}, median of {d['reps']}",
        "",
        "| context | KV MiB | dispatch ms (median / cold) | copy ms | pinned D2H ms | copy / pinned | "
        "restore ms | pinned H2D ms | restore / pinned | prefill ms | restore+continue ms | "
        "recompute ms | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['context']} | {_f(r['kv_bytes'] / 2**20, 1)} | {_f(r['dispatch_ms_median'], 3)} / "
            f"{_f(r['dispatch_ms_cold'], 1)} | {_f(r['copy_ms_median'], 3)} | "
            f"{_f(r['baseline_pinned_d2h_ms'], 3)} | {_f(r['copy_vs_pinned_d2h'])} | "
            f"{_f(r['restore_ms_median'], 3)} | {_f(r['baseline_pinned_h2d_ms'], 3)} | "
            f"{_f(r['restore_vs_pinned_h2d'])} | {_f(r['prefill_ms'], 1)} | "
            f"{_f(r['restore_continue_ms'], 1)} | {_f(r['recompute_prefix_ms'], 1)} | "
            f"{_f(r['restore_continue_speedup'], 1)}x |")
    return "\n".join(lines)


def decode_table(name: str) -> str:
    d = json.loads((RESULTS / f"{name}.json").read_text())
    env = d["env"]
    where = env.get("gpu", f"CPU, {env['cpu_threads']} threads")
    rows = [
        ("decode, hooks installed, no breakpoint (server) vs plain HF loop",
         f"{_f(d['server_hooks_ms_per_token'], 1)} vs {_f(d['plain_hf_ms_per_token'], 1)} ms/token",
         _f(d["hooks_vs_plain"]), ">= 0.99"),
        ("decode with one steering rule vs none",
         f"{_f(d['steered_ms_per_token'], 1)} vs {_f(d['server_hooks_ms_per_token'], 1)} ms/token",
         _f(d["steered_vs_unsteered"]), ">= 0.98"),
        ("pause -> resume -> next pause beyond compute vs raw socket round trip",
         f"{_f(d['pause_resume_overhead_ms'], 3)} vs {_f(d['raw_socket_rtt_ms'], 3)} ms "
         f"(rpyc ping {_f(d['rpyc_ping_ms'], 3)} ms)", f"{_f(d['pause_overhead_vs_raw_rtt'], 1)}x", "<= 2x"),
        ("activation transfer vs raw loopback socket",
         f"{_f(d['activation_gb_s'], 3)} vs {_f(d['raw_socket_gb_s'], 3)} GB/s "
         f"({d['activation_bytes'] / 2**20:.1f} MiB)", _f(d["activation_vs_raw_bandwidth"]), ">= 0.50"),
    ]
    lines = [f"`{d['command']}` — {where}, torch {env['torch']}, transformers {env['transformers']}, "
             f"{d['model']}, median of {d['reps']}", "",
             "| what | measured | ratio | target |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {t} |" for a, b, c, t in rows]
    return "\n".join(lines)


TABLES = {"checkpoint_cuda": checkpoint_table, "checkpoint_cpu": checkpoint_table,
          "decode_cpu": decode_table}


def render(text: str) -> str:
    for name, fn in TABLES.items():
        if not (RESULTS / f"{name}.json").exists():
            continue
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + fn(name) + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README benchmark tables are out of date: run python bench/report.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
