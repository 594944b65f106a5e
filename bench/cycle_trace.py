"""Where one pause -> resume -> next pause cycle spends its time, from timestamps taken in
both processes (client and kernel server) on the same monotonic clock.

The production code carries no tracing. This script copies ``djinn_nb`` and
``kernel_server`` into a temporary directory, inserts ``mark(name)`` calls at the points
below (each insertion checks that its anchor line exists, so the script fails loudly when
the code it traces changes), runs a server and a client from that copy, and prints the
median of every segment between consecutive marks of a cycle:

    c_call     client: Session.resume() enters Client.call
    c_send     client: the request is encoded, about to be sent
    s_recv     server: the control thread has read the request frame
    s_parsed   server: JSON parsed, arguments checked, about to dispatch
    s_cmd      server: the session has handed "resume" to the generation thread
    w_wake     server: the generation thread is awake
    w_fwd_end  server: the step's forward pass (and its one host sync) is done
    w_step     server: the next step starts (between: the step's bookkeeping)
    w_pause    server: the hook pauses at the breakpoint
    s_reply    server: the reply is being encoded and sent (by the generation thread)
    s_sent     server: sent
    c_ready    client: the reply has started to arrive
    c_reply    client: the reply is decoded
    c_event    client: the Paused event object is built

    python bench/cycle_trace.py --model tiny-gpt2 --device cpu
    python bench/cycle_trace.py --model gpt2-124m-random --device cuda --out trace.json

Results: a table on stdout and, with ``--out``, the segments as JSON.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_TRACE_MODULE = '''import atexit, json, os, time
marks = []
def m(name):
    marks.append((name, time.perf_counter_ns()))
def dump():
    out = os.environ.get("DJINN_CYCLE_TRACE")
    if out and marks:
        with open(f"{out}.{os.getpid()}", "w") as f:
            json.dump(marks, f)
atexit.register(dump)
'''
_M = "from djinn_nb import _cycle_trace as _T; _T.m"

# (file, anchor, replacement): the anchor must occur in the file
PATCHES = [
    ("kernel_server/transport/control_listener.py",
     "                meta, payload = reader.read_meta(limit, timeout=FRAME_TIMEOUT)\n",
     f"                meta, payload = reader.read_meta(limit, timeout=FRAME_TIMEOUT)\n"
     f"                {_M}('s_recv')\n"),
    ("kernel_server/transport/control_listener.py",
     "            reply = dispatch(service, request[\"call\"], args)\n",
     f"            {_M}('s_parsed')\n            reply = dispatch(service, request[\"call\"], args)\n"),
    ("kernel_server/transport/control_listener.py", "    def _reply(conn: socket.socket, reply: dict) -> None:\n",
     f"    def _reply(conn: socket.socket, reply: dict) -> None:\n        {_M}('s_reply')\n"),
    ("kernel_server/transport/control_listener.py", "        send_frame(conn, meta.encode(), blobs)\n",
     f"        send_frame(conn, meta.encode(), blobs)\n        {_M}('s_sent')\n"),
    ("kernel_server/runtime/generation.py", "        self._deliver = deliver\n",
     f"        self._deliver = deliver\n        {_M}('s_cmd')\n"),
    ("kernel_server/runtime/generation.py",
     "                what = self._commands.get(timeout=self.pause_timeout)\n",
     f"                what = self._commands.get(timeout=self.pause_timeout)\n"
     f"                {_M}('w_wake')\n"),
    ("kernel_server/runtime/generation.py", "            self._emit(point.event())\n",
     f"            {_M}('w_pause')\n            self._emit(point.event())\n"),
    ("kernel_server/runtime/generation.py",
     "            t0 = time.perf_counter()\n            if sched is not None and self.step > 0:",
     f"            {_M}('w_step')\n            t0 = time.perf_counter()\n"
     "            if sched is not None and self.step > 0:"),
    ("kernel_server/runtime/generation.py", "            t1 = time.perf_counter()\n",
     f"            t1 = time.perf_counter()\n            {_M}('w_fwd_end')\n"),
    ("djinn_nb/control.py", "                sent = send_frame(self.sock, *request)\n",
     f"                {_M}('c_send')\n                sent = send_frame(self.sock, *request)\n"),
    ("djinn_nb/control.py", "                if not self._wait(self.timeout):\n"
                            "                    raise ReplyTimeout(f\"no reply within {self.timeout} s\")\n",
     "                if not self._wait(self.timeout):\n"
     "                    raise ReplyTimeout(f\"no reply within {self.timeout} s\")\n"
     f"                {_M}('c_ready')\n"),
    ("djinn_nb/client.py", "    def call(self, name: str, **kwargs):\n",
     f"    def call(self, name: str, **kwargs):\n        {_M}('c_call')\n"),
    ("djinn_nb/session.py",
     '            return self._event(self._request(name, **kwargs))\n',
     '            reply = self._request(name, **kwargs)\n'
     f"            {_M}('c_reply')\n            event = self._event(reply)\n            {_M}('c_event')\n"
     "            return event\n"),
]
ORDER = ["c_call", "c_send", "s_recv", "s_parsed", "s_cmd", "w_wake", "w_fwd_end", "w_step",
         "w_pause", "s_reply", "s_sent", "c_ready", "c_reply", "c_event"]


def traced_copy(dest: Path) -> None:
    for pkg in ("djinn_nb", "kernel_server"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "djinn_nb" / "_cycle_trace.py").write_text(_TRACE_MODULE)
    for rel, anchor, new in PATCHES:
        path = dest / rel
        text = path.read_text()
        if text.count(anchor) != 1:
            raise SystemExit(f"cycle_trace: the anchor for {rel} is gone or not unique:\n{anchor}")
        path.write_text(text.replace(anchor, new))


def client_run(args) -> None:
    """In the traced copy's interpreter: a server, a breakpoint after the last block, cycles."""
    import djinn_nb as dj
    from djinn_nb import _cycle_trace as T
    from djinn_nb.launcher import LocalServer
    extra = ["--threads", str(args.threads)] if args.threads else []
    srv = LocalServer(model=args.model, device=args.device, dtype=args.dtype, progress=False,
                      extra_args=extra)
    try:
        c = dj.connect(srv.address)
        assert c._control is not None, "no control channel"
        s = c.session()
        s.breakpoint(layer=s.layers - 1)
        for rep in range(args.reps + 1):
            if rep == 1:                      # the first generation warms up
                T.marks.clear()
            ev = s.generate("The capital of France is", max_new_tokens=args.tokens,
                            stop_at_eos=False)
            while isinstance(ev, dj.Paused):
                T.m("c_start")
                ev = s.resume()
        c.close()
    finally:
        srv.stop()
    T.dump()


