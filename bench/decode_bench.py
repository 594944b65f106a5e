"""Decode overhead of the kernel server, each against a baseline measured in the same run:

- hooks installed, no breakpoint hit, through the server  vs  a plain in-process HF decode loop
- one standing steering rule  vs  none (both through the server)
- pause -> resume -> next pause, client-observed, minus compute  vs  a raw socket round trip
- activation transfer to the client  vs  raw loopback socket bandwidth

    python bench/decode_bench.py --model smollm2-135m        # CPU, real weights
    python bench/decode_bench.py --smoke                     # tiny, proves the script runs
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_result  # noqa: E402

import djinn_nb as dj  # noqa: E402
from kernel_server.server import Kernel, KernelServer  # noqa: E402

PROMPT = "The capital of France is"


def plain_hf_ms_per_token(loaded, prompt_ids, n: int) -> float:
    """The reference: a plain KV-cache greedy loop, no hooks, in this process."""
    from transformers import DynamicCache
    model, dev = loaded.model, loaded.device
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([prompt_ids], device=dev)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                    logits_to_keep=1, **{loaded.cache_kwarg: cache})
        tok = out.logits[:, -1].argmax(-1)
        length = ids.shape[1]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            length += 1
            out = model(input_ids=tok.view(1, 1), attention_mask=torch.ones((1, length), dtype=torch.long, device=dev),
                        use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: cache})
            tok = out.logits[:, -1].argmax(-1)
            int(tok)
        return (time.perf_counter() - t0) * 1e3 / (n - 1)


def server_decode_ms(s, n: int) -> float:
    """Median decode forward per token from the step records (steps 1..), server side."""
    res = s.generate(PROMPT, max_new_tokens=n, stop_at_eos=False).result
    return statistics.median(r.forward_ms for r in res.steps[1:])


def raw_socket(nbytes: int, reps: int) -> tuple[float, float]:
    """(round trip ms of a 1-byte ping-pong, GB/s of an nbytes send) on loopback."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def echo():
        conn, _ = srv.accept()
        with conn:
            for _ in range(reps):
                conn.sendall(conn.recv(1))
            conn.sendall(b"x" * nbytes)
    th = threading.Thread(target=echo)
    th.start()
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        c.sendall(b"p")
        c.recv(1)
        rtts.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    got = 0
    buf = bytearray(1 << 20)
    while got < nbytes:
        got += c.recv_into(buf)
    secs = time.perf_counter() - t0
    c.close()
    th.join()
    srv.close()
    return statistics.median(rtts), nbytes / secs / 1e9


def run(args) -> dict:
    kernel = Kernel(args.model, device=args.device)
    loaded = kernel.models.get()
    prompt_ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    c = dj.connect(srv.address)
    s = c.session()                      # (installs the layer hooks on the shared model)
    plain, hooked, steered = [], [], []
    layer = min(6, s.layers - 1)
    for _ in range(args.reps):           # interleaved, so that drift hits all three alike
        plain.append(plain_hf_ms_per_token(loaded, prompt_ids, args.tokens))
        hooked.append(server_decode_ms(s, args.tokens))
        s.steer(layer=layer, scale=0.9)
        steered.append(server_decode_ms(s, args.tokens))
        s.clear_steering()
    # pause at every step: client-observed cycle minus the server's compute for that step
    s.breakpoint(layer=min(6, s.layers - 1))
    ev = s.generate(PROMPT, max_new_tokens=args.tokens, stop_at_eos=False)
    walls = []
    while isinstance(ev, dj.Paused):
        t0 = time.perf_counter()
        ev = s.resume()
        walls.append((time.perf_counter() - t0) * 1e3)
    compute = [r.forward_ms for r in ev.result.steps[1:]]
    overhead = statistics.median(w - f for w, f in zip(walls, compute))
    s.clear_breakpoints()
    # activation transfer: the whole prefill's hidden state of a long prompt
    s.breakpoint(layer=0, phase="prefill")
    long_prompt = " ".join(["token"] * args.activation_tokens)
    s.generate(long_prompt, max_new_tokens=1)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        h = s.activation()
        times.append(time.perf_counter() - t0)
    act_gbs = h.nbytes / statistics.median(times) / 1e9
    s.stop()
    raw_rtt, raw_gbs = raw_socket(h.nbytes, 200)
    rpc_rtt = statistics.median(c.ping() for _ in range(200))
    c.close()
    srv.close()
    med = statistics.median
    return {
        "benchmark": "decode", "model": args.model, "device": str(loaded.device),
        "env": environment(loaded.device), "tokens": args.tokens, "reps": args.reps,
        "plain_hf_ms_per_token": med(plain), "server_hooks_ms_per_token": med(hooked),
        "hooks_vs_plain": med(plain) / med(hooked),
        "steered_ms_per_token": med(steered), "steered_vs_unsteered": med(hooked) / med(steered),
        "pause_resume_overhead_ms": overhead, "raw_socket_rtt_ms": raw_rtt, "rpyc_ping_ms": rpc_rtt,
        "pause_overhead_vs_raw_rtt": overhead / raw_rtt,
        "activation_bytes": int(h.nbytes), "activation_gb_s": act_gbs, "raw_socket_gb_s": raw_gbs,
        "activation_vs_raw_bandwidth": act_gbs / raw_gbs,
        "command": " ".join(sys.argv),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--activation-tokens", type=int, default=1000)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.tokens, args.reps, args.activation_tokens = "tiny-gpt2", 4, 2, 20
    result = run(args)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "env"})
    if not args.smoke:
        print("wrote", write_result(f"decode_{torch.device(args.device).type}", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
