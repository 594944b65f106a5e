"""The multi-tenant decode engine (kernel_server/runtime/scheduler.py) through a real server:
sessions of different clients decode as rows of one batched step, and each session's
tokens and logits are bit-identical to its solo run through the engine, whoever else runs,
whichever row it lands in, whenever the others join or leave, across pauses, edits,
checkpoints and restores.

"Solo" means the same engine with nobody else in the lane: every engine step runs in one
fixed shape (the scheduler's ROWS rows, padding included), so a solo run is the reference.
Against the engine off (a DynamicCache per run) the numbers agree to rounding only (the
attention spans the lane's positions, masked): that is tested to a tolerance here.
Run on a GPU: DJINN_TEST_DEVICE=cuda pytest tests/integration/test_tenants.py
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import djinn_nb as dj
from kernel_server.runtime import scheduler

MODELS = ["tiny-gpt2", "tiny-llama"]
MIDDLE = {"tiny-gpt2": 4, "tiny-llama": 2}
N = 12
PROMPTS = ["The capital of France is", "Once upon a time there", "1, 2, 3, 4,",
           "def fib(n):"]


@pytest.fixture(autouse=True)
def engine_on():
    before = scheduler.get_mode()
    scheduler.set_mode("on")
    yield
    scheduler.set_mode(before)


@pytest.fixture(params=MODELS)
def model_name(request):
    if request.param == "tiny-llama":
        return request.getfixturevalue("tiny_llama_path")
    return request.param


def _layer(name: str) -> int:
    return MIDDLE["tiny-gpt2" if name == "tiny-gpt2" else "tiny-llama"]


def _loaded(kernel, name):
    return kernel.models.get(name)


def _rules(s, kind: int, layer: int):
    """Session ``s`` gets rule set ``kind``: none, a scale, an added vector, a step-limited
    add and an attention-site scale (every path a row's rules can take)."""
    width = s.hidden_size
    if kind == 1:
        s.steer(layer=layer, scale=0.5)
    elif kind == 2:
        s.steer(layer=layer, add=np.linspace(-1, 1, width).astype(np.float32), alpha=4.0)
    elif kind == 3:
        s.steer(layer=0, add=np.ones(width, dtype=np.float32), alpha=3.0, steps=[2, 3, 5])
        s.steer(layer=layer, site="attn", scale=0.0)


def _solo(server, name, prompt, kind, n=N):
    with dj.connect(server.address) as c:
        s = c.session(model=name)
        _rules(s, kind, _layer(name))
        return s.generate(prompt, max_new_tokens=n, return_logits=True, stop_at_eos=False).result


def _together(server, name, jobs):
    """Run ``jobs`` [(prompt, kind, max_new_tokens)] at once, one client each."""
    out: dict = {}
    errors: list = []
    start = threading.Barrier(len(jobs))

    def one(i, prompt, kind, n):
        try:
            with dj.connect(server.address) as c:
                s = c.session(model=name)
                _rules(s, kind, _layer(name))
                start.wait(timeout=120)
                out[i] = s.generate(prompt, max_new_tokens=n, return_logits=True,
                                    stop_at_eos=False).result
        except BaseException as exc:   # surfaced below
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)            # a hang guard only
    assert not errors, errors
    return out


def _same(a, b):
    assert a.tokens == b.tokens
    assert np.array_equal(a.logits, b.logits)


