"""Run an experiment config against a kernel server and build its run record.

For every model, repetition, prompt and seed (a *case*) the runner makes:

* a **baseline**: an uninterrupted generation (``return_logits=True``, no stop at EOS);
* a **resume** run: the same generation with breakpoints at the configured layers, resumed
  at every pause with no edit, each call timed and its bytes on the wire counted;
* **steering** runs: one generation per steering op / sweep value (a standing rule at the
  steering layer), compared with the baseline both free-running (``dj.divergence``) and
  teacher-forced on the baseline's tokens (``session.score``);
* **checkpoint** runs: a pause at layer 0 of each scheduled step, three ways: no checkpoint
  (control), checkpoint then wait for the copy (copy time), checkpoint then resume at once
  (generation while the copy runs); then restore + continue from each checkpoint.

Repetitions are the outer loop, so slow drift of the machine hits every condition alike.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from djinn_protocol.checkpoint_file import read_header, read_metadata
from djinn_protocol.errors import DjinnError

from ..results import Finished, Paused
from .config import clip_layer, clip_layers, config_hash
from .stats import HOW, clean

RECORD_FORMAT = "djinn-experiment-record/1"
PROBE_PROMPT = "The quick brown fox"
PROBE_TOKENS = 4


# ---- small helpers ------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version(), "platform": platform.platform(),
           "machine": platform.machine(), "processor_count": os.cpu_count()}
    for dist in ("djinn_nb", "numpy", "rpyc", "pyyaml", "jsonschema", "tqdm", "plotly",
                 "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _wire_bytes(client) -> int:
    st = client.stats()
    return int(st["bytes_sent"]) + int(st["bytes_received"]) + int(st.get("bulk_bytes_received", 0))


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) * 1e3


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}


# ---- per model -----------------------------------------------------------------------------
def probe_model(s) -> dict:
    """Facts about the session's model: what session.info() says, a fingerprint of its
    outputs, the KV cache layout and the server's versions (from a probe checkpoint file)."""
    info = s.info()
    facts = {k: info.get(k) for k in ("model", "architecture", "layers", "hidden_size",
                                      "vocab_size", "device", "dtype")}
    notes = []
    ev = s.generate(PROBE_PROMPT, max_new_tokens=PROBE_TOKENS, return_logits=True,
                    stop_at_eos=False)
    res = ev.result
    h = hashlib.sha256()
    h.update(json.dumps({"prompt": res.prompt_tokens, "tokens": res.tokens}).encode())
    h.update(np.ascontiguousarray(res.logits, dtype="<f4").tobytes())
    fingerprint = h.hexdigest()
    ck = s.checkpoint()
    ck.wait()
    kv_per_pos = ck.kv_nbytes / ck.positions if ck.positions else None
    kv_layout, server_versions = None, None
    tmp = Path(tempfile.mkdtemp(prefix="djinn-probe-")) / "probe.djckpt"
    try:
        ck.save(tmp)
        data = tmp.read_bytes()
        header, meta = read_header(data), read_metadata(data)
        server_versions = meta.get("versions")
        keys = header.get("kv.0.keys")
        if keys:
            shape = keys["shape"]          # [batch, kv_heads, positions, head_dim]
            layers = int(meta.get("kv_layers", 0))
            item = _ITEMSIZE.get(keys["dtype"])
            kv_layout = {"kv_layers": layers, "kv_heads": int(shape[1]), "head_dim": int(shape[-1]),
                         "dtype": keys["dtype"], "itemsize": item,
                         "bytes_per_position": (layers * 2 * int(shape[1]) * int(shape[-1]) * item
                                                if item else None)}
    except (DjinnError, OSError, ValueError, KeyError) as exc:
        notes.append(f"could not read the probe checkpoint file ({type(exc).__name__}: {exc}); "
                     "no KV layout or server versions")
    finally:
        try:
            tmp.unlink()
            tmp.parent.rmdir()
        except OSError:
            pass
        ck.delete()
    if kv_layout and kv_per_pos and kv_layout["bytes_per_position"] != kv_per_pos:
        notes.append(f"KV bytes per position differ: checkpoint kv_nbytes says {kv_per_pos:g}, "
                     f"the layout {kv_layout['bytes_per_position']}")
    return {
        "facts": facts,
        "session_info": clean({k: v for k, v in info.items() if k not in ("id", "state")}),
        "model_hash": {
            "value": fingerprint, "kind": "output-fingerprint",
            "how": (f"the server reports no weight hash (session.info() gives only "
                    f"{', '.join(sorted(facts))}); this is sha256 of the prompt ids, the "
                    f"{PROBE_TOKENS} greedy tokens and their float32 logits for the probe prompt "
                    f"{PROBE_PROMPT!r}: equal for equal weights, dtype, device and kernels")},
        "kv_bytes_per_position": kv_per_pos,
        "kv_layout": kv_layout,
        "server_versions": server_versions,
        "notes": notes,
    }


