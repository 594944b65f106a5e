"""What generation calls return: pause and finish events, results and per-step records."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class StepRecord:
    """One generated token: its id and text, the top-k next-token distribution,
    and timings in milliseconds (``forward_ms`` excludes time spent paused)."""
    step: int
    token_id: int
    text: str
    top_ids: list
    top_probs: list
    forward_ms: float
    paused_ms: float
    breakpoints: list = field(default_factory=list)   # layers that paused on this step
    rules: list = field(default_factory=list)         # steering rule ids that fired


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation. ``logits`` is [steps, vocab] when ``return_logits=True``."""
    tokens: list
    text: str
    prompt_tokens: list
    steps: list
    stop_reason: str
    seed: int
    model: str
    logits: Optional[np.ndarray] = None

    @classmethod
    def from_wire(cls, d: dict) -> "GenerationResult":
        return cls(tokens=d["tokens"], text=d["text"], prompt_tokens=d["prompt_tokens"],
                   steps=[StepRecord(**s) for s in d["steps"]], stop_reason=d["stop_reason"],
                   seed=d["seed"], model=d["model"], logits=d.get("logits"))


@dataclass(frozen=True)
class Paused:
    """The forward pass is paused after decoder block ``layer`` on generation ``step``.

    ``positions`` rows are paused (the whole prompt in the prefill, one in a decode step);
    ``position`` is the absolute index of the last of them."""
    layer: int
    step: int
    phase: str
    position: int
    start: int
    positions: int
    hidden_size: int
    site: str = "resid"    # where it paused: resid, attn, mlp, heads or module:<path>

    @property
    def paused(self) -> bool:
        return True

    @property
    def finished(self) -> bool:
        return False


@dataclass(frozen=True)
class Finished:
    """The generation ended (length, end-of-sequence token, or ``stop()``)."""
    result: GenerationResult

    @property
    def paused(self) -> bool:
        return False

    @property
    def finished(self) -> bool:
        return True

    @property
    def tokens(self) -> list:
        return self.result.tokens

    @property
    def text(self) -> str:
        return self.result.text

    @property
    def steps(self) -> list:
        return self.result.steps

    @property
    def interrupted(self) -> bool:
        return False


@dataclass(frozen=True)
class Interrupted(Finished):
    """The generation was interrupted (Ctrl-C / the notebook's stop button, ``s.interrupt()``,
    the dashboard's Stop): the server ended it at a step boundary; ``tokens`` are those made
    so far and the session is usable (``stop_reason`` "interrupted")."""

    @property
    def interrupted(self) -> bool:
        return True

    def __str__(self):
        n = len(self.result.tokens)
        return f"interrupted after {n} token{'' if n == 1 else 's'}: {self.result.text!r}"


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C (or the notebook's stop button) during ``generate`` / ``resume`` / ``step``,
    raised once the server has ended that run at its next step boundary: the client, the
    session and the server are usable at once. ``event`` is what the run ended with (an
    ``Interrupted`` holding the tokens so far, or a ``Paused`` / ``Finished`` that came
    first); the session's ``last_event`` is the same."""

    def __init__(self, event):
        self.event = event
        if isinstance(event, Paused):
            what = f"it had already paused at layer {event.layer}, step {event.step}"
        else:
            n = len(event.tokens[0] if isinstance(event, BatchFinished) and event.results
                    else event.tokens)
            what = (f"the server stopped the run after {n} token{'' if n == 1 else 's'}"
                    if getattr(event, "interrupted", False) else "the run had already finished")
        super().__init__(f"{what}; the result is this exception's .event and the session's "
                         "last_event, and the session is usable")


@dataclass(frozen=True)
class ScoreResult:
    """Teacher-forced scores of ``tokens[start:]`` (one server pass, see ``Session.score``).

    Entry i is about position ``start + i``: the log-prob of ``tokens[start + i]`` given
    the tokens before it. With ``compare=True`` the server also ran the sequence with no
    steering and sent per-position KL(unsteered || steered), total variation, top-1
    agreement and relative logit change (computed on the server in float64)."""
    tokens: list
    start: int
    token_logprobs: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    kl: Optional[np.ndarray] = None
    tv: Optional[np.ndarray] = None
    top1_agree: Optional[np.ndarray] = None
    rel_logit_change: Optional[np.ndarray] = None
    baseline_token_logprobs: Optional[np.ndarray] = None
    logits: Optional[np.ndarray] = None

    @classmethod
    def from_wire(cls, d: dict) -> "ScoreResult":
        return cls(**{k: (np.asarray(v) if isinstance(v, (list, np.ndarray)) and k != "tokens" else v)
                      for k, v in d.items()})

    def __len__(self) -> int:
        return len(self.token_logprobs)

    def summary(self) -> dict:
        """Means over the scored positions (and the sequence's total log-prob)."""
        out = {"positions": len(self), "total_logprob": float(np.sum(self.token_logprobs)),
               "mean_logprob": float(np.mean(self.token_logprobs)) if len(self) else 0.0}
        if self.kl is not None and len(self):
            out.update(mean_kl=float(self.kl.mean()), max_kl=float(self.kl.max()),
                       mean_tv=float(self.tv.mean()),
                       top1_agreement=float(np.mean(self.top1_agree)),
                       mean_rel_logit_change=float(self.rel_logit_change.mean()),
                       logprob_change=float(np.sum(self.token_logprobs)
                                            - np.sum(self.baseline_token_logprobs)))
        return out


@dataclass(frozen=True)
class BatchFinished:
    """A batched generation ended: one ``GenerationResult`` per prompt, in order."""
    results: list
    stop_reason: str

    @property
    def paused(self) -> bool:
        return False

    @property
    def finished(self) -> bool:
        return True

    @property
    def tokens(self) -> list:
        return [r.tokens for r in self.results]

    @property
    def texts(self) -> list:
        return [r.text for r in self.results]

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i) -> GenerationResult:
        return self.results[i]

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "interrupted"


def event_from_wire(d: dict[str, Any]):
    if d["event"] == "paused":
        return Paused(**{k: v for k, v in d.items() if k != "event"})
    if "batch" in d["result"]:
        return BatchFinished([GenerationResult.from_wire(r) for r in d["result"]["batch"]],
                             d["result"]["stop_reason"])
    result = GenerationResult.from_wire(d["result"])
    return Interrupted(result) if result.stop_reason == "interrupted" else Finished(result)
