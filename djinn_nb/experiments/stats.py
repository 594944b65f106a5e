"""Summary statistics of repeated measurements: a median and its spread, never one run."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np


def clean(x):
    """``x`` as JSON-safe builtins: numpy scalars and arrays unpacked, NaN/inf as None."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    return x


def summarize(samples: Iterable[Optional[float]]) -> dict:
    """n, median, p10/p90, quartiles, min/max and mean of the finite samples (None when none)."""
    vals = np.asarray([float(v) for v in samples if v is not None and math.isfinite(float(v))],
                      dtype=np.float64)
    if vals.size == 0:
        return {"n": 0, "median": None, "p10": None, "p90": None, "q1": None, "q3": None,
                "min": None, "max": None, "mean": None}
    p10, q1, med, q3, p90 = np.percentile(vals, [10, 25, 50, 75, 90])
    return clean({"n": int(vals.size), "median": med, "p10": p10, "p90": p90, "q1": q1, "q3": q3,
                  "min": vals.min(), "max": vals.max(), "mean": vals.mean()})


def metric(name: str, unit: str, how: str, samples, *, keep_samples: bool = True, **extra) -> dict:
    """A metric entry of the record: summary statistics, how it was measured, the samples."""
    samples = [None if v is None else float(v) for v in samples]
    out = {"name": name, "unit": unit, "how_measured": how, **summarize(samples)}
    if keep_samples:
        out["samples"] = clean(samples)
    out.update(clean(extra))
    return out


