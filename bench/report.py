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


def multi_gpu_table(name: str) -> str:
    d = json.loads((RESULTS / f"{name}.json").read_text())
    env, lay = d["env"], d["layout"]
    gpus = env.get("gpus") or [env.get("gpu", "CPU")]
    yes = lambda c: "yes" if c else "**no**"  # noqa: E731
    lines = [f"`{d['command']}` — {len(gpus)} x {gpus[0]}, torch {env['torch']}, transformers "
             f"{env['transformers']}, {d['model']} {d['dtype']}: {lay['params'] / 1e9:.2f} B "
             f"parameters, {lay['layout']}, built in {d['build_s']:.1f} s", "",
             "| exactness check | where | tokens equal | logits bit-identical |",
             "| --- | --- | --- | --- |"]
    ex = d.get("exactness", {})
    where = ", ".join(f"layer {k} ({v})" for k, v in ex.get("probe_layers", {}).items())
    names = {"resume_no_edit": "breakpoints, resume with no edit", "steer_scale_1": "steer scale 1.0",
             "edit_equals_rule": "edit while paused == steering rule",
             "checkpoint_continue": "checkpoint mid-forward, continue",
             "checkpoint_restore": "restore the checkpoint, continue"}
    for key, label in names.items():
        if key in ex:
            e = ex[key]
            at = where
            if "layer" in e:
                at = f"layer {e['layer']} ({e.get('vector_device') or e.get('device')}), step {e['step']}"
            lines.append(f"| {label} | {at} | {yes(e['tokens_equal'])} | {yes(e['logits_equal'])} |")
    if "across_device_maps" in d:
        a = d["across_device_maps"]
        lines.append(f"| checkpoint file loaded under another map ({a['other_layout']}), continue | "
                     f"{a['file_bytes'] / 2**20:.1f} MiB file | {yes(a['tokens_equal'])} | "
                     f"{yes(a['logits_equal'])} |")
    if "decode" in d:
        dec = d["decode"]
        lines += ["", f"| decode ({dec['tokens']} tokens, median of {dec['reps']}) | ms/token | tokens/s |",
                  "| --- | --- | --- |"]
        for key, label in (("plain_hf_loop", "plain Hugging Face KV-cache loop, same sharded model"),
                           ("server_no_breakpoint", "server session, hooks installed, no breakpoint"),
                           ("server_breakpoint_every_step",
                            f"server session, breakpoint at layer {dec['breakpoint_layer']} "
                            f"({dec['breakpoint_device']}) on every step, resumed")):
            lines.append(f"| {label} | {_f(dec[key]['ms_per_token'])} | {_f(dec[key]['tokens_per_s'], 1)} |")
    if d.get("checkpoint"):
        lines += ["", "| context | device | layers | KV MiB | copy ms (devices at once) | GB/s | "
                  "copy alone GB/s | pinned D2H GB/s | alone / pinned | dispatch ms | restore ms (all) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in d["checkpoint"]:
            for dev, v in r["devices"].items():
                lines.append(
                    f"| {r['context']} | {dev} | {v['layers']} | {_f(v['kv_bytes'] / 2**20, 1)} | "
                    f"{_f(v['copy_ms_concurrent'], 2)} | {_f(v['copy_gb_s_concurrent'], 1)} | "
                    f"{_f(v['copy_gb_s_alone'], 1)} | {_f(v['pinned_d2h_gb_s'], 1)} | "
                    f"{_f(v['copy_alone_vs_pinned'])} | {_f(r['dispatch_ms_median'], 3)} | "
                    f"{_f(r['restore_ms'], 1)} |")
    return "\n".join(lines)


TABLES = {"checkpoint_cuda": checkpoint_table, "checkpoint_cpu": checkpoint_table,
          "decode_cpu": decode_table, "multi_gpu_cuda": multi_gpu_table}


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
