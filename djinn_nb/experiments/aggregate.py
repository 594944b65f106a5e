"""From the cases of one model to its metrics: medians with spread, each with how it was measured.

Everything here reads only the record's own data, so ``report`` can recompute it offline.
"""
from __future__ import annotations

from collections import defaultdict

from .stats import HOW, metric


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d


def _frac(values) -> list:
    return [None if v is None else float(bool(v)) for v in values]


def model_metrics(entry: dict, cfg: dict) -> dict:
    cases = entry["cases"]
    out: dict = {}
    # determinism: the same (prompt, seed) gives the same baseline tokens in every repetition
    by_key = defaultdict(list)
    for c in cases:
        by_key[(c["prompt_index"], c["seed"])].append(c["baseline"]["tokens"])
    out["determinism"] = {
        "baseline_identical_across_repetitions": all(all(t == v[0] for t in v)
                                                     for v in by_key.values()),
        "how_measured": "for every prompt and seed, the baseline tokens of all repetitions are "
                        "compared with the first repetition's",
    }
    res = [c["resume"] for c in cases if c.get("resume")]
    if res:
        runs = len(res)
        ok = sum(bool(r["tokens_identical"]) for r in res)
        out["resume"] = {
            "token_identity": metric(
                "resume accuracy (tokens identical)", "fraction", HOW["resume_token_identity"],
                _frac(r["tokens_identical"] for r in res), runs=runs, identical_runs=ok,
                value=ok / runs, steps_identical=sum(r["steps_identical"] for r in res),
                steps_total=sum(r["steps"] for r in res),
                pauses_per_run=[r["pauses"] for r in res]),
            "logits_identity": metric(
                "resumed logits bit-identical", "fraction", HOW["resume_logits_identity"],
                _frac(r["logits_identical"] for r in res),
                value=sum(bool(r["logits_identical"]) for r in res) / runs,
                max_abs_logit_diff=max((r["max_abs_logit_diff"] or 0.0) for r in res)),
        }
        lat = {}
        for key, name in (("resume_client_ms", "resume latency, client-observed"),
                          ("resume_compute_ms", "server compute per resume"),
                          ("resume_beyond_compute_ms", "beyond compute per resume"),
                          ("network_rtt_ms", "network (no-op round trip)"),
                          ("server_overhead_ms", "server overhead per resume"),
                          ("pause_overhead_vs_uninterrupted_ms", "extra time per pause vs uninterrupted")):
            lat[key] = metric(name, "ms", HOW[key], [r[key] for r in res])
        walls = [c["wall_ms"] for r in res for c in r["calls"][1:] if c["ends"] == "paused"]
        lat["resume_wall_all_ms"] = metric(
            "every resume ending in a pause, pooled", "ms",
            "client wall time of each resume() that ended in a pause, all runs pooled "
            "(includes the partial-step resumes the steady-state figures leave out)",
            walls, keep_samples=False)
        out["latency"] = lat
        kv = {}
        for key, name, unit in (("wire_bytes_per_resume", "bytes on the wire per resume", "bytes"),
                                ("kv_bytes_at_pause", "KV cache at the pause", "bytes"),
                                ("wire_over_kv", "wire bytes / KV bytes (max per run)", "ratio"),
                                ("result_bytes", "final result transfer", "bytes")):
            kv[key] = metric(name, unit, HOW[key], [r[key] for r in res])
        out["kv"] = kv
    st_cases = [c["steering"] for c in cases if c.get("steering")]
    if st_cases:
        variants = []
        for var in entry.get("steering_variants", []):
            rows = [e for sc in st_cases for e in sc if e["key"] == var["key"]]
            free = [e["free"] for e in rows]
            tf = [e.get("teacher_forced") for e in rows]
            fds = [f["first_divergent_step"] for f in free]
            m = {
                "mismatch_rate": metric("token mismatch", "fraction", HOW["mismatch_rate"],
                                        [f["mismatch_rate"] for f in free]),
                "first_divergent_step": metric("first divergent step", "step",
                                               HOW["first_divergent_step"],
                                               [v for v in fds if v is not None],
                                               diverged_runs=sum(v is not None for v in fds),
                                               runs=len(fds)),
                "kl": metric("KL (free-running)", "nats", HOW["kl"], [f["mean_kl"] for f in free]),
                "tv": metric("TV (free-running)", "", HOW["tv"], [f["mean_tv"] for f in free]),
                "top1_agreement": metric("top-1 agreement (free-running)", "fraction",
                                         HOW["top1_agreement"], [f["top1_agreement"] for f in free]),
                "rel_logit_change": metric("relative logit change (free-running)", "ratio",
                                           HOW["rel_logit_change"],
                                           [f["mean_rel_logit_change"] for f in free]),
            }
            for key, field, name, unit in (
                    ("tf_kl", "mean_kl", "KL (teacher-forced)", "nats"),
                    ("tf_tv", "mean_tv", "TV (teacher-forced)", ""),
                    ("tf_top1_agreement", "top1_agreement", "top-1 agreement (teacher-forced)", "fraction"),
                    ("tf_rel_logit_change", "mean_rel_logit_change",
                     "relative logit change (teacher-forced)", "ratio"),
                    ("tf_delta_logprob", "mean_delta_logprob",
                     "change in log p(baseline token) (teacher-forced)", "nats")):
                m[key] = metric(name, unit, HOW[key], [_get(t, field) for t in tf])
            variants.append({**{k: var[k] for k in ("key", "label", "op", "value", "in_ops",
                                                      "in_sweep")}, "metrics": m})
        out["steering"] = {"layer": _get(entry, "layers", "steering"),
                           "layer_requested": _get(entry, "layers", "steering_requested"),
                           "variants": variants}
    ck_cases = [c["checkpoints"] for c in cases if c.get("checkpoints")]
    if ck_cases:
        events = [e for c in ck_cases for e in c["events"]]
        ck = {}
        for key, field, name in (
                ("checkpoint_dispatch_client_ms", "dispatch_client_ms", "dispatch (client)"),
                ("checkpoint_dispatch_server_ms", "dispatch_server_ms", "dispatch (server)"),
                ("checkpoint_copy_wait_ms", "copy_wait_ms", "copy: wait() after dispatch (client)"),
                ("checkpoint_ready_ms", "ready_ms", "dispatch until ready (client)"),
                ("checkpoint_restore_ms", "restore_ms", "restore (client)"),
                ("checkpoint_restore_continue_ms", "restore_continue_ms", "continue after restore"),
                ("checkpoint_generation_overhead_ms", "generation_overhead_ms",
                 "generation overhead while the copy runs")):
            ck[key] = metric(name, "ms", HOW[key], [e.get(field) for e in events])
        ck["checkpoint_restore_exact"] = metric(
            "restore + continue gives the baseline tokens", "fraction",
            HOW["checkpoint_restore_exact"], _frac(e.get("restore_exact") for e in events))
        ck["checkpoint_copy_running_after_resume"] = metric(
            "copy still running when the next resume returned", "fraction",
            HOW["checkpoint_copy_running_after_resume"],
            _frac(e.get("copy_running_after_resume") for e in events))
        ck["kv_nbytes"] = metric("checkpoint KV bytes", "bytes",
                                 "Checkpoint.kv_nbytes of each checkpoint taken",
                                 [e.get("kv_nbytes") for e in events], keep_samples=False)
        out["checkpoint"] = ck
    return out
