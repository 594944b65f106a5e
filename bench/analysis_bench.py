"""One-shot analysis passes through the kernel server against the peers, measured in the same
run (CPU, SmolLM2-135M, float32, 2 threads): a steering vector from 8 + 8 prompts, the exact
30 x 9 residual patching sweep, attribution patching, one gradient pass.

Peers: plain Hugging Face forward hooks in the same process as the model (no server, no
wire: the floor any tool pays), the same computations written the usual way (one forward
per prompt / per cell), and nnsight 0.8's batched trace for the steering vector. Every peer's
numbers are checked against djinn_nb's (max abs difference in the JSON). JSON + PNG in
bench/results/ (``analysis_cpu``), the table in docs/performance.md (``python bench/report.py``).

    python bench/analysis_bench.py [--reps 3] [--old-layers 3] [--smoke] [--only sweep]
    (or python -m bench.analysis_bench; ``--only`` runs one row and writes outside bench/results)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # (run as a script too)

import numpy as np  # noqa: E402

POS = ["I love this film", "What a happy day", "This is wonderful news", "She smiled at everyone",
       "The party was great fun", "I adore my friends", "Such a lovely morning", "We won the game"]
NEG = ["I hate this film", "What a sad day", "This is terrible news", "She frowned at everyone",
       "The party was awful", "I despise my enemies", "Such a gloomy morning", "We lost the game"]
CLEAN, CORRUPTED = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"


#: every timed call's samples (ms) by label, written to the JSON next to the medians
SAMPLES: dict = {}


#: untimed calls before the timed ones, the same for every contestant (a fresh server
#: thread's first 2-3 passes were measured 5-15x slower than later ones: 1.8, 1.8, 0.6, then 0.1 s)
WARMUP = 3


def timed(fn, reps, label=None):
    """(result, median ms of ``reps`` calls) after ``WARMUP`` untimed calls, the same for
    every contestant. (On a quiet machine no first call was slow: 16 prompts took 0.42 s on
    the first call and 0.39-0.42 s after. The 8.8 s / 15.9 s of session 5 were CPU
    oversubscription: with a load average of 5-7 on the 2 cores, two OpenMP threads per
    process made one 9-token SmolLM2 forward take 0.6-6.5 s instead of ~0.03 s.)"""
    for _ in range(WARMUP):
        out = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if label:
        SAMPLES[label] = [round(t, 3) for t in times]
    return out, statistics.median(times)


class HFPeer:
    """The same computations with plain forward hooks on the Hugging Face model, in-process."""

    def __init__(self, loaded):
        import torch
        self.torch = torch
        self.model, self.layers, self.tok = loaded.model, loaded.layers, loaded.tokenizer
        self.embed = loaded.model.get_input_embeddings()

    def _hooks(self, fns: dict):
        return [self.layers[i].register_forward_hook(fn) for i, fn in fns.items()]

    def _run(self, ids, fns: dict, mask=None, positions=None, **kwargs):
        handles = self._hooks(fns)
        try:
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              use_cache=False, **kwargs).logits
        finally:
            for h in handles:
                h.remove()

    def steering_vector(self, pos, neg, layer):
        """One left-padded batch of all prompts, the layer's output at each last position."""
        torch = self.torch
        rows = [self.tok(p, add_special_tokens=False)["input_ids"] for p in pos + neg]
        n = max(map(len, rows))
        ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        seen = {}
        with torch.inference_mode():
            self._run(ids, {layer: lambda m, a, o: seen.__setitem__("h", o[:, -1].float())},
                      mask, positions)
        h = seen["h"]
        return (h[:len(pos)].mean(0) - h[len(pos):].mean(0)).numpy()

    def _clean_acts(self, ids):
        torch = self.torch
        acts = {}
        with torch.inference_mode():
            self._run(torch.tensor([ids]), {i: (lambda m, a, o, i=i: acts.__setitem__(i, o[0].clone()))
                                            for i in range(len(self.layers))})
        return acts

    def sweep_batched(self, clean, corrupted, answer, last_logits_only=False):
        """Per layer, one forward whose row p has the clean activation set at position p
        (``last_logits_only``: the unembedding of the last position only, ``logits_to_keep=1``,
        as a careful user would write it; a plain call unembeds every position)."""
        keep = {"logits_to_keep": 1} if last_logits_only else {}
        torch = self.torch
        acts = self._clean_acts(clean)
        n = len(corrupted)
        grid = np.zeros((len(self.layers), n))
        rows = torch.tensor([corrupted] * n)
        for layer in range(len(self.layers)):
            def patch(m, a, out, layer=layer):
                out = out.clone()
                idx = torch.arange(n)
                out[idx, idx] = acts[layer]
                return out
            with torch.inference_mode():
                logits = self._run(rows, {layer: patch}, **keep)[:, -1].float()
            grid[layer] = (logits[:, answer[0]] - logits[:, answer[1]]).numpy()
        return grid

    def sweep_one_per_cell(self, clean, corrupted, answer, layers):
        torch = self.torch
        acts = self._clean_acts(clean)
        grid = np.zeros((len(layers), len(corrupted)))
        for li, layer in enumerate(layers):
            for p in range(len(corrupted)):
                def patch(m, a, out, layer=layer, p=p):
                    out = out.clone()
                    out[0, p] = acts[layer][p]
                    return out
                with torch.inference_mode():
                    logits = self._run(torch.tensor([corrupted]), {layer: patch})[0, -1].float()
                grid[li, p] = float(logits[answer[0]] - logits[answer[1]])
        return grid

    def grad(self, ids, answer):
        """d(logit diff)/d(block output) at every layer: one forward with autograd, one
        ``torch.autograd.grad`` (the weights need no gradient: the embedding output does)."""
        torch = self.torch
        acts = {}
        handle = self.embed.register_forward_hook(lambda m, a, o: o.detach().requires_grad_())
        try:
            with torch.enable_grad():
                logits = self._run(torch.tensor([ids]), {i: (lambda m, a, o, i=i: acts.__setitem__(i, o))
                                                         for i in range(len(self.layers))})
                metric = logits[0, -1, answer[0]] - logits[0, -1, answer[1]]
                keys = sorted(acts)
                grads = torch.autograd.grad(metric, [acts[i] for i in keys])
        finally:
            handle.remove()
        return {i: (acts[i][0].detach(), g[0]) for i, g in zip(keys, grads)}

    def attribution(self, clean, corrupted, answer):
        clean_acts = self._clean_acts(clean)
        got = self.grad(corrupted, answer)
        return np.stack([((clean_acts[i] - a) * g).sum(-1).float().numpy()
                         for i, (a, g) in sorted(got.items())])


