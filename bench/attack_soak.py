"""Soak: legitimate clients and every issue-17 attack against one kernel server at once.

A ``python -m kernel_server`` subprocess (tiny-gpt2, float32, CPU, loopback, a token, capped
at 512 open files and 8 GiB of address space) serves clients that generate and check their
tokens against a solo run, while attackers flood connections, drip handshakes, send
header-only frames and uploads, leave exports unfetched, sit on bulk ports, load crafted
checkpoint files and ask for a model too big for the host. At the end a fresh client must
get its solo tokens, and the server's RSS is compared with its RSS at the start: after a 20 s
warm-up of the same mix (the model's first passes, the first floods' threads); RSS is also
sampled every ``--sample-s`` seconds, so growth that continues shows apart from a step.

    python -m bench.attack_soak --minutes 10      # (not in CI: tests/process/test_attacks.py is)
    python -m bench.attack_soak --minutes 3 --diagnose heap.jsonl --out /tmp/x.json

Writes bench/results/attack_soak.json. ``--diagnose``: the server samples its own heap
(glibc mallinfo2), RSS by mapping, threads, descriptors, live objects of its classes and its
registries into a JSON-lines file, and trims its heap at the end (see ``diagnosed_server``).
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


SERVER_ARGS = ["--model", "tiny-gpt2", "--device", "cpu", "--port", "0", "--log-level", "ERROR"]


def start_server(diagnose: str | None = None):
    """The server subprocess; with ``diagnose`` (a path), the same server with a sampler
    thread that appends its memory figures there (``diagnosed_server``)."""
    def caps():
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    cmd = ([sys.executable, "-m", "bench.attack_soak", "--serve-diagnosed", diagnose, "--"]
           if diagnose else [sys.executable, "-m", "kernel_server"])
    proc = subprocess.Popen(cmd + SERVER_ARGS,
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


# ---- diagnosis: where the server's memory goes (--diagnose) -------------------------------------
def diagnosed_server(out_path: str, server_argv: list, interval: float = 10.0) -> int:
    """``kernel_server``'s main with a sampler thread that appends a JSON line to
    ``out_path`` every ``interval`` s: RSS, glibc's heap figures (mallinfo2), threads by name,
    open descriptors, live objects of the server's own classes (sessions, connections, bulk
    transfers, sockets, tensors), the kernel's registries. SIGUSR1: one sample, then
    ``malloc_trim(0)``, then another (what the allocator holds free but unreturned)."""
    import collections
    import ctypes
    import gc
    import signal

    libc = ctypes.CDLL("libc.so.6")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                  "usmblks", "fsmblks", "uordblks", "fordblks",
                                                  "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    me = psutil.Process()
    mine = ("Session", "Connection", "RpycService", "BulkTransfer", "socket", "SSLSocket",
            "Thread", "Timer", "Tensor", "Checkpoint", "Future", "Channel", "SocketStream",
            "_Stream", "LimitedChannel", "LoadedModel", "Run", "StepRecord")
    lock = threading.Lock()

    def smaps() -> dict:
        """RSS by kind of mapping (MiB): files (libraries), the main heap, anonymous maps by
        size (64 MiB: glibc thread arenas, 8 MiB: thread stacks, 1 MiB: Python arenas)."""
        out = collections.Counter()
        kind = None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    size = hi - lo
                    path = head[5] if len(head) > 5 else ""
                    kind = ("file" if path.startswith("/") else path if path else
                            "anon_64MiB" if size == 64 << 20 else
                            "anon_8MiB" if size in (8 << 20, (8 << 20) + 4096) else
                            "anon_1MiB" if size == 1 << 20 else
                            "anon_small" if size < 1 << 20 else "anon_other")
                elif head[0] == "Rss:":
                    out[kind] += int(head[1]) << 10
        return {k: round(v / 2**20, 1) for k, v in out.items() if v >= 1 << 20}

    def sample(tag: str) -> None:
        with lock:
            gc.collect()
            objs = gc.get_objects()
            counts = collections.Counter(type(o).__name__ for o in objs)
            kernels = [o for o in objs if type(o).__module__ == "kernel_server.kernel"
                       and type(o).__name__ == "Kernel"]
            servers = [o for o in objs if type(o).__name__ == "KernelServer"
                       and type(o).__module__.startswith("kernel_server")]
            controls = [o for o in objs if type(o).__name__ == "ControlServer"
                        and type(o).__module__.startswith("kernel_server")]
            storages = {}
            for o in objs:
                if type(o).__name__ == "Tensor":
                    try:
                        st = o.untyped_storage()
                        storages[st.data_ptr()] = st.nbytes()
                    except Exception:
                        pass
            del objs
            m = libc.mallinfo2()
            row = {"t": round(time.time(), 1), "tag": tag,
                   "rss_mib": round(me.memory_info().rss / 2**20, 1),
                   "heap": {k: round(getattr(m, k) / 2**20, 2)
                            for k in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost")},
                   "smaps": smaps(),
                   "fds": me.num_fds(), "threads": me.num_threads(),
                   "thread_names": dict(collections.Counter(
                       t.name.split("-")[0] + "-" + t.name.split("-")[1] if t.name.count("-") > 1
                       else t.name for t in threading.enumerate())),
                   "objects": {k: counts.get(k, 0) for k in mine},
                   "gc_objects": sum(counts.values()),
                   "tensor_mib": round(sum(storages.values()) / 2**20, 2)}
            if kernels:
                k = kernels[0]
                row["kernel"] = {"sessions": k.sessions.count(),
                                 "offer_principals": len(k._offers),
                                 "offers": sum(len(v) for v in k._offers.values()),
                                 "principals": len(k.owners._principals),
                                 "orphans": len(k.owners._orphans),
                                 "checkpoint_bytes": k.checkpoints.used_bytes}
            if servers:
                row["server"] = {"threads": len(servers[0]._threads),
                                 "sockets": len(servers[0]._sockets),
                                 "unauthenticated": servers[0].authenticator.pending}
            if controls:
                c = controls[0]
                row["control"] = {"pending": len(c._pending), "channels": len(c._channels),
                                  "gone": len(c._gone)}
            with open(out_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def trim(signum, frame):
        def run():
            sample("before_trim")
            libc.malloc_trim(0)
            sample("after_trim")
        threading.Thread(target=run, daemon=True).start()
    signal.signal(signal.SIGUSR1, trim)

    def loop():
        while True:
            time.sleep(interval)
            try:
                sample("periodic")
            except Exception as exc:          # (a diagnosis must not stop the server)
                with open(out_path, "a") as f:
                    f.write(json.dumps({"error": repr(exc)}) + "\n")
    threading.Thread(target=loop, name="diagnose", daemon=True).start()
    from kernel_server.cli import main as server_main
    return server_main(server_argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-diagnosed"]:              # (the server side of --diagnose)
        return diagnosed_server(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--legit-clients", type=int, default=3)
    p.add_argument("--sample-s", type=float, default=30.0, help="RSS sample interval")
    p.add_argument("--diagnose", default=None, metavar="JSONL",
                   help="also sample the server's heap, threads, objects there (slower)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "attack_soak.json"))
    args = p.parse_args(argv)
    if args.diagnose:
        Path(args.diagnose).unlink(missing_ok=True)
    proc, address = start_server(args.diagnose)
    server = psutil.Process(proc.pid)
    try:
        reference = solo_tokens(address)
        rss_ready = server.memory_info().rss
        warm = Soak(address, reference, time.monotonic() + 20)   # warm-up: the same mix, short
        run_all(warm, args.legit_clients)
        rss_start = server.memory_info().rss
        t0 = time.monotonic()
        soak = Soak(address, reference, t0 + args.minutes * 60)
        series = []
        stop_sampling = threading.Event()

        def sample():
            while not stop_sampling.wait(args.sample_s):
                series.append([round(time.monotonic() - t0), round(server.memory_info().rss / 2**20, 1)])
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run_all(soak, args.legit_clients)
        stop_sampling.set()
        elapsed = time.monotonic() - t0
        time.sleep(5.0)                                             # offers and deadlines lapse
        fresh = solo_tokens(address)
        rss_end = server.memory_info().rss
        if args.diagnose:
            os.kill(proc.pid, __import__("signal").SIGUSR1)        # a sample, malloc_trim, a sample
            time.sleep(20.0)
        result = {
            "minutes": round(elapsed / 60, 2), "model": "tiny-gpt2", "dtype": "float32",
            "device": "cpu", "server_alive": proc.poll() is None,
            "rss_ready_mib": round(rss_ready / 2**20, 1),
            "rss_start_mib": round(rss_start / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_change": round(rss_end / rss_start - 1, 4),
            "rss_series_s_mib": series,
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