def segments(files: list[str]) -> dict:
    marks = sorted((tuple(x) for f in files for x in json.load(open(f))), key=lambda x: x[1])
    cycles, cur = [], None
    for name, t in marks:
        if name == "c_start":
            if cur:
                cycles.append(cur)
            cur = []
        elif cur is not None:
            cur.append((name, t))
    if cur:
        cycles.append(cur)
    out = collections.defaultdict(list)
    # s_sent and c_ready race (the client may wake, and even start its next call, before
    # send returns): the reply's transit is s_reply -> c_ready, and s_reply -> s_sent is
    # paired over the whole stream
    chain = [n for n in ORDER if n != "s_sent"]
    for cyc in cycles:
        seen = {}
        for name, t in cyc:
            seen.setdefault(name, t)
        if any(n not in seen for n in chain):
            continue                 # the last cycle of a generation ends without a pause
        for a, b in zip(chain, chain[1:]):
            out[f"{a} -> {b}"].append((seen[b] - seen[a]) / 1e3)
        out["cycle (c_call -> c_event)"].append((seen["c_event"] - seen["c_call"]) / 1e3)
        out["compute (w_wake -> w_fwd_end, w_step -> w_pause)"].append(
            (seen["w_fwd_end"] - seen["w_wake"] + seen["w_pause"] - seen["w_step"]) / 1e3)
    reply = None
    for name, t in marks:
        if name == "s_reply":
            reply = t
        elif name == "s_sent" and reply is not None:
            out["s_reply -> s_sent (encode + send)"].append((t - reply) / 1e3)
            reply = None
    return {k: {"median_us": statistics.median(v), "p10_us": sorted(v)[len(v) // 10],
                "p90_us": sorted(v)[len(v) * 9 // 10], "n": len(v)} for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-gpt2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--out", default=None, help="JSON file for the segments")
    p.add_argument("--_client", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._client:
        client_run(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="djinn-trace-") as tmp:
        tmp = Path(tmp)
        traced_copy(tmp)
        path = [str(tmp), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
                   DJINN_CYCLE_TRACE=str(tmp / "marks"), HF_HUB_OFFLINE="1")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_client", "--model", args.model,
               "--device", args.device, "--tokens", str(args.tokens), "--reps", str(args.reps)]
        cmd += ["--dtype", args.dtype] if args.dtype else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        subprocess.run(cmd, env=env, cwd=tmp, check=True)
        time.sleep(0.5)                       # (the server writes its marks at exit)
        result = segments(glob.glob(str(tmp / "marks.*")))
    if not result:
        raise SystemExit("cycle_trace: no complete cycle was traced")
    width = max(len(k) for k in result)
    print(f"{'segment':{width}s}  median_us   p10_us   p90_us     n")
    for k, v in result.items():
        print(f"{k:{width}s}  {v['median_us']:9.1f} {v['p10_us']:8.1f} {v['p90_us']:8.1f} {v['n']:5d}")
    if args.out:
        from common import command_line, environment   # noqa: E402  (bench/common.py)
        import torch
        Path(args.out).write_text(json.dumps({
            "benchmark": "cycle_trace", "model": args.model, "device": args.device,
            "dtype": args.dtype, "date": __import__("datetime").date.today().isoformat(),
            "env": environment(torch.device(args.device)), "command": command_line(),
            "segments": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