def run(args) -> dict:
    import torch
    import djinn_nb as dj
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    from bench.common import command_line, environment
    torch.set_num_threads(2)       # (this thread's; the server's threads take the default, 2 here)
    kernel = Kernel(args.model, device="cpu")
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    c = dj.connect(srv.address)
    s = c.session(model=args.model)
    hf = HFPeer(kernel.models.get(s.model))
    layer = min(6, s.layers - 1)
    res: dict = {"benchmark": "analysis", "command": command_line(), "model": args.model,
                 "dtype": "float32", "device": "cpu", "threads": 2, "reps": args.reps, "warmup": WARMUP,
                 "env": environment("cpu"), "load_average_before": list(os.getloadavg())}
    rows = []
    if args.only in (None, "vector"):
        rows.append(steering_vector_row(args, s, hf, layer))
    if args.only in (None, "sweep"):
        rows += sweep_rows(args, s, hf)
    res["rows"] = rows
    res["samples_ms"] = dict(SAMPLES)
    res["torch_threads"] = torch.get_num_threads()
    res["load_average_after"] = list(os.getloadavg())
    c.close()
    srv.close()
    return res


def steering_vector_row(args, s, hf, layer) -> dict:
    """djinn_nb's steering vector from 8 + 8 prompts against HF hooks and nnsight's trace."""
    import torch
    v_batch, ms_batch = timed(lambda: s.steering_vector(POS, NEG, layer), args.reps, "sv djinn")

    def one_per_prompt():
        act = lambda ps: np.mean([s.cache(p, layers=layer, reduce="last")["resid", layer] for p in ps], 0)  # noqa: E731
        return act(POS) - act(NEG)
    v_one, ms_one = timed(one_per_prompt, args.reps, "sv djinn unbatched")
    v_hf, ms_hf = timed(lambda: hf.steering_vector(POS, NEG, layer), args.reps, "sv hf")
    row = {"task": "steering vector, 8 + 8 prompts", "djinn_ms": ms_batch, "djinn_unbatched_ms": ms_one,
           "hf_ms": ms_hf, "max_abs_diff": {"djinn_unbatched": float(np.abs(v_batch - v_one).max()),
                                             "hf": float(np.abs(v_batch - v_hf).max())}}
    if not args.smoke:
        try:
            from nnsight import LanguageModel
            from kernel_server.model.registry import load_model
            copy = load_model(args.model, device="cpu")     # nnsight rewrites its modules for good
            lm = LanguageModel(copy.model, tokenizer=copy.tokenizer)

            def nn_vector():
                saved = []
                with lm.trace() as tracer:
                    for p in POS + NEG:
                        with tracer.invoke(p):
                            # (Llama blocks return a plain tensor in transformers 5)
                            saved.append(lm.model.layers[layer].output[:, -1].save())
                acts = torch.stack([t.reshape(-1) for t in saved]).float()
                return (acts[:8].mean(0) - acts[8:].mean(0)).numpy()
            v_nn, ms_nn = timed(nn_vector, args.reps, "sv nnsight")
            row["nnsight_ms"] = ms_nn
            row["max_abs_diff"]["nnsight"] = float(np.abs(v_nn - v_batch).max())

            def nn_vector_stop():
                """The same trace ended after the block read (nnsight's ``tracer.stop()``),
                as djinn_nb's pass ends there."""
                saved = []
                with lm.trace() as tracer:
                    for i, p in enumerate(POS + NEG):
                        with tracer.invoke(p):
                            saved.append(lm.model.layers[layer].output[:, -1].save())
                            if i == len(POS + NEG) - 1:
                                tracer.stop()
                acts = torch.stack([t.reshape(-1) for t in saved]).float()
                return (acts[:8].mean(0) - acts[8:].mean(0)).numpy()
            try:
                v_st, ms_st = timed(nn_vector_stop, args.reps, "sv nnsight stop")
                row["nnsight_stop_ms"] = ms_st
                row["max_abs_diff"]["nnsight_stop"] = float(np.abs(v_st - v_batch).max())
            except Exception as e:                             # noqa: BLE001 (reported, not hidden)
                row["nnsight_stop"] = f"not measured: {type(e).__name__}: {str(e)[:200]}"
        except Exception as e:                                 # noqa: BLE001 (reported, not hidden)
            row["nnsight"] = f"not measured: {type(e).__name__}: {str(e)[:200]}"
    print(row, flush=True)
    return row


