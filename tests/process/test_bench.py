"""Benchmarks cannot rot: each runs at a tiny size (JSON and plot written, the properties it
checks hold), the suite's CUDA command lines parse, and the tables of docs/performance.md
(linked from the README) match the JSON.
No timing is asserted anywhere."""
from __future__ import annotations

import importlib
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def smoke(script: str) -> tuple[dict, str]:
    """Run ``bench/<script> --smoke``; its result JSON (checked to exist with its PNG) and stdout."""
    out = subprocess.run([sys.executable, f"bench/{script}", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    wrote = [line for line in out.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1, out.stdout[-2000:]
    json_path, png_path = map(Path, wrote[0].split()[1:3])
    assert png_path.suffix == ".png" and png_path.stat().st_size > 1000
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "results" not in json_path.parts                  # a smoke run never overwrites results
    return json.loads(json_path.read_text()), out.stdout


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_checkpoint_bench_smoke():
    d, _ = smoke("checkpoint_bench.py")
    assert [r["context"] for r in d["rows"]] == [16, 64]
    for r in d["rows"]:
        assert finite(r["dispatch_ms_median"], r["copy_ms_median"], r["restore_ms_median"],
                      r["restore_continue_speedup"])


def test_decode_bench_smoke():
    d, _ = smoke("decode_bench.py")
    for key in ("hooks_vs_plain_e2e", "hooks_vs_plain_step", "steered_vs_unsteered_e2e"):
        assert finite(d[key]["median"]) and len(d[key]["all"]) == d["reps"]
    assert finite(d["raw_socket_rtt_ms"], d["control_ping_ms"], d["rpyc_ping_ms"],
                  d["activation_gb_s"], d["logits_gb_s"], d["raw_socket_gb_s"],
                  d["rpyc_activation_gb_s"])
    # the cycle's overhead is a wall time minus the server's compute, so it may be < 0 on a
    # noisy machine: it must be a real number, and the median of the cycles measured
    samples = d["pause_overhead_samples_ms"]
    assert len(samples) == 2                                   # steps 1-3 paused: 2 full cycles
    assert all(isinstance(x, float) and math.isfinite(x) for x in samples), samples
    assert d["pause_resume_overhead_ms"] == statistics.median(samples)
    assert d["pause_overhead_vs_raw_rtt"] == d["pause_resume_overhead_ms"] / d["pause_baseline_rtt_ms"]
    assert d["logits_bytes"] == 2 * 49152 * 4                  # 2 steps of float32 logits


def test_sweep_bench_smoke():
    d, _ = smoke("sweep_bench.py")
    assert d["tokens_match"] is True                           # checkpoint sweep == fresh runs
    assert d["prefix_not_recomputed"] is True and d["prefills_sweep"] == 1
    assert len(d["fresh_ms"]) == len(d["sweep_ms"]) == d["reps"]
    assert finite(d["sweep_speedup"])


def test_nnsight_bench_smoke():
    pytest.importorskip("nnsight", reason="the bench extra is not installed")
    d, _ = smoke("nnsight_bench.py")
    assert d["tokens_match"] is True                           # djinn_nb == nnsight == HF hook
    assert len(d["tokens_djinn"]) == d["tokens"]
    assert finite(d["djinn_vs_nnsight"]["median"], d["djinn_vs_hook"]["median"])


def test_suite_command_lines_parse_for_both_devices():
    """The commands ``python -m bench`` runs are valid for every script (the CUDA ones too,
    which cannot run here)."""
    sys.path.insert(0, str(BENCH))
    try:
        run_all = importlib.import_module("run_all")
        for argv, device in [(["--device", "cuda", "--model", "random:llama-7b", "--tag", "7b"],
                              "cuda"), (["--device", "cpu"], "cpu")]:
            cmds = run_all.commands(run_all.parse_args(argv))
            names = [name for name, _ in cmds]
            assert names[:4] == ["decode", "checkpoint", "sweep", "nnsight"], names
            for name, cmd in cmds:
                if name.startswith("fast_decode"):   # its owner's script and options
                    continue
                args = importlib.import_module(Path(cmd[0]).stem).parse_args(cmd[1:])
                assert args.device == device and not args.smoke
                if device == "cuda":
                    assert args.name == f"{name}_cuda_7b"
                else:             # the script's own default name and results directory
                    assert args.name is None and Path(args.out) == BENCH / "results"
                if device == "cuda" and name != "checkpoint":
                    assert args.model == "random:llama-7b" and args.dtype == "bfloat16"
    finally:
        sys.path.remove(str(BENCH))


def test_readme_tables_are_generated_from_results():
    """The generated tables live in docs/performance.md (the README links there and holds
    none, so no copy can drift)."""
    out = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
    page = (ROOT / "docs" / "performance.md").read_text()
    for name in ("decode_cpu", "checkpoint_cpu", "sweep_cpu", "nnsight_cpu", "cycle_trace_cpu"):
        assert f"<!-- bench:{name} -->" in page, name
    assert "<!-- bench:" not in (ROOT / "README.md").read_text()
    assert "docs/performance.md" in (ROOT / "README.md").read_text()


def test_report_renders_every_kind_and_leaves_unknown_blocks_alone(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        report = importlib.import_module("report")
    finally:
        sys.path.remove(str(BENCH))
    names = [p.stem for p in (BENCH / "results").glob("*.json")]
    kinds = {json.loads((BENCH / "results" / f"{n}.json").read_text()).get("benchmark") for n in names}
    assert {"decode", "checkpoint"} <= kinds
    text = "".join(f"<!-- bench:{n} -->\nold\n<!-- /bench:{n} -->\n" for n in names)
    text += "<!-- bench:nothing-here -->\nkept\n<!-- /bench:nothing-here -->\n"
    new = report.render(text)
    for n in names:
        block = re.search(rf"<!-- bench:{n} -->\n(.*?)<!-- /bench:{n} -->", new, re.S).group(1)
        kind = json.loads((BENCH / "results" / f"{n}.json").read_text()).get("benchmark")
        if kind in report.RENDERERS:
            assert block.startswith("`") and "| --- |" in block, n     # a generated table
        else:
            assert block == "old\n", n
    assert "kept\n" in new


def test_cycle_trace_smoke(tmp_path):
    """The pause-cycle trace patches a copy of the code at anchors that must still exist,
    and every segment of a cycle is measured."""
    out = tmp_path / "trace.json"
    run = subprocess.run([sys.executable, "bench/cycle_trace.py", "--reps", "1", "--tokens", "6",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    segments = json.loads(out.read_text())["segments"]
    assert segments["cycle (c_call -> c_event)"]["n"] >= 4          # steps 2..5 paused
    for a, b in [("c_call", "c_send"), ("s_recv", "s_parsed"), ("s_cmd", "w_wake"),
                 ("w_pause", "s_reply"), ("s_reply", "c_ready"), ("c_reply", "c_event")]:
        assert finite(segments[f"{a} -> {b}"]["median_us"])


def test_batch_rows_check_runs():
    """The GPU check of batch rows (bench/batch_rows_check.py) runs on CPU tiny-gpt2 and its
    checks hold there: rows equal solo and row checkpoints continue, bit for bit."""
    run = subprocess.run([sys.executable, "bench/batch_rows_check.py", "--tokens", "6", "--cut", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["interrupted_after"] == [2] * out["rows"]
    assert len(out["rows_equal_solo_bitwise"]) == 8


def test_sweep_exact_check_runs():
    """The GPU check of the incremental sweep (bench/sweep_exact_check.py) runs on CPU
    tiny-gpt2 in bfloat16 against float32: the sweep stays incremental (no fall-back) and its
    grid is as close to the float32 one as the whole-prompt rows grid."""
    run = subprocess.run([sys.executable, "bench/sweep_exact_check.py", "--dtype", "bfloat16",
                          "--reference-dtype", "float32", "--sites", "resid,mlp"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert [r["site"] for r in rows] == ["resid", "mlp"]
    for r in rows:
        assert r["ok"] and r["method"] == "incremental"
        assert r["incremental_vs_reference"] <= max(1.5 * r["rows_vs_reference"], r["tolerance"])
