"""Exactness through a real server: a pause with no edit, steering with scale 1.0 and an
edit equal to a one-step rule must reproduce the reference logits bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

import djinn_nb as dj
from conftest import MIDDLE

PROMPT = "The capital of France is"
N = 12


def run(session, prompt=PROMPT, n=N, **kw) -> dj.GenerationResult:
    ev = session.generate(prompt, max_new_tokens=n, return_logits=True, stop_at_eos=False, **kw)
    assert isinstance(ev, dj.Finished), ev
    return ev.result


def test_resume_without_edit_is_exact_at_every_step(session, model):
    base = run(session)
    session.breakpoint(layer=MIDDLE[model], phase="both")
    ev = session.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
    pauses = []
    while isinstance(ev, dj.Paused):
        pauses.append((ev.step, ev.phase))
        h = session.activation()
        assert h.shape == (ev.positions, session.hidden_size) and np.isfinite(h).all()
        ev = session.resume()
    assert pauses == [(0, "prefill")] + [(k, "decode") for k in range(1, N)]
    assert ev.tokens == base.tokens
    assert np.array_equal(ev.result.logits, base.logits)
    assert [r.breakpoints for r in ev.steps] == [[MIDDLE[model]]] * N


def test_steer_scale_one_and_alpha_zero_are_bit_identical(session, model):
    base = run(session)
    layer = MIDDLE[model]
    session.steer(layer=layer, scale=1.0)
    assert np.array_equal(run(session).logits, base.logits)
    session.clear_steering()
    session.steer(layer=layer, add=np.ones(session.hidden_size, dtype=np.float32), alpha=0.0)
    assert np.array_equal(run(session).logits, base.logits)


def test_scale_changes_logits(session, model):
    base = run(session)
    session.steer(layer=MIDDLE[model], scale=0.9)
    steered = run(session)
    assert not np.array_equal(steered.logits, base.logits)
    assert all(r.rules == [1] for r in steered.steps)


@pytest.mark.smollm2
def test_scale_changes_tokens_on_smollm2(client):
    s = client.session(model="smollm2-135m")
    base = run(s, "The meaning of life is", 20)
    s.steer(layer=6, scale=0.9)
    steered = run(s, "The meaning of life is", 20)
    assert steered.tokens != base.tokens


def test_added_vector_changes_tokens_on_tiny_gpt2(client):
    s = client.session(model="tiny-gpt2")
    base = run(s)
    rng = np.random.default_rng(0)
    s.steer(layer=4, add=rng.standard_normal(s.hidden_size).astype(np.float32), alpha=8.0)
    assert run(s).tokens != base.tokens


def test_edit_at_one_step_equals_one_step_rule(session, model):
    layer, k = MIDDLE[model], 3
    session.steer(layer=layer, scale=0.9, steps=[k])
    ruled = run(session)
    session.clear_steering()
    session.breakpoint(layer=layer, steps=[k])
    ev = session.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
    assert isinstance(ev, dj.Paused) and ev.step == k and ev.layer == layer
    before = session.activation()
    session.edit(scale=0.9)
    assert np.allclose(session.activation(), before * np.float32(0.9), rtol=0, atol=1e-6)
    ev = session.resume()
    assert isinstance(ev, dj.Finished)
    assert np.array_equal(ev.result.logits, ruled.logits)
    assert ev.tokens == ruled.tokens


def test_edit_on_prefill_positions(session, model):
    """An added vector on one prompt position in the prefill equals the same standing rule."""
    layer = MIDDLE[model]
    vec = np.linspace(-1, 1, session.hidden_size).astype(np.float32)
    session.steer(layer=layer, add=vec, alpha=2.0, positions=[1], phase="prefill")
    ruled = run(session)
    session.clear_steering()
    session.breakpoint(layer=layer, phase="prefill")
    ev = session.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
    assert ev.phase == "prefill" and ev.start == 0 and ev.positions == len(ruled.prompt_tokens)
    session.edit(add=vec, alpha=2.0, positions=[1])
    ev = session.resume()
    assert np.array_equal(ev.result.logits, ruled.logits)


def test_kv_cache_stays_on_the_server(client):
    """Bytes on the wire for one resume do not grow with the context; the prompt is not re-sent."""
    s = client.session(model="tiny-gpt2")
    s.breakpoint(layer=2)
    cost = {}
    for words in (5, 400):
        prompt = " ".join(["token"] * words)
        ev = s.generate(prompt, max_new_tokens=4, stop_at_eos=False)
        assert ev.paused
        s.resume()   # the first call of a method also fetches its handle: measure the next
        before = client.stats()
        ev = s.resume()
        after = client.stats()
        assert ev.paused and after["calls"] == before["calls"] + 1
        cost[words] = (after["bytes_sent"] - before["bytes_sent"],
                       after["bytes_received"] - before["bytes_received"])
        s.stop()
    (sent_short, recv_short), (sent_long, recv_long) = cost[5], cost[400]
    assert sent_long == sent_short, cost                  # same request, whatever the context
    assert abs(recv_long - recv_short) <= 8, cost         # only the position digits differ
    assert sent_long < 400 < len(" ".join(["token"] * 400))  # the long prompt is not re-sent


def test_step_to_next_layer_and_next_token(client):
    s = client.session(model="tiny-gpt2")
    s.breakpoint(layer=6, steps=[2])
    ev = s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False)
    assert (ev.layer, ev.step) == (6, 2)
    ev = s.step()
    assert (ev.layer, ev.step) == (7, 2)
    ev = s.step()
    assert (ev.layer, ev.step) == (0, 3)
    ev = s.step(to="token")
    assert (ev.layer, ev.step) == (0, 4)
    ev = s.resume()
    assert ev.finished and len(ev.tokens) == 6


def test_resume_ignoring_breakpoints_and_stop(client):
    s = client.session(model="tiny-gpt2")
    base = run(s)
    s.breakpoint(layer=1)
    ev = s.generate(PROMPT, max_new_tokens=N, stop_at_eos=False)
    ev = s.resume(ignore_breakpoints=True)
    assert ev.finished and ev.tokens == base.tokens
    ev = s.generate(PROMPT, max_new_tokens=N, stop_at_eos=False)
    ev = s.resume()
    fin = s.stop()
    assert fin.result.stop_reason == "stopped" and fin.tokens == base.tokens[:2]
    assert s.state == "finished"


def test_seeded_sampling_is_reproducible(client):
    s = client.session(model="tiny-gpt2")
    a = s.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=7).result
    b = s.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=7).result
    c = s.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=8).result
    assert a.tokens == b.tokens and a.seed == 7
    assert a.tokens != c.tokens


@pytest.mark.smollm2
def test_smollm2_answers_paris_and_chat(client):
    s = client.session(model="smollm2-135m")
    assert s.layers == 30 and s.hidden_size == 576
    assert s.generate(PROMPT, max_new_tokens=3).text.startswith(" Paris")
    chat = s.generate("What is the capital of France?", max_new_tokens=12, chat=True)
    assert "Paris" in chat.text
    ids = chat.result.prompt_tokens
    assert s.generate(ids, max_new_tokens=12).tokens == chat.tokens


def test_sessions_are_independent(client, server):
    """Two clients, one steered and paused, the other plain: each gets its solo tokens."""
    a, b = client.session(model="tiny-gpt2"), None
    other = dj.connect(server.address)
    try:
        b = other.session(model="tiny-gpt2")
        solo = run(b)
        a.steer(layer=3, add=np.ones(a.hidden_size, dtype=np.float32), alpha=5.0)
        a.breakpoint(layer=5)
        ev = a.generate(PROMPT, max_new_tokens=N)
        assert ev.paused
        assert run(b).tokens == solo.tokens            # a is paused mid-forward meanwhile
        a.resume(ignore_breakpoints=True)
    finally:
        other.close()


def test_large_activations_come_over_the_bulk_path(client):
    s = client.session(model="tiny-gpt2")
    s.breakpoint(layer=3, phase="prefill")
    ev = s.generate(" ".join(["word"] * 600), max_new_tokens=2)
    assert ev.paused and ev.positions >= 600
    before = client.stats()
    h = s.activation()                                    # 600+ x 64 float32: over 64 KiB
    after = client.stats()
    assert h.shape == (ev.positions, s.hidden_size) and h.dtype == np.float32
    assert after["bulk_bytes_received"] - before["bulk_bytes_received"] == h.nbytes
    assert after["bytes_received"] - before["bytes_received"] < 2048   # not through rpyc
    rows = s.activation(positions=[0, 5, ev.positions - 1])           # small: the rpyc path
    assert np.array_equal(rows, h[[0, 5, ev.positions - 1]])
    s.edit(scale=0.5, positions=[5])
    assert np.array_equal(s.activation()[5], h[5] * np.float32(0.5))
