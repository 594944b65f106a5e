"""Many clients at once: each gets exactly its solo tokens, nothing fails, nothing is left."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import djinn_nb as dj

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from soak import run_load  # noqa: E402


def test_eight_clients_get_their_solo_tokens():
    from kernel_server.server import Kernel, KernelServer
    srv = KernelServer(Kernel("tiny-gpt2", device="cpu"), "127.0.0.1", 0).start()
    try:
        stats = run_load(srv.address, clients=8, seconds=8.0, tokens=6)
        assert stats["errors"] == []
        assert stats["rounds"] >= 8 and stats["mismatches"] == 0, stats
        with dj.connect(srv.address) as c:            # every client closed: all released
            deadline = time.monotonic() + 10
            while c._call("hello")["sessions"] and time.monotonic() < deadline:
                time.sleep(0.1)
            info = c._call("hello")
        assert info["sessions"] == 0 and info["checkpoint_bytes"] == 0, info
        print(f"load: {stats['rounds']} rounds by 8 clients in 8 s, 0 mismatches, 0 errors")
    finally:
        srv.close()
