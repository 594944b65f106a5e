"""Batched one-shot analysis passes against one pass per prompt / cell and nnsight's batched
trace (CPU, SmolLM2-135M, float32): steering vector from 8 prompts, the 30 x 9 residual
patching sweep (exact, batched rows; attribution), one gradient pass. JSON in bench/results/.

    python -m bench.analysis_bench [--reps 3] [--old-layers 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

POS = ["I love this film", "What a happy day", "This is wonderful news", "She smiled at everyone",
       "The party was great fun", "I adore my friends", "Such a lovely morning", "We won the game"]
NEG = ["I hate this film", "What a sad day", "This is terrible news", "She frowned at everyone",
       "The party was awful", "I despise my enemies", "Such a gloomy morning", "We lost the game"]
CLEAN, CORRUPTED = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"


def timed(fn, reps):
    out, times = None, []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--old-layers", type=int, default=3,
                    help="layers of the sweep timed on the one-pass-per-cell path (extrapolated)")
    args = ap.parse_args()
    import torch
    import djinn_nb as dj
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    from bench.common import environment, write_result
    torch.set_num_threads(2)
    srv = KernelServer(Kernel("smollm2-135m", device="cpu"), "127.0.0.1", 0).start()
    c = dj.connect(srv.address)
    s = c.session(model="smollm2-135m")
    res: dict = {"model": "smollm2-135m", "device": "cpu", "threads": 2, "env": environment("cpu")}
    layer = 6
    # ---- steering vector from 8 + 8 prompts --------------------------------------------------
    s.steering_vector(POS[:1], NEG[:1], layer)                          # warm-up
    v_batch, ms_batch = timed(lambda: s.steering_vector(POS, NEG, layer), args.reps)

    def one_per_prompt():
        act = lambda ps: np.mean([s.cache(p, layers=layer, reduce="last")["resid", layer] for p in ps], 0)  # noqa: E731
        return act(POS) - act(NEG)
    v_one, ms_one = timed(one_per_prompt, args.reps)
    res["steering_vector"] = {"prompts": 16, "batched_ms": ms_batch, "one_pass_per_prompt_ms": ms_one,
                              "max_abs_diff": float(np.abs(v_batch - v_one).max())}
    try:
        from nnsight import LanguageModel
        from kernel_server.model.registry import load_model
        hf = load_model("smollm2-135m", device="cpu")
        lm = LanguageModel(hf.model, tokenizer=hf.tokenizer)

        def nn_vector():
            saved = []
            with lm.trace() as tracer:
                for p in POS + NEG:
                    with tracer.invoke(p):
                        # (Llama blocks return a plain tensor in transformers 5)
                        saved.append(lm.model.layers[layer].output[:, -1].save())
            acts = torch.stack([t.reshape(-1) for t in saved]).float()
            return (acts[:8].mean(0) - acts[8:].mean(0)).numpy()
        v_nn, ms_nn = timed(nn_vector, args.reps)
        res["steering_vector"].update(nnsight_batched_ms=ms_nn,
                                      nnsight_max_abs_diff=float(np.abs(v_nn - v_batch).max()))
    except Exception as e:                                 # noqa: BLE001 (reported, not hidden)
        res["steering_vector"]["nnsight"] = f"not measured: {type(e).__name__}: {str(e)[:200]}"
    print(res["steering_vector"], flush=True)
    # ---- 30 x 9 patching sweep ---------------------------------------------------------------
    ids_c, ids_b = s.tokenize(CLEAN), s.tokenize(CORRUPTED)
    answer = [s.tokenize(" Paris")[0], s.tokenize(" Rome")[0]]
    assert len(ids_c) == len(ids_b), (len(ids_c), len(ids_b))
    sweep = {"layers": s.layers, "positions": len(ids_c)}
    for batch in (9, 27, 64):
        t0 = time.perf_counter()
        grid = s.patch(ids_c, ids_b, answer, progress=False, batch=batch)
        sweep[f"batched_s_batch{batch}"] = time.perf_counter() - t0
    old_layers = list(range(args.old_layers))
    t0 = time.perf_counter()
    acts = s.cache(ids_c, layers=old_layers)
    old = np.zeros((len(old_layers), len(ids_b)))
    for i in old_layers:
        for p in range(len(ids_b)):
            sc = s.score(ids_b + [answer[0]], start=len(ids_b), compare=False, return_logits=True,
                         steering=[{"layer": i, "positions": [p], "set": acts["resid", i][p].tolist()}])
            old[i, p] = sc.logits[-1][answer[0]] - sc.logits[-1][answer[1]]
    per_cell = (time.perf_counter() - t0) / old.size
    sweep.update(one_pass_per_cell_s_per_cell=per_cell,
                 one_pass_per_cell_s_extrapolated=per_cell * s.layers * len(ids_b),
                 max_abs_diff_vs_one_pass=float(np.abs(grid.metric[:len(old_layers)] - old).max()))
    t0 = time.perf_counter()
    est = s.attribution_patch(ids_c, ids_b, answer)
    sweep["attribution_s"] = time.perf_counter() - t0
    sweep["attribution_corr_with_exact"] = float(np.corrcoef(est.metric.ravel(), grid.metric.ravel())[0, 1])
    res["patching_sweep"] = sweep
    print(sweep, flush=True)
    _, ms_grad = timed(lambda: s.grad(ids_c, answer=answer), args.reps)
    res["grad_pass_ms"] = {"all 30 layers, resid, logit_diff, 9 tokens": ms_grad}
    print(res["grad_pass_ms"], flush=True)
    write_result("analysis_cpu", res)
    c.close()
    srv.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
