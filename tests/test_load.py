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

#: how far the server's RSS may stay above its baseline after a load: allocator slack (glibc
#: keeps freed memory in per-thread arenas; with MALLOC_ARENA_MAX=1 the growth all but
#: vanishes). A round below holds ~5 MiB on the server (the KV cache of a ~600-token prompt,
#: a checkpoint of it, the activation), and a run has ~50 rounds: keeping what a round holds
#: alive (a generation, a checkpoint, a bulk transfer) would pass the margin several times.
RSS_MARGIN = 48 << 20
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)


def heavy_round(s, index: int) -> list:
    """Steer, pause in the prefill and at a decode step, read the whole paused chunk (bulk
    path), checkpoint and delete it; the tokens."""
    s.clear_breakpoints()
    s.clear_steering()
    s.steer(layer=1, scale=0.9 + 0.01 * index)
    s.breakpoint(layer=2, phase="both", steps=[0, 3])
    ev = s.generate(LONG_PROMPT, max_new_tokens=6, stop_at_eos=False)
    while ev.paused:
        assert s.activation().shape[1] == s.hidden_size
        ev = s.resume()
    s.checkpoint().wait().delete()
    return ev.tokens


def heavy_load(address: str, clients: int, seconds: float) -> dict:
    return run_load(address, clients, seconds, round_fn=heavy_round)


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
        stats = run_load(address, clients=8, seconds=6.0, tokens=6)   # breakpoints + steering
        assert stats["errors"] == []
        assert stats["rounds"] >= 8 and stats["mismatches"] == 0, stats
        # memory: a warm-up at the same load first (worker threads, allocator arenas, caches)
        warm = heavy_load(address, clients=8, seconds=3.0)
        assert warm["errors"] == [] and warm["mismatches"] == 0, warm
        settled(address)
        baseline = server.memory_info().rss
        rss, rounds = [], []
        for _ in range(2):
            heavy = heavy_load(address, clients=8, seconds=6.0)
            assert heavy["errors"] == [] and heavy["rounds"] >= 8 and heavy["mismatches"] == 0, heavy
            info = settled(address)          # every client closed: all released
            assert info["sessions"] == 0 and info["checkpoint_bytes"] == 0, info
            rss.append(server.memory_info().rss)
            rounds.append(heavy["rounds"])
        print(f"load: 8 clients, {stats['rounds']} rounds in 6 s, 0 mismatches, 0 errors; "
              f"memory: server RSS {baseline / 2**20:.1f} MiB before, "
              f"{', '.join(f'{r / 2**20:.1f}' for r in rss)} MiB after runs of "
              f"{', '.join(map(str, rounds))} heavy rounds")
        assert all(r - baseline < RSS_MARGIN for r in rss), (baseline, rss)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