def test_clients_with_different_rules_get_their_solo_bits(server, kernel, model_name):
    # different rules and lengths: rows join at different times and leave at different
    # steps (max_new_tokens 6 .. 3N/2), the rest keep decoding in the same lane
    jobs = [(PROMPTS[i], i, n) for i, n in enumerate((N, 6, 3 * N // 2, N // 2 + 1))]
    solo = [_solo(server, model_name, p, kind, n) for p, kind, n in jobs]
    loaded = _loaded(kernel, model_name)
    before = dict(loaded.decode_scheduler.stats)
    together = _together(server, model_name, jobs)
    for i in range(len(jobs)):
        _same(together[i], solo[i])
    stats = loaded.decode_scheduler.stats
    assert stats["joins"] - before["joins"] == len(jobs)
    assert stats["rows_stepped"] - before["rows_stepped"] == sum(n - 1 for _, _, n in jobs)


def test_a_row_gets_the_same_bits_in_any_row_of_the_lane(server, kernel, model_name):
    solo = _solo(server, model_name, PROMPTS[1], 2)          # alone: lane row 0
    with dj.connect(server.address) as c:
        holders = []
        for prompt in PROMPTS[:3]:        # three paused sessions hold rows 0, 1, 2
            h = c.session(model=model_name)
            h.breakpoint(layer=0, steps=[3])
            assert isinstance(h.generate(prompt, max_new_tokens=N), dj.Paused)
            holders.append(h)
        loaded = _loaded(kernel, model_name)
        lane = next(l for l in loaded.decode_scheduler.lanes if any(l.members))
        taken = [r for r, m in enumerate(lane.members) if m is not None]
        assert len(taken) == 3
        moved = _solo(server, model_name, PROMPTS[1], 2)     # lands in row 3 now
        _same(moved, solo)
        for h in holders:
            assert h.state == "paused"
            assert h.resume(ignore_breakpoints=True).finished


def test_a_paused_session_does_not_hold_up_the_others(server, model_name):
    layer = _layer(model_name)
    base_a = _solo(server, model_name, PROMPTS[0], 1)
    base_b = _solo(server, model_name, PROMPTS[2], 2, n=2 * N)
    with dj.connect(server.address) as ca, dj.connect(server.address) as cb:
        a = ca.session(model=model_name)
        _rules(a, 1, layer)
        a.breakpoint(layer=layer, steps=[4])
        ev = a.generate(PROMPTS[0], max_new_tokens=N, return_logits=True, stop_at_eos=False)
        assert isinstance(ev, dj.Paused) and ev.step == 4
        b = cb.session(model=model_name)
        _rules(b, 2, layer)
        # b runs to its end while a stays paused (its owner reading activations)
        done = b.generate(PROMPTS[2], max_new_tokens=2 * N, return_logits=True, stop_at_eos=False)
        assert done.finished
        _same(done.result, base_b)
        assert a.state == "paused"
        a.activation()
        # a's paused step ran outside the batch: the same bits as inside it
        rest = a.resume()
        assert rest.finished
        _same(rest.result, base_a)


def test_steps_outside_the_batch_while_others_decode(server, model_name):
    """A session that pauses on every decode step (its steps all run outside the batch)
    beside sessions decoding in the batch: everyone gets their solo bits."""
    layer = _layer(model_name)
    solo_p = _solo(server, model_name, PROMPTS[3], 1)
    jobs = [(PROMPTS[0], 2, 2 * N), (PROMPTS[1], 0, 2 * N)]
    solo = [_solo(server, model_name, p, k, n) for p, k, n in jobs]
    out: dict = {}

    def stepper():
        with dj.connect(server.address) as c:
            s = c.session(model=model_name)
            _rules(s, 1, layer)
            s.breakpoint(layer=layer)
            ev = s.generate(PROMPTS[3], max_new_tokens=N, return_logits=True, stop_at_eos=False)
            while isinstance(ev, dj.Paused):
                s.activation(positions="last")
                ev = s.resume()
            out["p"] = ev.result
    t = threading.Thread(target=stepper)
    t.start()
    together = _together(server, model_name, jobs)
    t.join(timeout=600)
    _same(out["p"], solo_p)
    for i in range(len(jobs)):
        _same(together[i], solo[i])


def test_checkpoint_inside_a_batched_run_restores_exactly(server, model_name):
    layer, k = _layer(model_name), 5
    base = _solo(server, model_name, PROMPTS[0], 2)
    others = [(PROMPTS[1], 1, 2 * N), (PROMPTS[2], 0, 2 * N)]
    solo_others = [_solo(server, model_name, p, kind, n) for p, kind, n in others]
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        _rules(s, 2, layer)
        s.breakpoint(layer=layer, steps=[k])
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(_together(server, model_name, others)))
        t.start()
        ev = s.generate(PROMPTS[0], max_new_tokens=N, return_logits=True, stop_at_eos=False)
        assert isinstance(ev, dj.Paused) and ev.step == k
        ck = s.checkpoint()           # mid-forward, in a lane row: the start of token k
        ck.wait()
        s.clear_breakpoints()
        first = s.resume()
        _same(first.result, base)
        # restored into a run beside others (the batch threads may still decode) ...
        s.restore(ck)
        s.clear_breakpoints()
        _same(s.resume().result, base)
        t.join(timeout=600)
        for i in range(len(others)):
            _same(result[i], solo_others[i])
        # ... and into a fork, alone
        f = s.fork(ck)
        f.clear_breakpoints()
        _same(f.resume().result, base)


def test_a_pause_without_an_edit_equals_no_breakpoint_and_an_edit_equals_a_rule(server, model_name):
    layer = _layer(model_name)
    base = _solo(server, model_name, PROMPTS[0], 0)
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        s.breakpoint(layer=layer, steps=[3])
        ev = s.generate(PROMPTS[0], max_new_tokens=N, return_logits=True, stop_at_eos=False)
        assert isinstance(ev, dj.Paused)
        _same(s.resume().result, base)
        # an edit at the pause (outside the batch) = a one-step rule (inside the batch)
        s.clear_breakpoints()
        s.steer(layer=layer, scale=0.25, steps=[3])
        ruled = s.generate(PROMPTS[0], max_new_tokens=N, return_logits=True, stop_at_eos=False).result
        s.clear_steering()
        s.breakpoint(layer=layer, steps=[3])
        s.generate(PROMPTS[0], max_new_tokens=N, return_logits=True, stop_at_eos=False)
        s.edit(scale=0.25)
        _same(s.resume().result, ruled)


def test_engine_agrees_with_per_run_decode_to_rounding(server, model_name):
    engine = _solo(server, model_name, PROMPTS[0], 1)
    scheduler.set_mode("off")
    plain = _solo(server, model_name, PROMPTS[0], 1)
    assert engine.tokens == plain.tokens
    assert np.abs(engine.logits - plain.logits).max() < 1e-3


def test_bad_mode_is_refused():
    with pytest.raises(ValueError):
        scheduler.set_mode("sometimes")


def test_step_to_the_next_layer_and_token_inside_an_engine_run(server, model_name):
    layer = _layer(model_name)
    base = _solo(server, model_name, PROMPTS[0], 0)
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        s.breakpoint(layer=layer - 1, steps=[2])
        ev = s.generate(PROMPTS[0], max_new_tokens=N, return_logits=True, stop_at_eos=False)
        assert (ev.layer, ev.step) == (layer - 1, 2)
        ev = s.step()
        assert (ev.layer, ev.step) == (layer, 2)
        ev = s.step(to="token")
        assert (ev.layer, ev.step) == (layer, 3)
        _same(s.resume().result, base)
