"""A bounded load/soak run: N clients, each looping generate-with-breakpoint-and-steer,
checking every result against its solo run. Used by tests/test_load.py at small size.

    python bench/soak.py --address 127.0.0.1:18861 --clients 8 --seconds 600
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import djinn_nb as dj  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "In 1492, Columbus", "The best way to"]


def one_round(s, prompt: str, index: int, tokens: int) -> list:
    """Steer by a client-specific vector, pause at layer 2 on every step, read and resume."""
    s.clear_breakpoints()
    s.clear_steering()
    vec = np.random.default_rng(index).standard_normal(s.hidden_size).astype(np.float32)
    s.steer(layer=1, add=vec, alpha=2.0)
    s.breakpoint(layer=2)
    ev = s.generate(prompt, max_new_tokens=tokens, stop_at_eos=False)
    while isinstance(ev, dj.Paused):
        s.activation(positions="last", reduce="norm")
        ev = s.resume()
    return ev.tokens


def run_load(address: str, clients: int = 8, seconds: float = 10.0, tokens: int = 6,
             model: str | None = None, round_fn=None) -> dict:
    """``clients`` threads, each with its own connection, looping ``round_fn(session, i)``
    (default: ``one_round``) for ``seconds`` and comparing each round's tokens with the same
    round run alone first."""
    if round_fn is None:
        def round_fn(s, i):
            return one_round(s, PROMPTS[i % len(PROMPTS)], i, tokens)
    # the solo runs: one client at a time
    with dj.connect(address) as c:
        s = c.session(model=model)
        solo = {i: round_fn(s, i) for i in range(clients)}
    stats = {"rounds": 0, "errors": [], "mismatches": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(i: int):
        try:
            with dj.connect(address) as c:
                s = c.session(model=model)
                while time.monotonic() < deadline:
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
    for t in threads:
        t.join(seconds + 300)
    with dj.connect(address) as c:
        info = c.call("hello")
    info = info.get("server", info)      # server-wide with --operator-stats, else this client's
    stats.update(clients=clients, seconds=seconds, sessions_left=info["sessions"],
                 checkpoint_bytes_left=info["checkpoint_bytes"])
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)
    stats = run_load(args.address, args.clients, args.seconds, model=args.model)
    print(json.dumps(stats, indent=2))
    return 0 if not stats["errors"] and not stats["mismatches"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
