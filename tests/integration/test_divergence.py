"""Divergence metrics against hand-computed values, and on real runs."""
from __future__ import annotations

import numpy as np
import pytest

import djinn_nb as dj
from djinn_nb.results import GenerationResult


def result(tokens, logits, prompt=(1, 2)):
    return GenerationResult(tokens=list(tokens), text="", prompt_tokens=list(prompt), steps=[],
                            stop_reason="length", seed=0, model="m",
                            logits=np.asarray(logits, dtype=np.float32))


def test_identical_runs_have_zero_divergence():
    r = result([3, 1], [[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0]])
    d = dj.divergence(r, r)
    assert d.mismatch_rate == 0 and d.first_divergent_step is None
    assert np.all(d.kl == 0) and np.all(d.tv == 0) and d.top1_agree.all()
    assert np.all(d.rel_logit_change == 0)


def test_known_pair():
    # step 0: p = (1/2, 1/2) vs q = (e/(1+e), 1/(1+e)) ; step 1: identical
    a = result([0, 1], [[0.0, 0.0], [0.0, 1.0]])
    b = result([0, 0], [[1.0, 0.0], [0.0, 1.0]])
    d = dj.divergence(a, b)
    q1 = np.e / (1 + np.e)
    assert d.kl[0] == pytest.approx(0.5 * np.log(0.5 / q1) + 0.5 * np.log(0.5 / (1 - q1)))
    assert d.tv[0] == pytest.approx(q1 - 0.5)
    assert d.kl[1] == pytest.approx(0) and d.tv[1] == pytest.approx(0)
    assert list(d.top1_agree) == [True, True]      # argmax tie at step 0 resolves to 0 in both
    assert d.mismatch_rate == 0.5 and d.first_divergent_step == 1
    assert d.rel_logit_change[0] == pytest.approx(1.0)   # |b - a| / 1 where |a| = 0
    assert d.summary()["steps"] == 2


def test_needs_logits_and_same_prompt():
    a = result([1], [[0.0, 1.0]])
    with pytest.raises(dj.InvalidArgumentError, match="same prompt"):
        dj.divergence(a, result([1], [[0.0, 1.0]], prompt=(9,)))
    no_logits = GenerationResult([1], "", [1, 2], [], "length", 0, "m", None)
    with pytest.raises(dj.InvalidArgumentError, match="return_logits"):
        dj.divergence(a, no_logits)


def test_on_real_runs(client):
    s = client.session(model="tiny-gpt2")
    base = s.generate("The capital of France is", max_new_tokens=8, return_logits=True)
    assert dj.divergence(base, base).summary()["mean_kl"] == 0
    # (a constant vector would be removed by the next LayerNorm's mean subtraction)
    vec = np.random.default_rng(0).standard_normal(s.hidden_size).astype(np.float32)
    s.steer(layer=3, add=vec, alpha=8.0)
    steered = s.generate("The capital of France is", max_new_tokens=8, return_logits=True)
    d = dj.divergence(base, steered)
    assert d.kl.shape == (8,) and (d.kl > 0).all() and d.mismatch_rate > 0
