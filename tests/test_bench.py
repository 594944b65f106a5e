"""Benchmarks cannot rot: each runs at a tiny size, and the README tables match the JSON."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_checkpoint_bench_smoke():
    out = subprocess.run([sys.executable, "bench/checkpoint_bench.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("{'context'")]
    assert len(rows) == 2 and "restore_continue_speedup" in rows[0]


def test_readme_tables_are_generated_from_results():
    out = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


def test_decode_bench_smoke():
    out = subprocess.run([sys.executable, "bench/decode_bench.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'hooks_vs_plain'" in out.stdout and "'activation_vs_raw_bandwidth'" in out.stdout