def sweep_rows(args, s, hf) -> list:
    """The exact patching sweep, attribution patching and a gradient pass against HF hooks."""
    rows = []
    ids_c, ids_b = s.tokenize(CLEAN), s.tokenize(CORRUPTED)
    answer = [s.tokenize(" Paris")[0], s.tokenize(" Rome")[0]]
    assert len(ids_c) == len(ids_b), (len(ids_c), len(ids_b))
    grid, ms_sweep = timed(lambda: s.patch(ids_c, ids_b, answer, progress=False, batch=64), args.reps, "sweep djinn")
    hf_grid, ms_hf_sweep = timed(lambda: hf.sweep_batched(ids_c, ids_b, answer), args.reps, "sweep hf batched")
    hf_grid1, ms_hf_sweep1 = timed(lambda: hf.sweep_batched(ids_c, ids_b, answer, True), args.reps,
                                   "sweep hf batched, last logits only")
    old_layers = list(range(min(args.old_layers, s.layers)))
    t0 = time.perf_counter()
    acts = s.cache(ids_c, layers=old_layers)
    old = np.zeros((len(old_layers), len(ids_b)))
    for i in old_layers:
        for p in range(len(ids_b)):
            sc = s.score(ids_b + [answer[0]], start=len(ids_b), compare=False, return_logits=True,
                         steering=[{"layer": i, "positions": [p], "set": acts["resid", i][p].tolist()}])
            old[i, p] = sc.logits[-1][answer[0]] - sc.logits[-1][answer[1]]
    cells = s.layers * len(ids_b)
    djinn_cell_ms = (time.perf_counter() - t0) * 1e3 / old.size
    t0 = time.perf_counter()
    hf_old = hf.sweep_one_per_cell(ids_c, ids_b, answer, old_layers)
    hf_cell_ms = (time.perf_counter() - t0) * 1e3 / old.size
    row = {"task": f"exact patching sweep, {s.layers} x {len(ids_b)} cells", "djinn_ms": ms_sweep,
           "djinn_unbatched_ms": djinn_cell_ms * cells, "hf_ms": ms_hf_sweep,
           "hf_last_logits_ms": ms_hf_sweep1,
           "hf_unbatched_ms": hf_cell_ms * cells,
           "unbatched_extrapolated_from_layers": len(old_layers),
           "max_abs_diff": {"djinn_unbatched": float(np.abs(grid.metric[:len(old_layers)] - old).max()),
                            "hf": float(np.abs(grid.metric - hf_grid).max()),
                            "hf_last_logits": float(np.abs(grid.metric - hf_grid1).max()),
                            "hf_unbatched": float(np.abs(grid.metric[:len(old_layers)] - hf_old).max())}}
    rows.append(row)
    print(row, flush=True)
    # ---- attribution patching and one gradient pass ------------------------------------------
    est, ms_attr = timed(lambda: s.attribution_patch(ids_c, ids_b, answer), args.reps, "attribution djinn")
    hf_est, ms_hf_attr = timed(lambda: hf.attribution(ids_c, ids_b, answer), args.reps, "attribution hf")
    row = {"task": f"attribution patching, {s.layers} x {len(ids_b)} cells", "djinn_ms": ms_attr,
           "hf_ms": ms_hf_attr,
           "max_abs_diff": {"hf": float(np.abs((est.metric - est.corrupted) - hf_est).max())},
           "corr_with_exact": float(np.corrcoef(est.metric.ravel(), grid.metric.ravel())[0, 1])}
    rows.append(row)
    print(row, flush=True)
    g, ms_grad = timed(lambda: s.grad(ids_c, answer=answer), args.reps, "grad djinn")
    hf_g, ms_hf_grad = timed(lambda: hf.grad(ids_c, answer), args.reps, "grad hf")
    row = {"task": f"gradient pass, resid of all {s.layers} layers, {len(ids_c)} tokens",
           "djinn_ms": ms_grad, "hf_ms": ms_hf_grad,
           "max_abs_diff": {"hf": float(max(np.abs(g["resid", i] - hf_g[i][1].float().numpy()).max()
                                            for i in range(s.layers)))}}
    rows.append(row)
    print(row, flush=True)
    return rows


