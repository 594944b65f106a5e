"""The peer: the same steered greedy generation through djinn_nb and through nnsight, on
the same model and device, in one run.

The task: scale decoder block ``layer``'s output by ``scale`` on every forward pass (the
prompt's prefill and each decode step) and generate ``tokens`` greedy tokens.

- djinn_nb: ``steer(layer, scale=...)`` then ``generate(prompt)``, from a client through the
  kernel server (its own process, loopback, control channel), client-observed;
- nnsight (in the benchmark's process, ``TransformersModel`` around its own copy of the model,
  the same weights):
  ``model.generate(...)`` with the edit in a ``tracer.iter`` loop over every step;
- a plain Hugging Face forward hook on a KV-cache loop (the floor: no framework at all).

The three are interleaved, repetition by repetition; tokens are compared.

    python bench/nnsight_bench.py --device cpu --model smollm2-135m
    python bench/nnsight_bench.py --device cuda --model random:llama-1b --dtype bfloat16
    python bench/nnsight_bench.py --smoke
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (command_line, connect, environment, finish, load_local, paired_ratio,  # noqa: E402
                    pyplot, RESULTS, save_plot, start_server, sync)

PROMPT = "The capital of France is"
med = statistics.median


def hook_generate(loaded, prompt_ids, layer: int, scale: float, n: int) -> tuple[float, list]:
    """A plain forward hook that scales block ``layer``'s output, on a greedy KV-cache loop."""
    from transformers import DynamicCache
    model, dev = loaded.model, loaded.device

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * scale,) + tuple(output[1:])
        return output * scale
    handle = loaded.layers[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            sync(dev)
            t0 = time.perf_counter()
            cache = DynamicCache(config=model.config)
            ids = torch.tensor([prompt_ids], device=dev)
            tokens, length, inp = [], ids.shape[1], ids
            for _ in range(n):
                out = model(input_ids=inp, attention_mask=torch.ones((1, length), dtype=torch.long,
                                                                     device=dev),
                            use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: cache})
                tok = out.logits[:, -1].argmax(-1)
                tokens.append(int(tok))
                inp, length = tok.view(1, 1), length + 1
            return (time.perf_counter() - t0) * 1e3, tokens
    finally:
        handle.remove()


class NNsightPeer:
    """nnsight 0.8 around its own copy of the model (wrapping replaces every module's forward
    for good, so it never touches the server's model)."""

    def __init__(self, loaded):
        import nnsight
        from nnsight.modeling.transformers import TransformersModel
        self.version = nnsight.__version__
        self.loaded = loaded
        self.model = TransformersModel(loaded.model, tokenizer=loaded.tokenizer,
                                       task="text-generation")
        # the wrapped decoder block, found by the same path as the server's layer discovery
        from kernel_server.model.layers import layers_path
        node = self.model
        for part in layers_path(loaded.model).split("."):
            node = getattr(node, part)
        self.block_list = node

    def generate(self, prompt_ids, layer: int, scale: float, n: int) -> tuple[float, list]:
        dev = self.loaded.device
        block = self.block_list[layer]
        ids = torch.tensor([prompt_ids], device=dev)
        sync(dev)
        t0 = time.perf_counter()
        # eos_token_id=None: n tokens whatever comes, as the server's stop_at_eos=False
        with self.model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=self.loaded.tokenizer.pad_token_id) as tracer:
            for _ in tracer.iter[:n]:          # prefill + n-1 decode steps
                block.output = block.output * scale
            result = tracer.result.save()
        sync(dev)
        wall = (time.perf_counter() - t0) * 1e3
        return wall, result[0, len(prompt_ids):].tolist()


def run(args) -> dict:
    srv = start_server(args.model, args.device, args.dtype)      # its own process
    c = connect(srv.address)
    s = c.session()
    layer = min(args.layer, s.layers - 1)
    # the plain hook and nnsight each get their own copy of the model in this process (same
    # weights: the file, or the same seed); nnsight's wrapping never touches the others
    mine = load_local(args.model, s.device, s.dtype)
    loaded = mine
    peer = NNsightPeer(load_local(args.model, s.device, s.dtype))
    prompt_ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    s.steer(layer=layer, scale=args.scale)

    def djinn():
        t0 = time.perf_counter()
        res = s.generate(prompt_ids, max_new_tokens=args.tokens, stop_at_eos=False).result
        return (time.perf_counter() - t0) * 1e3, res.tokens

    def nnsight_run():
        return peer.generate(prompt_ids, layer, args.scale, args.tokens)

    def hook_run():
        return hook_generate(mine, prompt_ids, layer, args.scale, args.tokens)

    runs = {"djinn": djinn, "nnsight": nnsight_run, "hook": hook_run}
    times = {k: [] for k in runs}
    tokens = {}
    for fn in runs.values():      # warm-up
        fn()
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for k in order:
            gc.collect()
            ms, toks = runs[k]()
            times[k].append(ms)
            tokens[k] = toks
    c.close()
    srv.close()
    return {
        "benchmark": "nnsight", "model": args.model, "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."), "env": environment(loaded.device),
        "command": command_line(), "reps": args.reps, "tokens": args.tokens, "layer": layer,
        "scale": args.scale, "nnsight_version": peer.version,
        "djinn_ms": times["djinn"], "nnsight_ms": times["nnsight"], "hook_ms": times["hook"],
        "djinn_ms_per_token": med(times["djinn"]) / args.tokens,
        "nnsight_ms_per_token": med(times["nnsight"]) / args.tokens,
        "hook_ms_per_token": med(times["hook"]) / args.tokens,
        # tokens/s ratios, paired by repetition: > 1 means djinn_nb is faster
        "djinn_vs_nnsight": paired_ratio(times["nnsight"], times["djinn"]),
        "djinn_vs_hook": paired_ratio(times["hook"], times["djinn"]),
        "nnsight_vs_hook": paired_ratio(times["hook"], times["nnsight"]),
        "tokens_djinn": tokens["djinn"], "tokens_nnsight": tokens["nnsight"],
        "tokens_hook": tokens["hook"],
        "tokens_match": tokens["djinn"] == tokens["nnsight"] == tokens["hook"],
    }


def plot(d: dict, name: str, out_dir: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    data = [[t / d["tokens"] for t in d[k]] for k in ("hook_ms", "djinn_ms", "nnsight_ms")]
    ax.boxplot(data)
    ax.set_xticks([1, 2, 3], ["plain HF hook\n(in-process)", "djinn_nb\n(client -> server)",
                              f"nnsight {d['nnsight_version']}\n(local)"])
    ax.set_ylabel("ms per generated token (prefill included)")
    ax.set_title(f"steered greedy generation, {d['tokens']} tokens: djinn_nb is "
                 f"{d['djinn_vs_nnsight']['median']:.2f}x nnsight's tokens/s", fontsize=10)
    ax.set_ylim(bottom=0)
    fig.suptitle(f"{d['model']} on {d['env'].get('gpu', 'CPU')} ({d['command']})", fontsize=8)
    return save_plot(fig, name, out_dir)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--scale", type=float, default=0.9)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--name", default=None, help="result name (default nnsight_<device>)")
    p.add_argument("--smoke", action="store_true", help="tiny model, no result file")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.tokens, args.reps = "tiny-gpt2", "cpu", 4, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print({k: round(result[k]["median"], 3) for k in ("djinn_vs_nnsight", "djinn_vs_hook",
                                                      "nnsight_vs_hook")})
    return finish(args, result, "nnsight", plot)


if __name__ == "__main__":
    raise SystemExit(main())
