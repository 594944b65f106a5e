"""Many clients on one model: 1, 2, 4, 8 client processes on one kernel server, each its
own session with a standing rule, all started at once, against Hugging Face batched
``generate`` of the same prompts in the same run.

- engine on (``DJINN_TENANTS=on``, kernel_server/runtime/scheduler.py): every client's
  decode steps are rows of one batched step; each client's tokens and logits are compared
  bit for bit with that prompt's solo run (one client alone, the same engine);
- engine off (each run decodes on its own under the model's lock): 1 and 8 clients, the
  figures before the engine, and what a solo session pays for the engine (1 client on vs
  off, each the median of ``--solo-reps`` runs);
- HF: ``model.generate`` of the same prompts, left-padded, greedy, in this process;
- sweep (engine on): 8 scales from one checkpoint, as 8 sequential forks of one client
  against 8 clients that each load the checkpoint's file and resume together (their
  decode steps are rows of one batched step); tokens compared scale by scale;
- join stall (engine on): a client decoding while another joins with a long prompt:
  the running client's slowest step against its median, and the joiner's prefill alone,
  measured warm (the second of two joins; the first, with its first-use costs, is kept);
  with the prompt prefilled in chunks (the default) and in one forward
  (``DJINN_PREFILL_CHUNK=0``, a second server);
- paused neighbour (engine on): N-1 clients running beside an N-th session paused for the
  whole run vs the same N-1 alone (aggregate tokens/s ratio).

Aggregate tokens/s = clients x tokens / (last client's end - first client's start).

    python bench/tenants_bench.py --device cuda --model random:llama-7b --dtype bfloat16
    python bench/tenants_bench.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, environment, finish, pyplot, RESULTS, save_plot  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time there was a", "1, 2, 3, 4, 5,",
           "def fibonacci(n):", "The quick brown fox jumps over", "In the beginning",
           "Dear Sir or Madam, I am writing", "Water boils at a temperature of"]


# ---- a client process ---------------------------------------------------------------------
def client_main(args) -> int:
    import djinn_nb as dj
    c = dj.connect(args.client)
    s = c.session()
    s.steer(layer=args.layer, scale=0.9)
    s.generate(args.prompt, max_new_tokens=2, stop_at_eos=False)          # warm-up
    print("ready", flush=True)
    sys.stdin.readline()                                                   # "go"
    t0 = time.time()
    res = s.generate(args.prompt, max_new_tokens=args.tokens, stop_at_eos=False,
                     return_logits=True).result
    t1 = time.time()
    np.save(args.save + ".npy", res.logits)
    Path(args.save + ".json").write_text(json.dumps({"tokens": res.tokens, "t0": t0, "t1": t1}))
    c.close()
    return 0


def run_clients(address: str, prompts: list, args, tmp: Path) -> list:
    """One process per prompt, started together; [(tokens, logits, t0, t1)]."""
    procs = []
    for i, prompt in enumerate(prompts):
        save = str(tmp / f"c{len(os.listdir(tmp))}_{i}")
        cmd = [sys.executable, __file__, "--client", address, "--prompt", prompt,
               "--tokens", str(args.tokens), "--layer", str(args.layer), "--save", save]
        procs.append((subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True), save))
    for p, _ in procs:
        line = p.stdout.readline()
        assert line.strip() == "ready", f"client failed to start: {line!r}"
    for p, _ in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p, save in procs:
        assert p.wait(timeout=900) == 0
        meta = json.loads(Path(save + ".json").read_text())
        out.append((meta["tokens"], np.load(save + ".npy"), meta["t0"], meta["t1"]))
    return out


def aggregate(runs: list, tokens: int) -> dict:
    wall = max(r[3] for r in runs) - min(r[2] for r in runs)
    per = [r[3] - r[2] for r in runs]
    return {"clients": len(runs), "tokens_per_s": len(runs) * tokens / wall, "wall_s": wall,
            "client_latency_s": {"median": float(np.median(per)), "max": max(per)}}


def server_runs(args, mode: str, counts: list, tmp: Path, solo_of=None, extras=False) -> dict:
    from common import start_server
    os.environ["DJINN_TENANTS"] = mode
    server = start_server(args.model, args.device, args.dtype)
    try:
        out = {"mode": mode, "runs": []}
        solo = solo_of
        if solo is None:                 # each prompt alone: the reference bits
            solo = [run_clients(server.address, [p], args, tmp)[0] for p in PROMPTS[:max(counts)]]
            out["solo_tokens_per_s"] = [args.tokens / (r[3] - r[2]) for r in solo]
        for n in counts:
            runs = run_clients(server.address, PROMPTS[:n], args, tmp)
            row = aggregate(runs, args.tokens)
            if n == 1 and args.solo_reps > 1:
                # one client is the solo-cost figure (engine on vs off): the median of a few
                # runs, as one 64-token run moves by several percent from run to run
                reps = [(row, runs)]
                for _ in range(args.solo_reps - 1):
                    again = run_clients(server.address, PROMPTS[:1], args, tmp)
                    reps.append((aggregate(again, args.tokens), again))
                reps.sort(key=lambda rr: rr[0]["tokens_per_s"])
                row, runs = reps[len(reps) // 2]
                row = {**row, "tokens_per_s_reps": [r["tokens_per_s"] for r, _ in reps]}
                runs_all = [r for _, rr in reps for r in rr]
                row["reps_equal_solo"] = all(r[0] == solo[0][0] and bool(np.array_equal(r[1], solo[0][1]))
                                             for r in runs_all)
            row["tokens_equal_solo"] = [r[0] == s[0] for r, s in zip(runs, solo)]
            row["logits_bit_equal_solo"] = [bool(np.array_equal(r[1], s[1])) for r, s in zip(runs, solo)]
            row["logits_max_abs_diff"] = max(float(np.abs(r[1] - s[1]).max()) for r, s in zip(runs, solo))
            out["runs"].append(row)
            print(mode, row, flush=True)
        if extras and not args.no_sweep:
            out["sweep"] = sweep(server.address, args, tmp)
            out["join_stall"] = join_stall(server.address, args)
        if extras and not args.no_paused:
            out["paused_neighbour"] = paused_neighbour(server.address, args, tmp, solo)
        return out, solo
    finally:
        server.close()


# ---- the sweep and the join stall (in this process, engine-on server) --------------------------
def _resume_all(sessions: list) -> tuple[list, float]:
    """Resume ``sessions`` (one client each) together; their results and the wall time from
    the common start to the last end."""
    out: list = [None] * len(sessions)
    errors: list = []
    start = threading.Barrier(len(sessions) + 1)

    def one(i, s):
        try:
            start.wait(timeout=600)
            out[i] = s.resume().result
        except BaseException as exc:   # surfaced below
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    start.wait(timeout=600)
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=900)
    wall = time.perf_counter() - t0
    assert not errors, errors
    return out, wall


def sweep(address: str, args, tmp: Path) -> dict:
    """8 scales from one checkpoint: 8 sequential forks vs 8 clients resuming together."""
    import djinn_nb as dj
    scales = [round(0.5 + 0.1 * i, 2) for i in range(8)]
    prompt = PROMPTS[0]
    c = dj.connect(address)
    s = c.session()
    s.breakpoint(layer=0, steps=[1])
    s.generate(prompt, max_new_tokens=args.tokens, stop_at_eos=False)      # warm-up
    s.stop()
    t0 = time.perf_counter()
    assert s.generate(prompt, max_new_tokens=args.tokens, stop_at_eos=False).paused
    ck = s.checkpoint().wait()
    s.stop()
    prefix_s = time.perf_counter() - t0
    path = tmp / "sweep.djckpt"
    ck.save(path)
    # sequential: fork, steer, resume, one scale after the other
    seq_tokens = []
    t0 = time.perf_counter()
    for x in scales:
        f = s.fork(ck)
        f.clear_breakpoints()
        f.steer(layer=args.layer, scale=x, phase="decode")
        seq_tokens.append(f.resume().result.tokens)
        f.close()
    seq_s = time.perf_counter() - t0
    # together: one client per scale, each loads the checkpoint file, then all resume at once
    clients = [dj.connect(address) for _ in scales]
    t0 = time.perf_counter()
    sessions = []
    for cl, x in zip(clients, scales):
        r = cl.load_checkpoint(path).session
        r.clear_breakpoints()
        r.steer(layer=args.layer, scale=x, phase="decode")
        sessions.append(r)
    load_s = time.perf_counter() - t0
    results, together_s = _resume_all(sessions)
    for cl in clients:
        cl.close()
    c.close()
    same = [r.tokens == t for r, t in zip(results, seq_tokens)]
    out = {"scales": scales, "prompt": prompt, "new_tokens": args.tokens,
           "rule": f"scale at layer {args.layer}, decode steps", "prefix_s": prefix_s,
           "sequential_forks_s": seq_s, "together_resume_s": together_s,
           "together_load_s": load_s,
           "speedup": seq_s / together_s, "speedup_with_loads": seq_s / (together_s + load_s),
           "tokens_equal_fork": same, "distinct_outputs": len({tuple(t) for t in seq_tokens})}
    print("sweep", out, flush=True)
    return out


def join_stall(address: str, args) -> dict:
    """A running client's step times while another client joins with a long prompt."""
    import djinn_nb as dj
    long_prompt = " ".join(["The history of the river valley is long and"] * (args.joiner_tokens // 9))
    ca, cb = dj.connect(address), dj.connect(address)
    a, b = ca.session(), cb.session()
    a.steer(layer=args.layer, scale=0.9)
    b.generate(long_prompt, max_new_tokens=2, stop_at_eos=False)            # warm-up
    alone = b.generate(long_prompt, max_new_tokens=2, stop_at_eos=False).result
    prefill_ms = alone.steps[0].forward_ms
    n = 2 * args.tokens
    tries = []
    # twice: the first join beside a running session pays first-use costs (the chunks'
    # shapes beside a decoding lane); the second is the warm figure, the one reported
    for _ in range(2):
        out: dict = {}
        started = threading.Event()

        def run_a(out=out, started=started):
            started.set()
            out["a"] = a.generate(PROMPTS[1], max_new_tokens=n, stop_at_eos=False).result
        t = threading.Thread(target=run_a)
        t.start()
        started.wait()
        time.sleep(0.3)                 # a is decoding by now (a timing benchmark, not a test)
        joined = b.generate(long_prompt, max_new_tokens=4, stop_at_eos=False).result
        t.join(timeout=900)
        steps = [st.forward_ms for st in out["a"].steps[1:]]
        med = float(np.median(steps))
        tries.append({"joiner_prefill_ms": joined.steps[0].forward_ms, "running_step_median_ms": med,
                      "running_step_max_ms": max(steps), "stall_ms": max(steps) - med})
    ca.close()
    cb.close()
    res = {"joiner_prompt_tokens": len(joined.prompt_tokens), "joiner_prefill_alone_ms": prefill_ms,
           **tries[1], "first_join": tries[0]}
    print("join stall", res, flush=True)
    return res


def paused_neighbour(address: str, args, tmp: Path, solo: list, reps: int = 2) -> dict:
    """N-1 clients running, alone and beside an N-th session paused (at a breakpoint of its
    first decode step, its row held in the lane) for the whole run, alternated ``reps``
    times: aggregate tokens/s of the running ones."""
    import djinn_nb as dj
    n = max(args.clients) - 1
    rates: dict = {"alone": [], "with_paused": []}
    same = []
    for _ in range(reps):
        for kind in ("alone", "with_paused"):
            c = s = None
            if kind == "with_paused":
                c = dj.connect(address)
                s = c.session()
                s.steer(layer=args.layer, scale=0.9)
                s.breakpoint(layer=0, steps=[1])
                assert s.generate(PROMPTS[n], max_new_tokens=args.tokens, stop_at_eos=False).paused
            runs = run_clients(address, PROMPTS[:n], args, tmp)
            if s is not None:
                assert s.state == "paused"          # paused for the whole run
                s.stop()
                c.close()
            rates[kind].append(aggregate(runs, args.tokens)["tokens_per_s"])
            same += [r[0] == o[0] and bool(np.array_equal(r[1], o[1])) for r, o in zip(runs, solo)]
    out = {"running_clients": n, "paused_sessions": 1, "tokens_per_s": rates,
           "ratio": float(np.median(rates["with_paused"]) / np.median(rates["alone"])),
           "bit_equal_solo": all(same)}
    print("paused neighbour", out, flush=True)
    return out


def hf_batched(args, n: int) -> dict:
    import torch
    from common import load_local, sync
    loaded = load_local(args.model, args.device, args.dtype)
    tok, model = loaded.tokenizer, loaded.model
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:n]]
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=loaded.device)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=pad, eos_token_id=None)
    with torch.inference_mode():
        model.generate(inp, max_new_tokens=4, min_new_tokens=4, **kw)          # warm-up
        times = []
        for _ in range(args.reps):
            sync(args.device)
            t0 = time.perf_counter()
            model.generate(inp, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **kw)
            sync(args.device)
            times.append(time.perf_counter() - t0)
    del loaded, model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    t = float(np.median(times))
    return {"clients": n, "tokens_per_s": n * args.tokens / t, "wall_s": t}


