"""Divergence between a baseline and a steered generation from the same prompt and model.

Computed on the client from the logits both runs returned (``return_logits=True``):
token mismatch rate, first divergent step, per-step KL(baseline || steered) and total
variation of the next-token distributions, top-1 agreement, relative logit change.
Both runs are free-running: after the first divergent token their contexts differ, so
later per-step numbers compare distributions over different prefixes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from djinn_protocol.errors import InvalidArgumentError


@dataclass(frozen=True)
class Divergence:
    steps: int                   # steps compared (the shorter run)
    mismatch_rate: float         # fraction of compared steps whose tokens differ
    first_divergent_step: int | None
    kl: np.ndarray               # [steps] KL(baseline || steered), nats
    tv: np.ndarray               # [steps] total variation distance
    top1_agree: np.ndarray       # [steps] bool: same argmax
    rel_logit_change: np.ndarray  # [steps] ||steered - baseline|| / ||baseline||

    def summary(self) -> dict:
        return {"steps": self.steps, "mismatch_rate": self.mismatch_rate,
                "first_divergent_step": self.first_divergent_step,
                "mean_kl": float(self.kl.mean()) if self.steps else 0.0,
                "max_kl": float(self.kl.max()) if self.steps else 0.0,
                "mean_tv": float(self.tv.mean()) if self.steps else 0.0,
                "top1_agreement": float(self.top1_agree.mean()) if self.steps else 1.0,
                "mean_rel_logit_change": float(self.rel_logit_change.mean()) if self.steps else 0.0}


def _result(x):
    return getattr(x, "result", x)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def divergence(baseline, steered) -> Divergence:
    """Compare two results (``Finished`` or ``GenerationResult``) of the same prompt."""
    a, b = _result(baseline), _result(steered)
    if a.prompt_tokens != b.prompt_tokens:
        raise InvalidArgumentError("divergence needs two generations of the same prompt")
    if a.logits is None or b.logits is None:
        raise InvalidArgumentError("divergence needs the logits of both runs: generate with "
                                   "return_logits=True")
    n = min(len(a.tokens), len(b.tokens), len(a.logits), len(b.logits))
    if a.logits.shape[1:] != b.logits.shape[1:]:
        raise InvalidArgumentError("the two runs have different vocabularies")
    la, lb = a.logits[:n], b.logits[:n]
    pa, pb = _log_softmax(la), _log_softmax(lb)
    kl = np.maximum((np.exp(pa) * (pa - pb)).sum(-1), 0.0)
    tv = 0.5 * np.abs(np.exp(pa) - np.exp(pb)).sum(-1)
    top1 = la.argmax(-1) == lb.argmax(-1)
    norm = np.linalg.norm(la.astype(np.float64), axis=-1)
    rel = np.linalg.norm((lb - la).astype(np.float64), axis=-1) / np.where(norm > 0, norm, 1.0)
    differs = [i for i in range(n) if a.tokens[i] != b.tokens[i]]
    return Divergence(steps=n, mismatch_rate=len(differs) / n if n else 0.0,
                      first_divergent_step=differs[0] if differs else None,
                      kl=kl, tv=tv, top1_agree=top1, rel_logit_change=rel)