def plot(d: dict, name: str, out_dir: Path) -> Path:
    from bench.common import pyplot, save_plot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12.5, 4.2))
    series = [("djinn_ms", "djinn_nb (server, batched)", "C0"),
              ("djinn_unbatched_ms", "djinn_nb, one pass per prompt / cell", "C9"),
              ("hf_ms", "HF hooks in-process, batched", "C1"),
              ("hf_last_logits_ms", "HF hooks in-process, batched, logits_to_keep=1", "C5"),
              ("hf_unbatched_ms", "HF hooks, one forward per cell", "C3"),
              ("nnsight_ms", "nnsight 0.8 batched trace", "C2"),
              ("nnsight_stop_ms", "nnsight 0.8 batched trace, tracer.stop() after the block", "C4")]
    width = 0.12
    x = np.arange(len(d["rows"]))
    for k, (key, label, color) in enumerate(series):
        vals = [r.get(key, np.nan) for r in d["rows"]]
        ax.bar(x + (k - 3) * width, vals, width, label=label, color=color)
    ax.set_xticks(x, [r["task"] for r in d["rows"]], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median), log scale")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{d['model']} {d['dtype']}, CPU {d['threads']} threads ({d['command']}); "
                 f"load average {d['load_average_before'][0]:.1f}", fontsize=9)
    return save_plot(fig, name, out_dir)


def off_main_thread(fn, *args):
    """``fn(*args)`` in a new thread. The server runs djinn_nb's passes in its own threads; the
    peers run here, so every contestant computes off the main thread: on this shared 2-core
    machine (load average ~3) the main thread's OpenMP team was measured 1.5-2x slower than a
    new thread's for the same [256, 576] x [576, 1536] matmul (20.6 vs 9.7 ms; 6.8 ms with one
    thread), which would favour whoever is not on the main thread."""
    import threading
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:          # noqa: BLE001 (re-raised in the caller)
            box["error"] = e
    t = threading.Thread(target=target, name="bench")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def main(argv=None) -> int:
    from bench.common import RESULTS, smoke_dir, write_result
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--old-layers", type=int, default=3,
                    help="layers of the sweep timed one pass per cell (extrapolated to all)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--smoke", action="store_true", help="tiny-gpt2, 1 rep, no nnsight, no result file")
    ap.add_argument("--only", choices=["vector", "sweep"], default=None,
                    help="only the steering-vector row, or only the sweep rows (sweep, attribution, "
                         "gradient); the JSON goes to a temporary folder, never over bench/results")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.reps, args.old_layers = "tiny-gpt2", 1, 1
    res = off_main_thread(run, args)
    out_dir = smoke_dir() if args.smoke or args.only else RESULTS
    print("wrote", write_result("analysis_cpu", res, out_dir), plot(res, "analysis_cpu", out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
