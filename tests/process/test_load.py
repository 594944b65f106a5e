"""Many clients at once: each gets exactly its solo tokens, nothing fails, nothing is left,
and the server process's memory comes back to where it was before the load."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

import djinn_nb as dj

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from soak import PROMPTS, one_round  # noqa: E402

#: a hang guard, never a timing expectation: the load is a fixed number of rounds per client,
#: however long they take; a client still busy after this long fails the test
HANG_GUARD = 300.0

#: how far the server's RSS may stay above its baseline after a load: allocator slack (glibc
#: keeps freed memory in per-thread arenas; with MALLOC_ARENA_MAX=1 the growth all but
#: vanishes). A round below holds ~5 MiB on the server (the KV cache of a ~600-token prompt,
#: a checkpoint of it, the activation), and a run has ~50 rounds: keeping what a round holds
#: alive (a generation, a checkpoint, a bulk transfer) would pass the margin several times.
RSS_MARGIN = 48 << 20
#: heavy rounds per client in each measured run: 8 x 6 = 48, the ~50 rounds the margin assumes
HEAVY_ROUNDS = 6
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


def light_round(s, index: int) -> list:
    """bench/soak.py's round: a client-specific steering vector, a pause on every step."""
    return one_round(s, PROMPTS[index % len(PROMPTS)], index, tokens=6)


def run_rounds(address: str, clients: int, rounds: int, round_fn) -> dict:
    """``clients`` threads, each on its own connection, all released at once by a barrier,
    each running ``round_fn(session, i)`` exactly ``rounds`` times and comparing the tokens
    with the same round run alone first (bench/soak.py does the same for a duration)."""
    with dj.connect(address) as c:
        s = c.session()
        solo = {i: round_fn(s, i) for i in range(clients)}
    stats = {"rounds": 0, "errors": [], "mismatches": 0}
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def worker(i: int):
        try:
            with dj.connect(address) as c:
                s = c.session()
                start.wait(timeout=HANG_GUARD)           # every client connected: go together
                for _ in range(rounds):
                    got = round_fn(s, i)
                    with lock:
                        stats["rounds"] += 1
                        stats["mismatches"] += got != solo[i]
        except Exception as exc:  # counted, reported
            with lock:
                stats["errors"].append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + HANG_GUARD
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"a client hung: {stats}"
    return stats


def settled(address: str) -> dict:
    """The server's counters once every client of the load has been released."""
    with dj.connect(address) as c:
        deadline = time.monotonic() + HANG_GUARD
        while c.call("hello")["server"]["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        return c.call("hello")["server"]          # (the server runs with --operator-stats)


def test_eight_clients_get_their_solo_tokens_and_memory_comes_back():
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--port", "0", "--operator-stats"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL,
                            text=True)
    try:
        address = proc.stdout.readline().split()[1]
        server = psutil.Process(proc.pid)
        stats = run_rounds(address, clients=8, rounds=3, round_fn=light_round)  # breakpoints + steering
        assert stats == {"rounds": 24, "errors": [], "mismatches": 0}, stats
        # memory: a warm-up at the same load first (worker threads, allocator arenas, caches)
        warm = run_rounds(address, clients=8, rounds=3, round_fn=heavy_round)
        assert warm == {"rounds": 24, "errors": [], "mismatches": 0}, warm
        settled(address)
        baseline = server.memory_info().rss
        rss, rounds = [], []
        for _ in range(2):
            heavy = run_rounds(address, clients=8, rounds=HEAVY_ROUNDS, round_fn=heavy_round)
            assert heavy == {"rounds": 8 * HEAVY_ROUNDS, "errors": [], "mismatches": 0}, heavy
            info = settled(address)          # every client closed: all released
            assert info["sessions"] == 0 and info["checkpoint_bytes"] == 0, info
            rss.append(server.memory_info().rss)
            rounds.append(heavy["rounds"])
        print(f"load: 8 clients, {stats['rounds']} rounds, 0 mismatches, 0 errors; "
              f"memory: server RSS {baseline / 2**20:.1f} MiB before, "
              f"{', '.join(f'{r / 2**20:.1f}' for r in rss)} MiB after runs of "
              f"{', '.join(map(str, rounds))} heavy rounds")
        assert all(r - baseline < RSS_MARGIN for r in rss), (baseline, rss)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