#: how each metric is measured (copied into the record next to the numbers)
HOW = {
    "resume_token_identity":
        "per run: 1 if the tokens of a generation paused at every breakpoint (each configured "
        "layer, every decode step) and resumed with no edit equal, position by position, the "
        "tokens of the uninterrupted baseline generated just before (same prompt, seed, "
        "sampling), else 0; over all runs (prompts x seeds x repetitions). Must be 1.",
    "resume_logits_identity":
        "per run: 1 if the [steps, vocab] float32 logits returned by the resumed run are "
        "bit-identical to the baseline's (np.array_equal), else 0.",
    "mismatch_rate":
        "free-running: fraction of generated steps whose token differs between the steered "
        "and the baseline generation of the same prompt and seed (dj.divergence).",
    "first_divergent_step":
        "free-running: first step whose steered token differs from the baseline's; runs that "
        "never diverge are left out (their count is in `diverged_runs`).",
    "kl":
        "free-running: mean over steps of KL(baseline || steered) of the next-token "
        "distributions, in nats, from the logits both generations returned (dj.divergence); "
        "after the first divergent token the two contexts differ.",
    "tv": "free-running: mean over steps of the total variation distance (dj.divergence).",
    "top1_agreement": "free-running: fraction of steps whose argmax tokens agree (dj.divergence).",
    "rel_logit_change":
        "free-running: mean over steps of ||steered - baseline|| / ||baseline|| of the logit "
        "vectors (dj.divergence).",
    "tf_kl":
        "teacher-forced: session.score(prompt + baseline tokens, start=len(prompt), "
        "steering=[rule], compare=True): one server-side pass over the baseline's tokens with "
        "the rule and one without; mean over positions of KL(unsteered || steered), nats. "
        "Same contexts for both, so it isolates the rule's effect.",
    "tf_tv": "teacher-forced (session.score, compare=True): mean total variation distance.",
    "tf_top1_agreement": "teacher-forced (session.score, compare=True): fraction of positions "
                         "whose argmax agrees with the unsteered pass.",
    "tf_rel_logit_change": "teacher-forced (session.score, compare=True): mean relative logit "
                           "change ||steered - unsteered|| / ||unsteered||.",
    "tf_delta_logprob":
        "teacher-forced: mean over positions of log p_steered(baseline token) - "
        "log p_unsteered(baseline token), from two session.score passes (steering=[rule] and "
        "steering=None); negative: the rule makes the baseline's own continuation less likely.",
    "resume_client_ms":
        "client-observed wall time of one session.resume() from a pause to the next pause "
        "(time.perf_counter around the call), averaged over the steady-state resumes of a run "
        "(those ending at pauses of decode steps 2..n-1); one sample per run.",
    "resume_compute_ms":
        "server compute per steady-state resume: the step records' forward_ms (forward time "
        "excluding time paused) of steps 2..n-1 summed and divided by the resumes that end in "
        "those steps (the resumes ending at step k's pauses compute the end of step k-1 and the "
        "start of step k, together one step; the result-logits copy per step is not in it).",
    "resume_beyond_compute_ms": "resume_client_ms - resume_compute_ms: what a pause costs "
                                "beyond the model's own work (server overhead + network).",
    "network_rtt_ms":
        "median of `latency.pings` client.ping() calls in the same run: one no-op call's round "
        "trip (network + rpyc framing on both ends, no server work).",
    "server_overhead_ms": "resume_beyond_compute_ms - network_rtt_ms: the server's own share "
                          "(hooks, thread hand-offs, event encoding, the per-step logits copy).",
    "pause_overhead_vs_uninterrupted_ms":
        "((sum of client wall times of generate + every resume of the breakpoint run - its "
        "summed forward_ms) - (the baseline's client wall time - its summed forward_ms)) / "
        "number of pauses: the extra cost per pause against the uninterrupted run, with no "
        "per-step compute estimate.",
    "wire_bytes_per_resume":
        "bytes both ways on the client's socket (client.stats() bytes_sent + bytes_received, "
        "counted in the socket stream) plus bulk-path bytes, around one resume() that ends in "
        "a pause; median per run.",
    "kv_bytes_at_pause":
        "size of the KV cache at that pause: (prompt + step - 1) positions complete in every "
        "layer x bytes per position (a probe checkpoint's kv_nbytes / positions; the layers "
        "before the pause also hold this token's entry, so this is a lower bound); median per run.",
    "wire_over_kv":
        "largest ratio wire bytes / KV bytes over the run's resumes (pauses at step 0, with "
        "an empty cache, are left out).",
    "result_bytes":
        "bytes on the wire of the final resume, which returns the finished result (tokens, "
        "step records and the [steps, vocab] logits asked for).",
    "checkpoint_dispatch_client_ms":
        "client wall time of session.checkpoint() while paused at layer 0 of a scheduled step "
        "(the call returns before the device-to-host copy is done).",
    "checkpoint_dispatch_server_ms": "the server's own dispatch time reported in the "
                                     "checkpoint's description (Checkpoint.dispatch_ms).",
    "checkpoint_copy_wait_ms":
        "client wall time of ck.wait() called right after checkpoint() returned: the rest of "
        "the copy plus one round trip (the server reports no copy duration).",
    "checkpoint_ready_ms": "client wall time from the checkpoint() call until wait() returned.",
    "checkpoint_restore_ms":
        "client wall time of session.restore(ck) (host-to-device cache copy, one round trip, "
        "the session description); the checkpoints are ready (taken with wait()).",
    "checkpoint_restore_continue_ms":
        "client wall time of resume(ignore_breakpoints=True) right after a restore: the rest "
        "of the generation from the checkpoint's step.",
    "checkpoint_restore_exact":
        "per restore: 1 if restore + continue gives exactly the baseline's tokens, else 0.",
    "checkpoint_generation_overhead_ms":
        "forward_ms summed over the `overlap_steps` steps from a checkpoint's step, in a run "
        "that resumed right after checkpoint() (copy in flight), minus the same steps of a "
        "control run paused at the same points without a checkpoint.",
    "checkpoint_copy_running_after_resume":
        "per checkpoint of the overlapped run: 1 if ck.ready() was still False when the next "
        "resume() returned (the copy really overlapped generation), else 0.",
}
