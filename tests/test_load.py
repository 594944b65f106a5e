"""Many clients at once: each gets exactly its solo tokens, nothing fails, nothing is left,
and the server process's memory comes back to where it was before the load."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

import djinn_nb as dj

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from soak import run_load  # noqa: E402

#: how far the server's RSS may stay above its baseline after the load (allocator slack:
#: freed memory that malloc keeps for reuse, thread stacks of the pooled workers)
RSS_MARGIN = 48 << 20


def settled(address: str) -> dict:
    """The server's counters once every client of the load has been released."""
    with dj.connect(address) as c:
        deadline = time.monotonic() + 30
        while c._call("hello")["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        return c._call("hello")


def test_eight_clients_get_their_solo_tokens_and_memory_comes_back():
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        address = proc.stdout.readline().split()[1]
        server = psutil.Process(proc.pid)
        # warm-up at the same load: worker threads, allocator arenas, tokenizer caches
        warm = run_load(address, clients=8, seconds=3.0, tokens=6)
        assert warm["errors"] == [] and warm["mismatches"] == 0, warm
        settled(address)
        baseline = server.memory_info().rss
        rss = []
        for _ in range(2):
            stats = run_load(address, clients=8, seconds=6.0, tokens=6)
            assert stats["errors"] == []
            assert stats["rounds"] >= 8 and stats["mismatches"] == 0, stats
            info = settled(address)          # every client closed: all released
            assert info["sessions"] == 0 and info["checkpoint_bytes"] == 0, info
            rss.append(server.memory_info().rss)
        print(f"load: 8 clients, {stats['rounds']} rounds in 6 s, 0 mismatches, 0 errors; "
              f"server RSS baseline {baseline / 2**20:.1f} MiB, after each run "
              f"{', '.join(f'{r / 2**20:.1f}' for r in rss)} MiB")
        assert all(r - baseline < RSS_MARGIN for r in rss), (baseline, rss)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
