"""Soak: legitimate clients and every issue-17 attack against one kernel server at once.

A ``python -m kernel_server`` subprocess (tiny-gpt2, float32, CPU, loopback, a token, capped
at 512 open files and 8 GiB of address space) serves clients that generate and check their
tokens against a solo run, while attackers flood connections, drip handshakes, send
header-only frames and uploads, leave exports unfetched, sit on bulk ports, load crafted
checkpoint files and ask for a model too big for the host. At the end a fresh client must
get its solo tokens, and the server's RSS is compared with its RSS after a warm-up.

    python -m bench.attack_soak --minutes 10      # (not in CI: tests/process/test_attacks.py is)

Writes bench/results/attack_soak.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

import djinn_nb as dj
from djinn_protocol import framing

TOKEN = "soak-token-0123456789abcdef"
PROMPT = "The capital of France is"
NEW = 8


def start_server():
    def caps():
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--device", "cpu", "--port", "0", "--log-level", "ERROR"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "DJINN_TOKEN": TOKEN}, preexec_fn=caps)
    line = proc.stdout.readline()
    if not line.startswith("DJINN_SERVER_READY"):
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split()[1]


def solo_tokens(address: str) -> list:
    with dj.connect(address, token=TOKEN) as c:
        return c.session().generate(PROMPT, max_new_tokens=NEW, stop_at_eos=False).tokens


class Soak:
    def __init__(self, address: str, reference: list, until: float):
        self.address, self.reference, self.until = address, reference, until
        self.host, self.port = address.rsplit(":", 1)[0], int(address.rsplit(":", 1)[1])
        self.counts: dict = {}
        self.errors: list = []
        self.mismatches = 0
        self._lock = threading.Lock()

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def loop(self, name, fn):
        def run():
            while time.monotonic() < self.until:
                try:
                    fn()
                    self.count(name)
                except Exception as exc:           # an attack's expected refusals are caught in fn
                    with self._lock:
                        self.errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:150]}")
                    time.sleep(0.5)
        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    # ---- legitimate work ----------------------------------------------------------------
    def legit(self):
        with dj.connect(self.address, token=TOKEN) as c:
            s = c.session()
            s.breakpoint(layer=4)
            assert s.generate(PROMPT, max_new_tokens=NEW, stop_at_eos=False).paused
            out = s.resume(ignore_breakpoints=True)
            if out.tokens != self.reference:
                with self._lock:
                    self.mismatches += 1

    # ---- attacks (each expects the server's refusal) -------------------------------------
    def flood(self):
        socks = []
        for _ in range(200):
            try:
                socks.append(socket.create_connection((self.host, self.port), timeout=5))
            except OSError:
                break
        time.sleep(1.0)
        for s in socks:
            s.close()

    def drip(self):
        with socket.create_connection((self.host, self.port), timeout=30) as s:
            s.recv(64)
            for _ in range(15):
                try:
                    s.sendall(b"x")
                except OSError:
                    return
                time.sleep(1.0)

    def frames(self):
        with dj.connect(self.address, token=TOKEN) as c:
            c.control_channel.sock.sendall(framing.HEADER.pack(60 << 20, 0))
            time.sleep(2.0)

    def uploads(self):
        with dj.connect(self.address, token=TOKEN) as c:
            socks = []
            for _ in range(4):
                up = c.call("begin_upload", nbytes=32 << 20)
                s = socket.create_connection((self.host, up["port"]), timeout=10)
                s.sendall(bytes.fromhex(up["nonce"]) + framing.LENGTH.pack(32 << 20))
                socks.append(s)
            time.sleep(2.0)
            for s in socks:
                s.close()

    def offers_and_strangers(self):
        with dj.connect(self.address, token=TOKEN) as c:
            s = c.session()
            s.generate(PROMPT, max_new_tokens=2)
            ck = s.checkpoint().wait()
            offers = []
            for _ in range(6):
                try:
                    offers.append(c.call("export_checkpoint", checkpoint=ck.id))
                except dj.LimitExceededError:
                    pass
            strangers = [socket.create_connection((self.host, o["port"]), timeout=10)
                         for o in offers[:2]]
            got = c.fetch_bulk(offers[0])          # a stranger on the port does not block it
            assert len(got) == offers[0]["nbytes"]
            with socket.create_connection((self.host, offers[1]["port"]), timeout=10) as cut:
                cut.sendall(bytes.fromhex(offers[1]["nonce"]))
                cut.recv(10)                        # cut off: that nonce is spent
            for st in strangers:
                st.close()

    def crafted(self):
        with dj.connect(self.address, token=TOKEN) as c:
            blob = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"[" * 16
            import tempfile
            with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
                f.write(blob)
                f.flush()
                try:
                    c.load_checkpoint(f.name)
                except dj.CheckpointError:
                    pass
            try:
                c.session(model="random:llama-70b")
            except dj.LimitExceededError:
                pass
            try:
                c.session(model="/etc")
            except dj.UnknownModelError:
                pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--legit-clients", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "attack_soak.json"))
    args = p.parse_args(argv)
    proc, address = start_server()
    server = psutil.Process(proc.pid)
    try:
        reference = solo_tokens(address)
        warm = Soak(address, reference, time.monotonic() + 20)   # warm-up: the same mix, short
        run_all(warm, args.legit_clients)
        rss_start = server.memory_info().rss
        t0 = time.monotonic()
        soak = Soak(address, reference, t0 + args.minutes * 60)
        run_all(soak, args.legit_clients)
        elapsed = time.monotonic() - t0
        time.sleep(5.0)                                             # offers and deadlines lapse
        fresh = solo_tokens(address)
        rss_end = server.memory_info().rss
        result = {
            "minutes": round(elapsed / 60, 2), "model": "tiny-gpt2", "dtype": "float32",
            "device": "cpu", "server_alive": proc.poll() is None,
            "rss_start_mib": round(rss_start / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_change": round(rss_end / rss_start - 1, 4),
            "fresh_client_solo_tokens": fresh == reference, "legit_mismatches": soak.mismatches,
            "counts": soak.counts, "errors": soak.errors[:20], "n_errors": len(soak.errors),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = (result["server_alive"] and result["fresh_client_solo_tokens"]
          and not result["legit_mismatches"] and abs(result["rss_change"]) <= 0.10)
    return 0 if ok else 1


def run_all(soak: Soak, legit_clients: int) -> None:
    threads = [soak.loop(f"legit-{i}", soak.legit) for i in range(legit_clients)]
    for name in ("flood", "drip", "frames", "uploads", "offers_and_strangers", "crafted"):
        threads.append(soak.loop(name, getattr(soak, name)))
    for t in threads:
        t.join()


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
