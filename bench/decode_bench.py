"""Decode and transport overhead of the kernel server, each against a baseline measured in
the same run:

- decode through the kernel server (hooks installed, no breakpoint hit), client-observed,
  vs a plain Hugging Face KV-cache loop on the same model in the benchmark's process;
- one standing steering rule vs none (both through the server);
- pause -> resume -> next pause at every step, client-observed, minus the server's compute
  of that step, vs a raw loopback socket round trip (and the rpyc path for reference);
- activation and logits transfer to the client vs raw loopback socket bandwidth.

The server runs in its own process (``python -m kernel_server``, as ``dj.connect()`` starts
it), so client and server do not share an interpreter; the raw socket baseline is a plain
Python echo server in another process too. Decode timings are interleaved (plain, hooked, steered, then the reverse order in the next
repetition) after a warm-up round, and each ratio is the median of per-repetition ratios, so
that drift on a shared machine hits both sides of a ratio alike.

    python bench/decode_bench.py --device cpu --model smollm2-135m
    python bench/decode_bench.py --device cuda --model random:llama-1b --dtype bfloat16
    python bench/decode_bench.py --smoke          # tiny model, proves the script runs
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (command_line, connect, environment, finish, load_local, paired_ratio,  # noqa: E402
                    pyplot, raw_loopback, RawEcho, RESULTS, save_plot, start_server, sync)

import djinn_nb as dj  # noqa: E402

PROMPT = "The capital of France is"
med = statistics.median


def plain_decode(loaded, prompt_ids, n: int) -> tuple[float, list]:
    """The reference: a plain greedy KV-cache loop, no hooks, in this process, timed like
    the server's generation (prefill included; one host sync per token). Returns the total
    ms and the ms of each decode step."""
    from transformers import DynamicCache
    model, dev = loaded.model, loaded.device
    steps = []
    with torch.inference_mode():
        sync(dev)
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([prompt_ids], device=dev)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                    logits_to_keep=1, **{loaded.cache_kwarg: cache})
        tok = out.logits[:, -1].argmax(-1)
        int(tok)
        length = ids.shape[1]
        for _ in range(n - 1):
            t1 = time.perf_counter()
            length += 1
            out = model(input_ids=tok.view(1, 1),
                        attention_mask=torch.ones((1, length), dtype=torch.long, device=dev),
                        use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: cache})
            tok = out.logits[:, -1].argmax(-1)
            int(tok)
            steps.append((time.perf_counter() - t1) * 1e3)
        return (time.perf_counter() - t0) * 1e3, steps


def server_decode(s, prompt_ids, n: int) -> tuple[float, list]:
    """The same generation through the kernel server: client-observed total ms, and the
    server's forward ms of each decode step (from the step records)."""
    t0 = time.perf_counter()
    res = s.generate(prompt_ids, max_new_tokens=n, stop_at_eos=False).result
    total = (time.perf_counter() - t0) * 1e3
    assert len(res.tokens) == n
    return total, [r.forward_ms for r in res.steps[1:]]


def decode_rounds(s, loaded, prompt_ids, args) -> dict:
    layer = min(args.layer, s.layers - 1)
    runs = {"plain": [], "hooked": [], "steered": []}

    def one(kind):
        gc.collect()
        if kind == "plain":
            return plain_decode(loaded, prompt_ids, args.tokens)
        if kind == "steered":
            s.steer(layer=layer, scale=0.9)
            try:
                return server_decode(s, prompt_ids, args.tokens)
            finally:
                s.clear_steering()
        return server_decode(s, prompt_ids, args.tokens)

    for kind in runs:                       # warm-up: caches, allocator, thread pools
        one(kind)
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for kind in order:
            runs[kind].append(one(kind))
    total = {k: [t for t, _ in v] for k, v in runs.items()}
    step = {k: [med(st) for _, st in v] for k, v in runs.items()}
    return {
        "layer": layer,
        "plain_total_ms": total["plain"], "hooked_total_ms": total["hooked"],
        "steered_total_ms": total["steered"],
        "plain_step_ms": step["plain"], "hooked_step_ms": step["hooked"],
        "steered_step_ms": step["steered"],
        # tokens/s ratios (>1: the server is faster), paired repetition by repetition
        "hooks_vs_plain_e2e": paired_ratio(total["plain"], total["hooked"]),
        "hooks_vs_plain_step": paired_ratio(step["plain"], step["hooked"]),
        "steered_vs_unsteered_e2e": paired_ratio(total["hooked"], total["steered"]),
        "steered_vs_unsteered_step": paired_ratio(step["hooked"], step["steered"]),
    }


