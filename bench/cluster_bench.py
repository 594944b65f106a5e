"""Replicas behind a directory: the same client processes through the cluster's directory
(``dj.connect("cluster://...")``) on 2 replicas, one per GPU, against 1 replica.

Both runs are clusters of the process backend (``kernel_server.cluster``, no Ray: the Ray
wheel cannot travel to the GPU machine), with the same model, engine and clients; the
only difference is the number of replicas. Each client process opens its session through
the directory (placed on the least-loaded replica), warms up, waits for "go", generates
``--tokens`` greedy tokens, and records its tokens and its start and end times.

Aggregate tokens/s = clients x tokens / (last client's end - first client's start).
The tokens of each client are compared between the two runs (same prompt, same model;
random-init weights have near-tied top tokens, so a flip is reported, not hidden).

    python bench/cluster_bench.py --model random:llama-7b --dtype bfloat16 --replicas 2
    python bench/cluster_bench.py --smoke          # tiny-gpt2 on CPU, 2 replicas, 2 clients
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command_line, environment, finish, pyplot, save_plot  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time there was a", "1, 2, 3, 4, 5,",
           "def fibonacci(n):", "The quick brown fox jumps over", "In the beginning",
           "Dear Sir or Madam, I am writing", "Water boils at a temperature of"]
MODEL_NAME = "bench-model"


# ---- a client process ---------------------------------------------------------------------
def client_main(args) -> int:
    import djinn_nb as dj
    cc = dj.connect("cluster://" + args.client)
    s = cc.session(model=MODEL_NAME)
    s.generate(args.prompt, max_new_tokens=2, stop_at_eos=False)          # warm-up
    print("ready", flush=True)
    sys.stdin.readline()                                                   # "go"
    t0 = time.time()
    res = s.generate(args.prompt, max_new_tokens=args.tokens, stop_at_eos=False).result
    t1 = time.time()
    Path(args.save).write_text(json.dumps({"tokens": res.tokens, "t0": t0, "t1": t1,
                                           "replica": s.client.replica}))
    cc.close()
    return 0


def run_clients(address: str, n: int, args, tmp: Path, tag: str) -> list[dict]:
    """``n`` client processes started together; their records."""
    procs = []
    for i in range(n):
        save = str(tmp / f"{tag}_{i}.json")
        cmd = [sys.executable, __file__, "--client", address, "--prompt", PROMPTS[i % len(PROMPTS)],
               "--tokens", str(args.tokens), "--save", save]
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
        assert p.wait(timeout=3600) == 0, "a client failed"
        out.append(json.loads(Path(save).read_text()))
    return out


def cluster_run(args, replicas: int, tmp: Path) -> dict:
    """A cluster of ``replicas`` replicas (one GPU each on CUDA), the clients through its
    directory."""
    from kernel_server.cluster import Cluster
    cuda = args.device.startswith("cuda")
    spec = {"name": MODEL_NAME, "model": args.model, "replicas": replicas,
            "device": "cuda" if cuda else args.device, "dtype": args.dtype or "auto",
            "num_gpus": 1 if cuda else 0,
            "args": ["--tenants", args.tenants] + ([] if cuda else ["--threads", "1"])}
    cfg = {"backend": "process", "models": [spec]}
    if cuda:
        cfg["gpus"] = list(range(replicas))
    t0 = time.time()
    cluster = Cluster.up(cfg, log_dir=str(tmp / f"logs-{replicas}"))
    started = time.time() - t0
    try:
        runs = run_clients(cluster.address, args.clients, args, tmp, f"r{replicas}")
        status = cluster.status()
    finally:
        cluster.down(drain=False)
    wall = max(r["t1"] for r in runs) - min(r["t0"] for r in runs)
    placed: dict = {}
    for r in runs:
        placed[r["replica"]] = placed.get(r["replica"], 0) + 1
    res = {"replicas": replicas, "clients": args.clients, "wall_s": wall,
           "tokens_per_s": args.clients * args.tokens / wall, "start_s": started,
           "clients_per_replica": placed,
           "client_latency_s": sorted(r["t1"] - r["t0"] for r in runs),
           "tokens": [r["tokens"] for r in runs],
           "replica_devices": {r["id"]: (r.get("load") or {}).get("memory") for r in status["replicas"]}}
    print(f"{replicas} replica(s): {res['tokens_per_s']:.1f} tokens/s, placement {placed}",
          flush=True)
    return res


def plot(result: dict, name: str, out_dir: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    runs = [result["one_replica"], result["many_replicas"]]
    ax.bar([f"{r['replicas']} replica{'s' if r['replicas'] > 1 else ''}" for r in runs],
           [r["tokens_per_s"] for r in runs], color=["#999999", "#1f77b4"])
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{result['clients']} clients through the directory, {result['model']}",
                 fontsize=9)
    return save_plot(fig, name, out_dir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, the model's own on CPU")
    p.add_argument("--replicas", type=int, default=2, help="replicas of the many-replica run "
                   "(one GPU each on CUDA)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per client")
    p.add_argument("--tenants", choices=("on", "off"), default="on",
                   help="the kernel servers' --tenants (batched decode engine)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny-gpt2 on CPU, 2 replicas, 2 clients")
    # (a client process)
    p.add_argument("--client", default=None)
    p.add_argument("--prompt", default=None)
    p.add_argument("--save", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.clients, args.tokens = "tiny-gpt2", "cpu", 2, 4
    if args.dtype is None and args.device.startswith("cuda"):
        args.dtype = "bfloat16"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client:
        return client_main(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="djinn-cluster-bench-") as tmp:
        one = cluster_run(args, 1, Path(tmp))
        many = cluster_run(args, args.replicas, Path(tmp))
    same = [a == b for a, b in zip(one["tokens"], many["tokens"])]
    result = {"benchmark": "cluster", "command": command_line(), "date": time.strftime("%Y-%m-%d"),
              "model": args.model, "device": args.device, "dtype": args.dtype,
              "tenants": args.tenants, "clients": args.clients, "tokens_per_client": args.tokens,
              "backend": "process", "env": environment(args.device),
              "one_replica": one, "many_replicas": many,
              "speedup": many["tokens_per_s"] / one["tokens_per_s"],
              "tokens_equal_one_vs_many": same, "all_tokens_equal": all(same)}
    return finish(args, result, "cluster", plot)


if __name__ == "__main__":
    sys.exit(main())