def _variants(st: dict) -> list[dict]:
    """The steering variants of a config: headline ops and sweep values, deduplicated."""
    out: dict[str, dict] = {}

    def add(op: str, value: float, vector: Optional[dict], label: Optional[str], where: str):
        vkey = json.dumps(vector, sort_keys=True) if vector else ""
        key = f"{op}:{float(value)!r}:{vkey}"
        if key not in out:
            default = f"scale {value:g}" if op == "scale" else f"add alpha {value:g}"
            out[key] = {"key": key, "label": label or default, "op": op, "value": float(value),
                        "vector": vector, "in_ops": False, "in_sweep": False}
        elif label and where == "ops":
            out[key]["label"] = label
        out[key]["in_" + where] = True

    for op in st.get("ops") or []:
        add(op["op"], op["scale"] if op["op"] == "scale" else op["alpha"], op.get("vector"),
            op.get("label"), "ops")
    sweep = st.get("sweep")
    if sweep:
        for v in sweep["values"]:
            add(sweep["op"], v, sweep.get("vector") if sweep["op"] == "add" else None, None, "sweep")
    return list(out.values())


# ---- one case ------------------------------------------------------------------------------
class _Case:
    def __init__(self, runner, s, ctx, prompt_index, prompt, seed, rep):
        self.r, self.s, self.ctx = runner, s, ctx
        self.client = s.client
        self.cfg = runner.cfg
        self.prompt_index, self.prompt, self.seed, self.rep = prompt_index, prompt, seed, rep
        smp = self.cfg["sampling"]
        self.gen = dict(max_new_tokens=self.cfg["max_new_tokens"], temperature=smp["temperature"],
                        top_k=smp.get("top_k"), top_p=smp.get("top_p"), seed=seed,
                        stop_at_eos=False, return_logits=True)

    def run(self) -> dict:
        s = self.s
        s.clear_breakpoints()
        s.clear_steering()
        out = {"rep": self.rep, "prompt_index": self.prompt_index, "seed": self.seed}
        ev, wall = _timed(s.generate, self.prompt, **self.gen)
        if not isinstance(ev, Finished):
            raise DjinnError(f"the baseline generation paused unexpectedly at {ev}")
        self.base = ev.result
        self.base_wall_ms = wall
        out["baseline"] = {"tokens": self.base.tokens, "text": self.base.text,
                           "prompt_tokens": len(self.base.prompt_tokens), "seed": self.base.seed,
                           "stop_reason": self.base.stop_reason, "wall_ms": wall,
                           "forward_ms": [r.forward_ms for r in self.base.steps]}
        pings = [self.client.ping() for _ in range(self.cfg["latency"]["pings"])]
        out["ping_ms"] = pings
        self.rtt = float(np.median(pings))
        if self.ctx["breakpoints"]:
            out["resume"] = self.resume_run()
        if self.ctx["steering_layer"] is not None and self.ctx["variants"]:
            out["steering"] = self.steering_runs()
        if self.ctx["checkpoint_steps"]:
            out["checkpoints"] = self.checkpoint_runs()
        return clean(out)

    # -- resume accuracy, latency, KV residency
    def resume_run(self) -> dict:
        s, client = self.s, self.client
        for layer in self.ctx["breakpoints"]:
            s.breakpoint(layer, phase=self.cfg["breakpoints"]["phase"])
        calls = []
        b0 = _wire_bytes(client)
        ev, wall = _timed(s.generate, self.prompt, **self.gen)
        calls.append({"call": "generate", "wall_ms": wall, "wire_bytes": _wire_bytes(client) - b0,
                      **self._ends(ev)})
        while isinstance(ev, Paused):
            b0 = _wire_bytes(client)
            ev, wall = _timed(s.resume)
            calls.append({"call": "resume", "wall_ms": wall, "wire_bytes": _wire_bytes(client) - b0,
                          **self._ends(ev)})
        s.clear_breakpoints()
        res = ev.result
        n = len(res.steps)
        per_pos = self.ctx["kv_bytes_per_position"]
        p_len = len(res.prompt_tokens)
        for c in calls:
            if c["ends"] == "paused":
                positions = p_len + c["step"] - 1 if c["step"] > 0 else 0
                c["kv_positions"] = positions
                c["kv_bytes"] = positions * per_pos if per_pos else None
        forward = [r.forward_ms for r in res.steps]
        steady = [c for c in calls[1:] if c["ends"] == "paused" and 2 <= c["step"] <= n - 1]
        steady_steps = sorted({c["step"] for c in steady})
        client_ms = compute_ms = None
        if steady:
            client_ms = sum(c["wall_ms"] for c in steady) / len(steady)
            compute_ms = sum(forward[k] for k in steady_steps) / len(steady)
        pauses = sum(1 for c in calls if c["ends"] == "paused")
        t_bp = sum(c["wall_ms"] for c in calls)
        base = self.base
        overhead_vs_plain = None
        if pauses:
            overhead_vs_plain = ((t_bp - sum(forward))
                                 - (self.base_wall_ms - sum(r.forward_ms for r in base.steps))) / pauses
        paused_resumes = [c for c in calls[1:] if c["ends"] == "paused"]
        ratios = [c["wire_bytes"] / c["kv_bytes"] for c in paused_resumes
                  if c.get("kv_bytes")]
        same_steps = sum(1 for a, b in zip(res.tokens, base.tokens) if a == b)
        return {
            "tokens": res.tokens,
            "tokens_identical": res.tokens == base.tokens,
            "steps_identical": same_steps, "steps": max(len(res.tokens), len(base.tokens)),
            "logits_identical": bool(res.logits is not None and base.logits is not None
                                     and res.logits.shape == base.logits.shape
                                     and np.array_equal(res.logits, base.logits)),
            "max_abs_logit_diff": (float(np.abs(res.logits - base.logits).max())
                                   if res.logits is not None and base.logits is not None
                                   and res.logits.shape == base.logits.shape and res.logits.size
                                   else None),
            "pauses": pauses, "calls": calls, "forward_ms": forward,
            "paused_ms": [r.paused_ms for r in res.steps],
            "steady_resumes": len(steady),
            "resume_client_ms": client_ms, "resume_compute_ms": compute_ms,
            "resume_beyond_compute_ms": (None if client_ms is None else client_ms - compute_ms),
            "network_rtt_ms": self.rtt,
            "server_overhead_ms": (None if client_ms is None else client_ms - compute_ms - self.rtt),
            "pause_overhead_vs_uninterrupted_ms": overhead_vs_plain,
            "wire_bytes_per_resume": (float(np.median([c["wire_bytes"] for c in paused_resumes]))
                                      if paused_resumes else None),
            "kv_bytes_at_pause": (float(np.median([c["kv_bytes"] for c in paused_resumes
                                                   if c.get("kv_bytes") is not None]))
                                  if any(c.get("kv_bytes") for c in paused_resumes) else None),
            "wire_over_kv": max(ratios) if ratios else None,
            "result_bytes": calls[-1]["wire_bytes"],
        }

    @staticmethod
    def _ends(ev) -> dict:
        if isinstance(ev, Paused):
            return {"ends": "paused", "layer": ev.layer, "step": ev.step}
        return {"ends": "finished", "layer": None, "step": None}

    # -- steering: free-running and teacher-forced
    def steering_runs(self) -> list:
        from ..divergence import divergence
        s = self.s
        layer = self.ctx["steering_layer"]
        full = list(self.base.prompt_tokens) + list(self.base.tokens)
        start = len(self.base.prompt_tokens)
        top_k = self.cfg["steering"]["score_top_k"]
        unsteered_lp = None
        out = []
        for var in self.ctx["variants"]:
            if var["op"] == "scale":
                rule = {"layer": layer, "scale": var["value"]}
                s.steer(layer, scale=var["value"])
            else:
                vec = self.ctx["vectors"][json.dumps(var["vector"], sort_keys=True)]
                rule = {"layer": layer, "add": vec, "alpha": var["value"]}
                s.steer(layer, add=vec, alpha=var["value"])
            try:
                ev, wall = _timed(s.generate, self.prompt, **self.gen)
            finally:
                s.clear_steering()
            steered = ev.result
            d = divergence(self.base, steered)
            entry = {"key": var["key"], "tokens": steered.tokens, "wall_ms": wall,
                     "free": {**d.summary(), "kl": d.kl, "tv": d.tv, "top1_agree": d.top1_agree,
                              "rel_logit_change": d.rel_logit_change}}
            sc = s.score(full, start=start, steering=[rule], compare=True, top_k=top_k)
            lp = np.asarray(sc.token_logprobs, dtype=np.float64)
            if unsteered_lp is None:       # the same for every variant: read it once
                unsteered_lp = np.asarray(sc.baseline_token_logprobs, dtype=np.float64)
            kl, tv = np.asarray(sc.kl, np.float64), np.asarray(sc.tv, np.float64)
            agree = np.asarray(sc.top1_agree, bool)
            rel = np.asarray(sc.rel_logit_change, np.float64)
            entry["teacher_forced"] = {
                "positions": int(len(lp)),
                "mean_kl": float(kl.mean()) if kl.size else 0.0,
                "mean_tv": float(tv.mean()) if tv.size else 0.0,
                "top1_agreement": float(agree.mean()) if agree.size else 1.0,
                "mean_rel_logit_change": float(rel.mean()) if rel.size else 0.0,
                "mean_delta_logprob": float((lp - unsteered_lp).mean()) if lp.size else None,
                "kl": kl, "tv": tv, "top1_agree": agree, "rel_logit_change": rel,
                "token_logprobs": lp}
            # before the first divergent token both runs saw the same context, so the
            # teacher-forced and the free-running KL must agree there (up to rounding)
            same = d.first_divergent_step if d.first_divergent_step is not None else d.steps
            m = min(same + 1, len(kl), len(d.kl))
            entry["teacher_forced"]["kl_vs_free_max_abs_diff"] = (
                float(np.abs(kl[:m] - d.kl[:m]).max()) if m else None)
            out.append(entry)
        return out

    # -- checkpoint cost
    def checkpoint_runs(self) -> dict:
        s = self.s
        steps = self.ctx["checkpoint_steps"]
        w = self.cfg["checkpoints"]["overlap_steps"]
        s.breakpoint(0, phase="decode", steps=steps)
        try:
            control = self._drive(lambda ev: None)
            taken = []

            def blocking(ev):
                ck, dispatch = _timed(s.checkpoint)
                _, wait = _timed(ck.wait)
                taken.append({"step": ev.step, "ck": ck, "dispatch_client_ms": dispatch,
                              "dispatch_server_ms": ck.dispatch_ms, "copy_wait_ms": wait,
                              "ready_ms": dispatch + wait, "positions": ck.positions,
                              "kv_nbytes": ck.kv_nbytes, "nbytes": ck.nbytes})
            blocked = self._drive(blocking)
            overlapped_cks = []

            def overlapping(ev):
                ck, dispatch = _timed(s.checkpoint)
                overlapped_cks.append({"step": ev.step, "ck": ck, "dispatch_client_ms": dispatch,
                                       "dispatch_server_ms": ck.dispatch_ms})
            overlapped = self._drive(overlapping, after=lambda: self._ready_after(overlapped_cks))
        finally:
            s.clear_breakpoints()

        def window(forward, k):
            return float(sum(forward[k:k + w]))
        events = []
        for b in taken:
            k = b["step"]
            o = next((o for o in overlapped_cks if o["step"] == k), None)
            ev = {key: v for key, v in b.items() if key != "ck"}
            ev.update({
                "overlap_dispatch_client_ms": o["dispatch_client_ms"] if o else None,
                "overlap_dispatch_server_ms": o["dispatch_server_ms"] if o else None,
                "copy_running_after_resume": o.get("running_after_resume") if o else None,
                "window_steps": len(control["forward_ms"][k:k + w]),
                "control_window_ms": window(control["forward_ms"], k),
                "blocking_window_ms": window(blocked["forward_ms"], k),
                "overlap_window_ms": window(overlapped["forward_ms"], k),
            })
            ev["generation_overhead_ms"] = ev["overlap_window_ms"] - ev["control_window_ms"]
            ev["generation_overhead_vs_blocking_ms"] = ev["overlap_window_ms"] - ev["blocking_window_ms"]
            if self.cfg["checkpoints"]["restore"]:
                _, restore_ms = _timed(s.restore, b["ck"])
                fin, cont_ms = _timed(s.resume, ignore_breakpoints=True)
                s.clear_breakpoints()
                ev.update({"restore_ms": restore_ms, "restore_continue_ms": cont_ms,
                           "restore_exact": isinstance(fin, Finished)
                           and fin.result.tokens == self.base.tokens})
            events.append(ev)
        for c in taken + overlapped_cks:
            try:
                c["ck"].wait()
                c["ck"].delete()
            except DjinnError:
                pass
        return {"steps": steps, "overlap_steps": w, "events": events,
                "control_tokens_identical": control["tokens"] == self.base.tokens,
                "overlap_tokens_identical": overlapped["tokens"] == self.base.tokens}

    def _ready_after(self, cks):
        # after the resume that followed the latest checkpoint: is its copy still running?
        if cks and "running_after_resume" not in cks[-1]:
            cks[-1]["running_after_resume"] = not cks[-1]["ck"].ready()

    def _drive(self, at_pause, after=None) -> dict:
        s = self.s
        ev = s.generate(self.prompt, **self.gen)
        while isinstance(ev, Paused):
            at_pause(ev)
            ev = s.resume()
            if after is not None:
                after()
        return {"tokens": ev.result.tokens, "forward_ms": [r.forward_ms for r in ev.result.steps]}


