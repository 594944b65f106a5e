"""Batched generation: each row equals its prompt run alone, token for token."""
from __future__ import annotations

import numpy as np
import pytest

import djinn_nb as dj
from conftest import MIDDLE

PROMPTS = ["Hello", "The quick brown fox jumps", "a b c d e f g h i j", "Once upon a time there",
           "x", "Paris is the capital of", "1 2 3", "I think therefore I am, said"]


@pytest.mark.slow
def test_batch_of_eight_equals_single_runs(session):
    alone = [session.generate(p, 8, stop_at_eos=False, return_logits=True).result for p in PROMPTS]
    batch = session.generate(PROMPTS, 8, stop_at_eos=False, return_logits=True)
    assert isinstance(batch, dj.BatchFinished) and len(batch) == 8
    for got, want in zip(batch.results, alone):
        assert got.prompt_tokens == want.prompt_tokens
        assert got.tokens == want.tokens
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-3 if session.dtype == "float32" else 5e-2)
    assert batch.texts == [r.text for r in alone]


@pytest.mark.slow
def test_steering_one_row_leaves_the_others_unchanged(session):
    layer = MIDDLE.get(session.model, 2)
    plain = session.generate(PROMPTS[:4], 8, stop_at_eos=False)
    session.steer(layer, scale=-3.0, rows=[1])
    steered = session.generate(PROMPTS[:4], 8, stop_at_eos=False)
    assert steered.tokens[1] != plain.tokens[1]
    for i in (0, 2, 3):
        assert steered.tokens[i] == plain.tokens[i]
    # the row equals its prompt steered alone (a single run is row 0)
    session.clear_steering()
    session.steer(layer, scale=-3.0)
    assert session.generate(PROMPTS[1], 8, stop_at_eos=False).tokens == steered.tokens[1]
    session.clear_steering()


def test_breakpoint_pauses_the_whole_batch_and_resumes_exactly(client):
    s = client.session(model="tiny-gpt2")
    want = s.generate(PROMPTS[:3], 6, stop_at_eos=False).tokens
    s.breakpoint(4, phase="decode", steps=[2])
    ev = s.generate(PROMPTS[:3], 6, stop_at_eos=False)
    assert ev.paused and ev.step == 2
    acts = s.activation()
    assert acts.shape[0] == 3 and acts.shape[-1] == s.hidden_size
    np.testing.assert_array_equal(s.activation(row=1), acts[1])
    with pytest.raises(dj.CheckpointError):
        s.checkpoint()
    assert s.resume().tokens == want
    s.close()


def test_batch_bad_input(client):
    s = client.session(model="tiny-gpt2")
    s.steer(2, scale=0.5, positions=[1, 2])
    with pytest.raises(dj.InvalidArgumentError):
        s.generate(["a", "b"], 2)
    s.clear_steering()
    with pytest.raises(dj.InvalidArgumentError):
        s.generate(["a", ""], 2)
    with pytest.raises(dj.InvalidArgumentError):
        s.steer(2, scale=0.5, rows=[-1])
    with pytest.raises(dj.LimitExceededError):
        s.generate(["a"] * 65, 2)
    assert s.generate(["a", "b c"], 2).finished
    s.close()