def pause_cycle(s, prompt_ids, n: int) -> list:
    """Client-observed ``resume()`` walls with a breakpoint after the last decoder block on
    every decode step, minus the server's compute: the overhead of one cycle. Each wall runs
    the tail of one step (final norm, head, pick) and the blocks of the next step up to the
    pause, so it is paired with that next step's forward time (the same blocks, timed on the
    server in the same run; the two tails are alike): compute jitter cancels."""
    s.breakpoint(layer=s.layers - 1)
    ev = s.generate(prompt_ids, max_new_tokens=n, stop_at_eos=False)
    walls = []
    while isinstance(ev, dj.Paused):
        t0 = time.perf_counter()
        ev = s.resume()
        walls.append((time.perf_counter() - t0) * 1e3)
    s.clear_breakpoints()
    steps = ev.result.steps
    # walls[i]: from the pause in step i+1 to the pause in step i+2 (the last one: to the end)
    return [walls[i] - steps[i + 2].forward_ms for i in range(len(walls) - 1)]


class RawStep:
    """The floor of a pause cycle without djinn_nb (bench/raw_step_server.py in its own
    process): raw socket round trips around one decode step of the same model each."""

    def __init__(self, model: str, device: str, dtype: str):
        import socket
        import subprocess
        script = Path(__file__).resolve().parent / "raw_step_server.py"
        self.proc = subprocess.Popen([sys.executable, str(script), "--model", model, "--device",
                                      device, "--dtype", dtype], stdout=subprocess.PIPE, text=True)
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cycle(4)                          # warm-up

    def cycle(self, n: int) -> list:
        import struct
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            self.sock.sendall(b"s")
            data = b""
            while len(data) < 8:
                data += self.sock.recv(8 - len(data))
            wall = (time.perf_counter() - t0) * 1e3
            if i:                              # (the first may be a prefill)
                out.append(wall - struct.unpack("!d", data)[0])
        return out

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=60)


def activation_rate(s, prompt_ids, reps: int) -> tuple[int, float, list]:
    """GB/s of reading the whole prefill hidden state of a long prompt while paused."""
    s.breakpoint(layer=0, phase="prefill")
    s.generate(prompt_ids, max_new_tokens=1)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        h = s.activation()
        times.append(time.perf_counter() - t0)
    s.stop()
    s.clear_breakpoints()
    assert h.dtype == np.float32
    return int(h.nbytes), h.nbytes / med(times[1:]) / 1e9, times[1:]


def logits_rate(s, prompt_ids, steps: int, reps: int) -> dict:
    """A finished result carrying ``steps`` rows of full-vocabulary float32 logits: pause at
    the last step, then time ``stop()``, whose reply is that result; the same without logits
    (interleaved) gives the part of the time the logits cost (stacking, sending, receiving).
    GB/s: bytes over that part (``gb_s``) and over the whole ``stop()`` (``e2e_gb_s``)."""
    s.breakpoint(layer=0, steps=[steps])
    times = {True: [], False: []}
    for rep in range(reps + 1):
        for with_logits in ((True, False) if rep % 2 else (False, True)):
            s.generate(prompt_ids, max_new_tokens=steps + 1, stop_at_eos=False,
                       return_logits=with_logits)
            t0 = time.perf_counter()
            res = s.stop().result
            if rep:
                times[with_logits].append(time.perf_counter() - t0)
            if with_logits:
                nbytes = int(res.logits.nbytes)
                assert res.logits.shape[0] == steps
    s.clear_breakpoints()
    with_, without = med(times[True]), med(times[False])
    return {"bytes": nbytes, "gb_s": nbytes / max(with_ - without, 1e-9) / 1e9,
            "e2e_gb_s": nbytes / with_ / 1e9, "stop_ms": with_ * 1e3,
            "stop_without_logits_ms": without * 1e3}