def plot(result: dict, name: str, out_dir: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    on = result["engine_on"]["runs"]
    ax.plot([r["clients"] for r in on], [r["tokens_per_s"] for r in on], "o-",
            label="djinn_nb, engine on")
    off = result.get("engine_off", {}).get("runs", [])
    if off:
        ax.plot([r["clients"] for r in off], [r["tokens_per_s"] for r in off], "s--",
                label="djinn_nb, engine off")
    hf = result["hf_batched"]
    ax.plot([hf["clients"]], [hf["tokens_per_s"]], "k*", markersize=12, label="HF batched generate")
    ax.set_xlabel("concurrent client processes")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{result['model']} ({result['dtype']}, {result['device']})")
    ax.legend()
    return save_plot(fig, name, out_dir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, the model's own on CPU")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per client")
    p.add_argument("--layer", type=int, default=16, help="the standing scale=0.9 rule's layer")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--reps", type=int, default=3, help="HF generate repetitions (median)")
    p.add_argument("--solo-reps", type=int, default=3,
                   help="runs of the 1-client case on each server (the median is reported)")
    p.add_argument("--no-off", action="store_true", help="skip the engine-off server")
    p.add_argument("--off-clients", type=int, nargs="+", default=[1],
                   help="client counts of the engine-off server")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep and join-stall runs")
    p.add_argument("--joiner-tokens", type=int, default=3000,
                   help="the join stall's long prompt, in tokens (about; prefill chunks are 1024)")
    p.add_argument("--no-paused", action="store_true",
                   help="skip N-1 clients beside a paused session vs alone")
    p.add_argument("--no-unchunked", action="store_true",
                   help="skip the join stall with prefill chunking off (a second engine-on server)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny-gpt2 on CPU, 1 and 2 clients")
    # client mode (internal)
    p.add_argument("--client", default=None)
    p.add_argument("--prompt", default=None)
    p.add_argument("--save", default=None)
    args = p.parse_args(argv)
    if args.dtype is None and args.device.startswith("cuda"):
        args.dtype = "bfloat16"
    if args.smoke and args.client is None:
        args.model, args.device, args.dtype = "tiny-gpt2", "cpu", None
        args.tokens, args.layer, args.clients, args.reps = 8, 2, [1, 2], 1
        args.off_clients, args.joiner_tokens = [1], 900
    return args


def _prefill_chunk() -> int:
    """The engine-on server's prefill chunk (its default unless $DJINN_PREFILL_CHUNK says)."""
    from kernel_server.runtime import scheduler
    return scheduler.PREFILL_CHUNK


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client:
        return client_main(args)
    tmp = Path(tempfile.mkdtemp(prefix="djinn-tenants-"))
    on, solo = server_runs(args, "on", args.clients, tmp, extras=True)
    unchunked = None
    if not args.no_sweep and not args.no_unchunked:
        # the join stall before chunked prefill: one forward per prompt (DJINN_PREFILL_CHUNK=0)
        from common import start_server
        os.environ["DJINN_PREFILL_CHUNK"] = "0"
        server = start_server(args.model, args.device, args.dtype)
        try:
            unchunked = join_stall(server.address, args)
        finally:
            server.close()
            del os.environ["DJINN_PREFILL_CHUNK"]
    result = {"benchmark": "tenants", "command": command_line(), "model": args.model, "device": args.device,
              "dtype": args.dtype or "float32", "tokens_per_client": args.tokens,
              "rule": f"scale=0.9 at layer {args.layer}", "env": environment(args.device),
              "prefill_chunk": _prefill_chunk(),
              "engine_on": on}
    if not args.no_off:
        # engine off: one client (today's solo fast path; many clients then take turns)
        off, _ = server_runs(args, "off", args.off_clients, tmp, solo_of=solo)
        result["engine_off"] = off
        one_on = next(r for r in on["runs"] if r["clients"] == 1)["tokens_per_s"]
        one_off = next(r for r in off["runs"] if r["clients"] == 1)["tokens_per_s"]
        result["solo_on_over_off"] = one_on / one_off
    result["hf_batched"] = hf_batched(args, max(args.clients))
    top = next(r for r in on["runs"] if r["clients"] == max(args.clients))
    result["max_clients_over_hf"] = top["tokens_per_s"] / result["hf_batched"]["tokens_per_s"]
    if "sweep" in on:
        result["sweep_speedup"] = on["sweep"]["speedup"]
        result["sweep_tokens_equal_fork"] = all(on["sweep"]["tokens_equal_fork"])
        result["join_stall_ms"] = on["join_stall"]["stall_ms"]
    if unchunked is not None:
        result["join_stall_unchunked"] = unchunked
        result["join_stall_unchunked_ms"] = unchunked["stall_ms"]
    if "paused_neighbour" in on:
        result["paused_neighbour_ratio"] = on["paused_neighbour"]["ratio"]
        result["paused_neighbour_bit_equal_solo"] = on["paused_neighbour"]["bit_equal_solo"]
    result["all_bit_equal_solo"] = all(all(r["logits_bit_equal_solo"]) and all(r["tokens_equal_solo"])
                                       for r in on["runs"])
    return finish(args, result, "tenants", plot)


if __name__ == "__main__":
    raise SystemExit(main())
