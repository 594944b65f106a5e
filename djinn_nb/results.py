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


def event_from_wire(d: dict[str, Any]):
    if d["event"] == "paused":
        return Paused(**{k: v for k, v in d.items() if k != "event"})
    return Finished(GenerationResult.from_wire(d["result"]))
