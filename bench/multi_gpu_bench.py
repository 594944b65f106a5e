"""A model over several GPUs (an accelerate device map): exactness on layers of every device,
decode tokens/s with and without a breakpoint, checkpoint copy bandwidth per device.

    python bench/multi_gpu_bench.py --shape llama-13b --dtype bfloat16     # 2+ GPUs
    python bench/multi_gpu_bench.py --smoke     # tiny, CPU, every module mapped to "cpu"

The model is ``random:<shape>`` (kernel_server.model.sharding): built on the meta device, each
shard materialised on its GPU with a seeded init, dispatched with accelerate's hooks. Runs
in process (kernel_server Session objects, no network): what is measured is the server's
work. A second copy of the model under another device map (same seeded weights) loads a
checkpoint file of the first and continues it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, environment, write_result  # noqa: E402
from kernel_server.checkpoints import file_format, snapshot  # noqa: E402
from kernel_server.checkpoints.store import CheckpointStore  # noqa: E402
from kernel_server.model import sharding  # noqa: E402
from kernel_server.model.loading import RANDOM_SHAPES  # noqa: E402
from kernel_server.model.registry import load_model  # noqa: E402
from kernel_server.runtime.session_state import Session  # noqa: E402
from kernel_server.model.validation import Limits  # noqa: E402

OWNER = "bench"


def sync_all(devices) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def build(name: str, dtype: str, device_map, max_memory=None, device=None):
    t0 = time.perf_counter()
    loaded = load_model(name, device=device, dtype=dtype, device_map=device_map,
                        max_memory=max_memory, progress=False)
    sync_all(loaded.devices)
    return loaded, time.perf_counter() - t0


def layout(loaded) -> dict:
    per_device: dict = {}
    for d in loaded.layer_devices or [loaded.device] * loaded.num_layers:
        per_device[str(d)] = per_device.get(str(d), 0) + 1
    param_bytes: dict = {}
    for p in loaded.model.parameters():
        param_bytes[str(p.device)] = param_bytes.get(str(p.device), 0) + p.numel() * p.element_size()
    return {"layers": loaded.num_layers, "layout": sharding.describe_layout(
                loaded.layer_devices or [loaded.device] * loaded.num_layers),
            "layers_per_device": per_device, "param_bytes_per_device": param_bytes,
            "params": sum(p.numel() for p in loaded.model.parameters()),
            "devices": [str(d) for d in loaded.devices]}


def probe_layers(loaded) -> list:
    """One layer in the middle of each device's run of layers (two on a one-device map)."""
    groups = sharding.group_by_device(loaded.layer_devices or [loaded.device] * loaded.num_layers)
    if len(groups) == 1:
        n = loaded.num_layers
        return [n // 4, (3 * n) // 4]
    return [idx[len(idx) // 2] for idx in groups.values()]


def drive(s: Session, prompt, n: int, on_pause=None) -> dict:
    """generate() and resume() to the end; ``on_pause(event)`` at each pause."""
    ev = s.generate(prompt, max_new_tokens=n, return_logits=True, stop_at_eos=False)
    while ev["event"] == "paused":
        if on_pause is not None:
            on_pause(ev)
        ev = s.resume().result()
    return ev["result"]


def compare(a: dict, b: dict) -> dict:
    la, lb = np.asarray(a["logits"], dtype=np.float64), np.asarray(b["logits"], dtype=np.float64)
    same_shape = la.shape == lb.shape
    return {"tokens_equal": a["tokens"] == b["tokens"],
            "logits_equal": bool(same_shape and np.array_equal(la, lb)),
            "max_abs_logit_diff": float(np.max(np.abs(la - lb))) if same_shape and la.size else None}


def exactness(loaded, prompt, n: int, k: int, store) -> tuple[dict, object, dict]:
    """Resume with no edit, steer 1.0, edit == rule, checkpoint/restore, on a layer of each
    device. Returns (checks, a checkpoint at step k paused at the last probe layer, baseline)."""
    limits = Limits()
    layers = probe_layers(loaded)
    last = layers[-1]
    checks: dict = {"probe_layers": {str(i): str(loaded.layer_device(i)) for i in layers}}
    s = Session(loaded, limits, OWNER)
    base = drive(s, prompt, n)

    s = Session(loaded, limits, OWNER)
    for layer in layers:
        s.set_breakpoint(layer=layer, phase="both")
    pauses = []
    checks["resume_no_edit"] = {**compare(drive(s, prompt, n, pauses.append), base),
                                "pauses": len(pauses),
                                "paused_layers": sorted({ev["layer"] for ev in pauses})}

    s = Session(loaded, limits, OWNER)
    for layer in layers:
        s.steer(layer=layer, scale=1.0)
    checks["steer_scale_1"] = compare(drive(s, prompt, n), base)

    vec = np.random.default_rng(0).standard_normal(loaded.hidden_size).astype(np.float32)
    vec *= 4.0 / np.linalg.norm(vec)
    s = Session(loaded, limits, OWNER)
    s.set_breakpoint(layer=last, steps=[k])
    edited = drive(s, prompt, n, lambda ev: s.edit(add=vec, alpha=1.0))
    s = Session(loaded, limits, OWNER)
    rule = s.steer(layer=last, add=vec, alpha=1.0, steps=[k])
    ruled = drive(s, prompt, n)
    vector_device = str(s.interventions.rules[0].op.vector.device)
    checks["edit_equals_rule"] = {**compare(edited, ruled), "layer": last, "step": k,
                                  "rule": rule["id"], "vector_device": vector_device,
                                  "differs_from_baseline": not compare(edited, base)["logits_equal"]}

    s = Session(loaded, limits, OWNER)
    s.set_breakpoint(layer=last, steps=[k])
    ev = s.generate(prompt, max_new_tokens=n, return_logits=True, stop_at_eos=False)
    assert ev["event"] == "paused" and ev["layer"] == last
    ck = s.checkpoint(store)              # mid-forward on the last device: the start of token k
    ck.wait()
    first = s.resume().result()
    while first["event"] == "paused":
        first = s.resume().result()
    s.restore(ck)
    restored_devices = [str(layer.keys.device) for layer in s.run.cache.layers]
    again = s.resume().result()                    # the restored breakpoint pauses at step k again
    repaused = again["event"] == "paused" and again["layer"] == last and again["step"] == k
    while again["event"] == "paused":
        again = s.resume().result()
    at = {"layer": last, "device": str(loaded.layer_device(last)), "step": k}
    checks["checkpoint_continue"] = {**compare(first["result"], base), **at}
    checks["checkpoint_restore"] = {
        **compare(again["result"], base), **at, "repaused_at_breakpoint": repaused,
        "restored_cache_on_layer_devices": restored_devices == [
            str(loaded.layer_device(i)) for i in range(len(restored_devices))]}
    return checks, ck, base


def across_maps(ck, loaded, other, base, prompt, n: int) -> dict:
    """The checkpoint as a file, loaded under ``other``'s device map, continued there."""
    t0 = time.perf_counter()
    data = file_format.to_bytes(ck, loaded)
    t1 = time.perf_counter()
    ck2 = file_format.from_bytes(data, other, OWNER)
    t2 = time.perf_counter()
    s = Session(other, Limits(), OWNER)
    s.restore(ck2)
    devices = [str(layer.keys.device) for layer in s.run.cache.layers]
    ev = s.resume().result()
    while ev["event"] == "paused":
        ev = s.resume().result()
    other_base = drive(Session(other, Limits(), OWNER), prompt, n)
    return {**compare(ev["result"], base), "file_bytes": len(data),
            "save_s": t1 - t0, "load_s": t2 - t1,
            "restored_cache_on_layer_devices": devices == [
                str(other.layer_device(i)) for i in range(len(devices))],
            "other_map_baseline": compare(other_base, base),
            "other_layout": sharding.describe_layout(other.layer_devices or
                                                     [other.device] * other.num_layers)}


def decode(loaded, prompt, n: int, reps: int) -> dict:
    """ms/token of decode = (wall(n tokens) - wall(1 token)) / (n - 1), median of reps;
    a plain in-process Hugging Face KV-cache loop on the same sharded model as baseline."""
    from transformers import DynamicCache
    layer = probe_layers(loaded)[-1]
    model, dev = loaded.model, loaded.device
    ids = torch.tensor([prompt], device=dev)

    def plain(tokens: int):
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            x, length = ids, ids.shape[1]
            for _ in range(tokens):
                mask = torch.ones((1, length), dtype=torch.long, device=dev)
                out = model(input_ids=x, attention_mask=mask, use_cache=True, logits_to_keep=1,
                            **{loaded.cache_kwarg: cache})
                x = out.logits[:, -1, :].argmax(-1).view(1, 1)
                int(x)
                length += 1

    def server(tokens: int, breakpoint: bool):
        s = Session(loaded, Limits(), OWNER)
        if breakpoint:
            s.set_breakpoint(layer=layer, phase="decode")
        ev = s.generate(prompt, max_new_tokens=tokens, stop_at_eos=False)
        pauses = 0
        while ev["event"] == "paused":
            pauses += 1
            ev = s.resume().result()
        return pauses

    modes = {"plain_hf_loop": lambda t: plain(t), "server_no_breakpoint": lambda t: server(t, False),
             "server_breakpoint_every_step": lambda t: server(t, True)}
    for fn in modes.values():                # warm-up
        fn(2)
    samples: dict = {m: [] for m in modes}
    for _ in range(reps):
        for m, fn in modes.items():
            walls = []
            for tokens in (1, n):
                sync_all(loaded.devices)
                t0 = time.perf_counter()
                fn(tokens)
                sync_all(loaded.devices)
                walls.append(time.perf_counter() - t0)
            samples[m].append((walls[1] - walls[0]) / (n - 1) * 1e3)
    out = {"tokens": n, "reps": reps, "breakpoint_layer": layer,
           "breakpoint_device": str(loaded.layer_device(layer))}
    for m, xs in samples.items():
        ms = statistics.median(xs)
        out[m] = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms, "samples_ms": xs}
    base = out["server_no_breakpoint"]["ms_per_token"]
    out["server_vs_plain"] = out["plain_hf_loop"]["ms_per_token"] / base
    out["breakpoint_vs_no_breakpoint"] = base / out["server_breakpoint_every_step"]["ms_per_token"]
    return out


def _raw_copy_ms(nbytes: int, device: torch.device, reps: int) -> dict:
    """Baselines: one pinned copy of ``nbytes`` device->host and back (a plain copy on CPU)."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    res = {}
    for name, fn in (("d2h", lambda: host.copy_(dev, non_blocking=True)),
                     ("h2d", lambda: dev.copy_(host, non_blocking=True))):
        xs = []
        for _ in range(reps):
            sync_all([device])
            t0 = time.perf_counter()
            fn()
            sync_all([device])
            xs.append((time.perf_counter() - t0) * 1e3)
        res[name] = statistics.median(xs)
    return res


def checkpoint_bandwidth(loaded, store, ctx: int, reps: int) -> dict:
    """One checkpoint of a ctx-token KV cache spread over the devices: dispatch, the copy of
    each device's layers (all devices at once, as checkpoint() runs them, and each alone),
    restore; against one pinned copy of the same bytes on each device."""
    gen = torch.Generator().manual_seed(ctx)
    prompt = torch.randint(0, loaded.vocab_size, (ctx,), generator=gen).tolist()
    s = Session(loaded, Limits(max_prompt_tokens=ctx + 8), OWNER)
    s.generate(prompt, max_new_tokens=1, stop_at_eos=False)        # cache: ctx positions
    slices = snapshot.kv_slices(s.run.cache, ctx)
    groups = sharding.group_by_device([k.device for k, _ in slices])
    bytes_per_device = {d: sum(snapshot.tensor_nbytes(slices[i][0]) + snapshot.tensor_nbytes(slices[i][1]) for i in idx)
                        for d, idx in groups.items()}
    total = sum(bytes_per_device.values())
    dispatch, whole, per_dev_concurrent = [], [], {str(d): [] for d in groups}
    restore = []
    for rep in range(reps + 1):
        sync_all(loaded.devices)
        t0 = time.perf_counter()
        ck = s.checkpoint(store)
        t1 = time.perf_counter()
        parts = getattr(ck.copy, "parts", [ck.copy])
        done: dict = {}
        while len(done) < len(parts):          # when each device's copy finishes (all at once)
            for d, p in zip(groups, parts):
                if d not in done and p.query():
                    done[d] = time.perf_counter()
        ck.wait()
        t2 = time.perf_counter()
        sync_all(loaded.devices)
        r0 = time.perf_counter()
        snapshot.cache_from_host(ck, loaded)
        sync_all(loaded.devices)
        r1 = time.perf_counter()
        if rep:                                # rep 0: warm-up
            dispatch.append((t1 - t0) * 1e3)
            whole.append((t2 - t0) * 1e3)
            restore.append((r1 - r0) * 1e3)
            for d in groups:
                per_dev_concurrent[str(d)].append((done[d] - t0) * 1e3)
        store.delete(ck.id, OWNER)
    alone: dict = {}
    for d, idx in groups.items():              # each device's layers copied alone
        xs = []
        for rep in range(reps + 1):
            sync_all(loaded.devices)
            t0 = time.perf_counter()
            _, copy, release = (snapshot.copy_to_host([slices[i] for i in idx], d, store.arena)
                                if d.type == "cuda" else snapshot.copy_per_device([slices[i] for i in idx]))
            copy.synchronize()
            if rep:
                xs.append((time.perf_counter() - t0) * 1e3)
            if release is not None:
                release()
        alone[str(d)] = statistics.median(xs)
    devices = {}
    for d in groups:
        nb = bytes_per_device[d]
        base = _raw_copy_ms(nb, d, reps)
        conc = statistics.median(per_dev_concurrent[str(d)])
        devices[str(d)] = {
            "kv_bytes": nb, "layers": len(groups[d]),
            "copy_ms_concurrent": conc, "copy_gb_s_concurrent": nb / conc / 1e6,
            "copy_ms_alone": alone[str(d)], "copy_gb_s_alone": nb / alone[str(d)] / 1e6,
            "pinned_d2h_ms": base["d2h"], "pinned_d2h_gb_s": nb / base["d2h"] / 1e6,
            "pinned_h2d_ms": base["h2d"], "pinned_h2d_gb_s": nb / base["h2d"] / 1e6,
            "copy_alone_vs_pinned": base["d2h"] / alone[str(d)],
        }
    s.close()
    whole_ms, restore_ms = statistics.median(whole), statistics.median(restore)
    return {"context": ctx, "kv_bytes": total, "reps": reps,
            "dispatch_ms_median": statistics.median(dispatch), "dispatch_ms_max": max(dispatch),
            "copy_ms_all_devices": whole_ms, "copy_gb_s_all_devices": total / whole_ms / 1e6,
            "restore_ms": restore_ms, "restore_gb_s": total / restore_ms / 1e6,
            "devices": devices}


def _recorded_args(argv: list) -> list:
    """The command line without --results-dir (where the file went, not what ran)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--results-dir":
            skip = True
        elif not arg.startswith("--results-dir="):
            out.append(arg)
    return out


def memory(loaded) -> list:
    return sharding.device_memory([loaded])


def run(args) -> dict:
    name = f"random:{args.shape}"
    result: dict = {"benchmark": "multi_gpu", "model": name, "dtype": args.dtype,
                    "command": " ".join(["bench/multi_gpu_bench.py", *_recorded_args(sys.argv[1:])]),
                    "env": environment("cuda" if torch.cuda.is_available() else "cpu"),
                    "errors": {}}
    if torch.cuda.is_available():
        result["env"]["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    loaded, build_s = build(name, args.dtype, args.device_map, args.max_memory)
    result["build_s"] = build_s
    result["layout"] = layout(loaded)
    result["memory_after_load"] = memory(loaded)
    print("built", name, f"in {build_s:.1f} s:", result["layout"]["layout"],
          f"{result['layout']['params'] / 1e9:.2f} B params", flush=True)
    store = CheckpointStore(budget_bytes=256 << 30, pinned_pool_bytes=args.pinned_pool_mb << 20)
    store.prepare(loaded.devices)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, loaded.vocab_size, (16,), generator=gen).tolist()
    ck = base = None

    def section(key, fn):
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                result[key] = fn()
            print(key, "done in", f"{time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as exc:             # keep what the other sections measured
            result["errors"][key] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()

    def exact():
        nonlocal ck, base
        checks, ck, base = exactness(loaded, prompt, args.exact_tokens, args.exact_tokens // 2, store)
        return checks
    section("exactness", exact)
    section("decode", lambda: decode(loaded, torch.randint(0, loaded.vocab_size, (32,),
                                                               generator=gen).tolist(),
                                      args.tokens, args.reps))
    section("checkpoint", lambda: [checkpoint_bandwidth(loaded, store, c, args.reps)
                                   for c in args.contexts])
    result["memory_peak"] = memory(loaded)
    if ck is not None:
        def other_map():
            if args.smoke:
                other, secs = build(name, args.dtype, None, device="cpu")
            else:
                devs = list(dict.fromkeys(loaded.layer_devices))
                n = loaded.num_layers
                split = [devs[0]] * (n // 4) + [devs[-1]] * (n - n // 4)
                other, secs = build(name, args.dtype,
                                    sharding.split_map(loaded.model, [
                                        d.index if d.type == "cuda" else d.type for d in split]))
            out = across_maps(ck, loaded, other, base, prompt, args.exact_tokens)
            out["build_s"] = secs
            return out
        section("across_device_maps", other_map)
    checks = dict(result.get("exactness", {}))
    checks.pop("probe_layers", None)
    if "across_device_maps" in result:
        checks["across_device_maps"] = result["across_device_maps"]
    result["all_exact"] = bool(checks) and not result["errors"] and all(
        c.get("tokens_equal") and c.get("logits_equal") for c in checks.values()) and all(
        result["exactness"][k].get(f) is not False for k in result["exactness"]
        for f in ("repaused_at_breakpoint", "restored_cache_on_layer_devices", "differs_from_baseline")
        if isinstance(result["exactness"][k], dict))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-13b", help=f"one of {', '.join(RANDOM_SHAPES)}")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device-map", default="auto")
    p.add_argument("--max-memory", default=None, help="e.g. 0=70GiB,1=70GiB")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per timed run")
    p.add_argument("--exact-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--pinned-pool-mb", type=int, default=8192)
    p.add_argument("--out", default="multi_gpu_cuda")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU; no result file")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.dtype, args.tokens, args.reps, args.contexts = "tiny-llama", "float32", 4, 1, [16]
        args.pinned_pool_mb = 0
        args.device_map = '{"model.embed_tokens": "cpu", "model.layers.0": "cpu", ' \
                          '"model.layers.1": "cpu", "model.layers.2": "cpu", "model.layers.3": "cpu", ' \
                          '"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}'
    result = run(args)
    summary = {"all_exact": result["all_exact"], "errors": result["errors"],
               "layout": result["layout"]["layout"]}
    if "decode" in result:
        summary["tokens_per_s"] = {m: round(result["decode"][m]["tokens_per_s"], 2) for m in
                                   ("plain_hf_loop", "server_no_breakpoint", "server_breakpoint_every_step")}
    for row in result.get("checkpoint", []):
        summary[f"ckpt_{row['context']}_gb_s"] = {d: round(v["copy_gb_s_concurrent"], 2)
                                                  for d, v in row["devices"].items()}
    print("summary", summary, flush=True)
    if not args.smoke:
        print("wrote", write_result(args.out, result, Path(args.results_dir)))
    return 0 if result["all_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