def run(args) -> dict:
    srv = start_server(args.model, args.device, args.dtype)      # its own process
    fast = connect(srv.address)                  # the control channel
    slow = connect(srv.address, control=False)   # every call over rpyc, for reference
    assert fast._control is not None and slow._control is None
    s, r = fast.session(), slow.session()        # (installs the layer hooks on the server's model)
    loaded = load_local(args.model, s.device, s.dtype)   # the plain loop's copy, in this process
    prompt_ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    long_ids = loaded.tokenizer(" ".join(["token"] * args.activation_tokens),
                                add_special_tokens=False)["input_ids"][:args.activation_tokens]
    out = {"benchmark": "decode", "model": args.model, "device": str(loaded.device),
           "dtype": str(loaded.dtype).removeprefix("torch."), "env": environment(loaded.device),
           "tokens": args.tokens, "reps": args.reps, "layers": s.layers,
           "prompt_tokens": len(prompt_ids), "command": command_line()}
    out.update(decode_rounds(s, loaded, prompt_ids, args))
    print("decode done", {k: round(v["median"], 4) for k, v in out.items()
                          if isinstance(v, dict) and "median" in v}, flush=True)

    out["pause_layer"] = s.layers - 1            # (a breakpoint after the last block)
    echo = RawEcho()
    floor = RawStep(args.model, s.device, s.dtype)
    control, rpyc, raw_rtt, floor_overhead = [], [], [], []
    for rep in range(args.cycle_reps):           # interleaved with their baselines
        raw_rtt += echo.rtts(100)
        control += pause_cycle(s, prompt_ids, args.cycle_tokens)
        rpyc += pause_cycle(r, prompt_ids, args.cycle_tokens)
        floor_overhead += floor.cycle(args.cycle_tokens)
        raw_rtt += echo.rtts(100)
    floor.close()
    out["pause_overhead_samples_ms"] = control
    out["pause_resume_overhead_ms"] = med(control)
    out["rpyc_pause_resume_overhead_ms"] = med(rpyc)
    out["raw_step_overhead_ms"] = med(floor_overhead)
    out["raw_socket_rtt_ms"] = med(raw_rtt)
    out["raw_socket_rtt_p10_p90_ms"] = [float(np.percentile(raw_rtt, 10)),
                                        float(np.percentile(raw_rtt, 90))]
    pings = {"control": [], "rpyc": [], "raw": []}
    for _ in range(5):
        pings["raw"] += echo.rtts(args.pings // 5)
        pings["control"] += [fast.ping() for _ in range(args.pings // 5)]
        pings["rpyc"] += [slow.ping() for _ in range(args.pings // 5)]
    echo.close()
    out["control_ping_ms"] = med(pings["control"])
    out["rpyc_ping_ms"] = med(pings["rpyc"])
    out["raw_socket_rtt_ping_phase_ms"] = med(pings["raw"])

    act_bytes, act_gbs, _ = activation_rate(s, long_ids, args.reps)
    raw_act = raw_loopback(act_bytes, max(args.reps, 5))
    _, rpyc_act_gbs, _ = activation_rate(r, long_ids, args.reps)
    logits = logits_rate(s, prompt_ids, args.logit_steps, args.reps)
    logit_bytes, logit_gbs = logits["bytes"], logits["gb_s"]
    raw_logits = raw_loopback(logit_bytes, max(args.reps, 5))
    # the pause cycle's baseline: the faster of the two samplings of the raw round trip (it
    # swings with the VM's idle state), so a slow baseline never flatters the ratio
    out["pause_baseline_rtt_ms"] = min(out["raw_socket_rtt_ms"], out["raw_socket_rtt_ping_phase_ms"])
    out.update({
        "pause_overhead_vs_raw_rtt": out["pause_resume_overhead_ms"] / out["pause_baseline_rtt_ms"],
        "pause_overhead_vs_raw_step": out["pause_resume_overhead_ms"] / out["raw_step_overhead_ms"],
        "control_ping_vs_raw_rtt": out["control_ping_ms"] / out["raw_socket_rtt_ping_phase_ms"],
        "activation_bytes": act_bytes, "activation_gb_s": act_gbs,
        "rpyc_activation_gb_s": rpyc_act_gbs,
        "raw_socket_gb_s": raw_act["gb_s"], "activation_vs_raw_bandwidth": act_gbs / raw_act["gb_s"],
        "logits_bytes": logit_bytes, "logits_gb_s": logit_gbs,
        "logits_e2e_gb_s": logits["e2e_gb_s"], "logits_stop_ms": logits["stop_ms"],
        "logits_stop_without_logits_ms": logits["stop_without_logits_ms"],
        "raw_socket_logits_gb_s": raw_logits["gb_s"],
        "logits_vs_raw_bandwidth": logit_gbs / raw_logits["gb_s"],
    })
    # the old names, kept for the README table
    out["plain_hf_ms_per_token"] = med(out["plain_step_ms"])
    out["server_hooks_ms_per_token"] = med(out["hooked_step_ms"])
    out["steered_ms_per_token"] = med(out["steered_step_ms"])
    out["hooks_vs_plain"] = out["hooks_vs_plain_e2e"]["median"]
    out["steered_vs_unsteered"] = out["steered_vs_unsteered_e2e"]["median"]
    fast.close()
    slow.close()
    srv.close()
    return out


def plot(d: dict, name: str, out_dir: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    kinds = [("plain", "plain HF loop"), ("hooked", "server, hooks"), ("steered", "server, 1 rule")]
    per_token = [np.array(d[f"{k}_total_ms"]) / d["tokens"] for k, _ in kinds]
    ax[0].boxplot(per_token, showfliers=True)
    ax[0].set_xticks(range(1, 4), [label for _, label in kinds])
    ax[0].set_ylabel("ms per generated token (client-observed)")
    ax[0].set_title(f"decode: hooks/plain {d['hooks_vs_plain']:.3f}, "
                    f"steered/none {d['steered_vs_unsteered']:.3f}")
    rtt = d["pause_baseline_rtt_ms"]
    bars = {"raw socket\nRTT": rtt, "raw socket\n+ step": d["raw_step_overhead_ms"],
            "control\nping": d["control_ping_ms"], "cycle\n(control)": d["pause_resume_overhead_ms"],
            "rpyc\nping": d["rpyc_ping_ms"], "cycle\n(rpyc)": d["rpyc_pause_resume_overhead_ms"]}
    ax[1].bar(list(bars), list(bars.values()), color=["grey", "grey", "C0", "C0", "C1", "C1"])
    ax[1].axhline(2 * rtt, ls="--", color="k", lw=1, label="target: 2x raw RTT")
    ax[1].set_ylabel("ms")
    ax[1].set_title(f"pause->resume->pause beyond compute: {d['pause_overhead_vs_raw_rtt']:.1f}x raw RTT")
    ax[1].legend()
    rates = {"raw, activation\nsize": d["raw_socket_gb_s"], "activation\n(control)": d["activation_gb_s"],
             "activation\n(rpyc+bulk)": d["rpyc_activation_gb_s"],
             "raw, logits\nsize": d["raw_socket_logits_gb_s"], "logits\n(control)": d["logits_gb_s"]}
    ax[2].bar(list(rates), list(rates.values()), color=["grey", "C0", "C1", "grey", "C0"])
    ax[2].plot([-0.4, 2.4], [0.5 * d["raw_socket_gb_s"]] * 2, ls="--", color="k", lw=1,
               label="target: 50% of raw")
    ax[2].plot([2.6, 4.4], [0.5 * d["raw_socket_logits_gb_s"]] * 2, ls="--", color="k", lw=1)
    ax[2].set_ylabel("GB/s")
    ax[2].set_title(f"transfer: activation {d['activation_vs_raw_bandwidth']:.0%}, "
                    f"logits {d['logits_vs_raw_bandwidth']:.0%} of raw")
    ax[2].legend()
    fig.suptitle(f"{d['model']} on {d['env'].get('gpu', 'CPU')} ({d['command']})", fontsize=9)
    return save_plot(fig, name, out_dir)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the server's)")
    p.add_argument("--tokens", type=int, default=24, help="tokens per timed generation")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--layer", type=int, default=6, help="steering layer")
    p.add_argument("--cycle-tokens", type=int, default=24)
    p.add_argument("--cycle-reps", type=int, default=3)
    p.add_argument("--pings", type=int, default=500)
    p.add_argument("--activation-tokens", type=int, default=1000)
    p.add_argument("--logit-steps", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--name", default=None, help="result name (default decode_<device>)")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few reps, no result file")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.tokens, args.reps = "tiny-gpt2", "cpu", 4, 2
        args.cycle_tokens, args.cycle_reps, args.pings = 4, 1, 20
        args.activation_tokens, args.logit_steps = 20, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    return finish(args, result, "decode", plot)


if __name__ == "__main__":
    raise SystemExit(main())