# ---- the runner ----------------------------------------------------------------------------
class StudyRunner:
    """Runs one validated config on a connected client; :meth:`run` returns the record dict."""

    def __init__(self, cfg: dict, client, progress: bool = True):
        self.cfg = cfg
        self.client = client
        self.progress = progress

    def _open(self, model: str):
        try:
            return self.client.session(model=model)
        except DjinnError as exc:
            raise type(exc)(f"experiment {self.cfg['name']!r}: the server at "
                            f"{self.client.address} cannot open model {model!r}: {exc}") from None

    def _model_context(self, s, probe: dict) -> dict:
        cfg = self.cfg
        layers = s.layers
        ctx = {"kv_bytes_per_position": probe["kv_bytes_per_position"], "breakpoints": [],
               "steering_layer": None, "variants": [], "vectors": {}, "checkpoint_steps": []}
        layer_info = {"model_layers": layers}
        if cfg["breakpoints"]:
            ctx["breakpoints"] = clip_layers(cfg["breakpoints"]["layers"], layers)
            layer_info.update(breakpoints_requested=cfg["breakpoints"]["layers"],
                              breakpoints=ctx["breakpoints"])
        if cfg["steering"]:
            st = cfg["steering"]
            ctx["steering_layer"] = clip_layer(st["layer"], layers)
            ctx["variants"] = _variants(st)
            layer_info.update(steering_requested=st["layer"], steering=ctx["steering_layer"])
            for var in ctx["variants"]:
                if var["op"] == "add":
                    key = json.dumps(var["vector"], sort_keys=True)
                    if key not in ctx["vectors"]:
                        v = var["vector"]
                        ctx["vectors"][key] = np.asarray(s.steering_vector(
                            positive=v["positive"], negative=v["negative"],
                            layer=ctx["steering_layer"], reduce=v["reduce"]), dtype=np.float32)
        if cfg["checkpoints"]:
            ctx["checkpoint_steps"] = sorted(k for k in cfg["checkpoints"]["at_steps"]
                                             if k < cfg["max_new_tokens"])
            layer_info["checkpoint_steps"] = ctx["checkpoint_steps"]
        ctx["layer_info"] = layer_info
        return ctx

    def run(self) -> dict:
        from tqdm.auto import tqdm
        from .aggregate import model_metrics
        cfg = self.cfg
        started = time.perf_counter()
        record = {
            "format": RECORD_FORMAT, "name": cfg["name"], "description": cfg.get("description", ""),
            "created": _now(),
            "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
            "config_path": cfg.get("_source"), "config_sha256": config_hash(cfg),
            "how_measured": dict(HOW),
            "environment": {
                "client": _versions(),
                "server": {"address": self.client.address,
                           "info": clean(self.client.server_info)},
                "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None},
            "models": [], "notes": [],
        }
        per_model = len(cfg["prompts"]) * len(cfg["seeds"]) * cfg["repetitions"]
        total = per_model * len(cfg["models"])
        with tqdm(total=total, desc=cfg["name"], unit="run", disable=not self.progress) as bar:
            for model in cfg["models"]:
                bar.set_postfix_str(f"{model}: loading")
                s = self._open(model)
                try:
                    probe = probe_model(s)
                    ctx = self._model_context(s, probe)
                    cases = []
                    for rep in range(cfg["repetitions"]):
                        for pi, prompt in enumerate(cfg["prompts"]):
                            for seed in cfg["seeds"]:
                                bar.set_postfix_str(f"{model} rep {rep + 1}/{cfg['repetitions']} "
                                                    f"prompt {pi + 1} seed {seed}")
                                cases.append(_Case(self, s, ctx, pi, prompt, seed, rep).run())
                                bar.update(1)
                finally:
                    try:
                        s.close()
                    except DjinnError:
                        pass
                entry = {
                    "model": model, **probe, "layers": ctx["layer_info"],
                    "steering_variants": [{k: v for k, v in var.items()}
                                          for var in ctx["variants"]],
                    "cases": cases,
                }
                entry["metrics"] = model_metrics(entry, cfg)
                record["models"].append(clean(entry))
        record["finished"] = _now()
        record["duration_s"] = time.perf_counter() - started
        return clean(record)


def connect_for(cfg: dict, server: Optional[str] = None, token: Optional[str] = None,
                device: Optional[str] = None, dtype: Optional[str] = None, progress: bool = True):
    """A client for a study: ``server`` if given, else ``$DJINN_SERVER``, else a local server
    launched on the config's first model (stopped when the client closes)."""
    from ..client import SERVER_ENV
    from ..connect import connect
    if server:
        return connect(server, token=token)
    if os.environ.get(SERVER_ENV) and device is None and dtype is None:
        return connect(token=token)
    return connect(model=cfg["models"][0], device=device, dtype=dtype, progress=progress)
