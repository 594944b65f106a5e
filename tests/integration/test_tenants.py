"""The multi-tenant decode engine (kernel_server/runtime/scheduler.py) through a real server:
sessions of different clients decode as rows of one batched step, and each session's
tokens and logits are bit-identical to its solo run through the engine, whoever else runs,
whichever row it lands in, whenever the others join or leave, across pauses, edits,
checkpoints and restores.

Also: standing rules inside the batched step (lane programs with per-row buffers: scale,
add, step-limited, explicit positions, intervention expressions) equal the eager hooks of a
step outside the batch; a slider move captures nothing again; batch calls' rows and forks
of one checkpoint resumed together ride the engine with their solo bits. On CUDA the
batched steps are CUDA graph replays (``counters["graph_steps"]``).

"Solo" means the same engine with nobody else in the lane: every engine step runs in one
fixed shape (the scheduler's ROWS rows, padding included), so a solo run is the reference.
Against the engine off (a DynamicCache per run) the numbers agree to rounding only (the
attention spans the lane's positions, masked; on CUDA the lane's norms are the fused kernel
of kernel_server/model/lane_kernels.py): that is tested to a tolerance here.
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
    before = dict(loaded.decode_scheduler.counters)
    together = _together(server, model_name, jobs)
    for i in range(len(jobs)):
        _same(together[i], solo[i])
    stats = loaded.decode_scheduler.counters
    assert stats["joins"] - before["joins"] == len(jobs)
    assert stats["rows_stepped"] - before["rows_stepped"] == sum(n - 1 for _, _, n in jobs)


def test_a_row_gets_the_same_bits_in_any_row_of_the_lane(server, kernel, model_name):
    """Paused sessions hold rows 0, 1, ...: the same run lands in row 3, then in the last
    row (the two halves of the batch: on CPU, PyTorch's attention splits a batch over
    threads by halves; the lane runs it row by row, exact_attention.rows_apart)."""
    solo = _solo(server, model_name, PROMPTS[1], 2)          # alone: lane row 0
    last = scheduler.ROWS - 1
    with dj.connect(server.address) as c:
        holders = []
        for i in range(last):          # paused sessions hold rows 0 .. last - 1
            h = c.session(model=model_name)
            h.breakpoint(layer=0, steps=[3])
            assert isinstance(h.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=N), dj.Paused)
            holders.append(h)
            if i + 1 in (3, last):
                lane = next(l for l in _loaded(kernel, model_name).decode_scheduler.lanes
                            if any(l.members))
                assert [r for r, m in enumerate(lane.members) if m is not None] == list(range(i + 1))
                _same(_solo(server, model_name, PROMPTS[1], 2), solo)   # lands in row i + 1
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


def test_checkpoint_inside_a_batched_run_restores_exactly(server, kernel, model_name):
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
        # ... into a fork, alone ...
        f = s.fork(ck)
        f.clear_breakpoints()
        _same(f.resume().result, base)
        import tempfile
        from pathlib import Path
        path = Path(tempfile.mkdtemp(prefix="djinn-ck-")) / "ck.djckpt"
        ck.save(path)
    # ... and into three runs resumed together, rows of the same batched steps
    sched = _loaded(kernel, model_name).decode_scheduler
    clients = [dj.connect(server.address) for _ in range(3)]
    try:
        runs = []
        for cl in clients:
            r = cl.load_checkpoint(path).session
            r.clear_breakpoints()
            runs.append(r)
        before = dict(sched.counters)
        out: dict = {}
        start = threading.Barrier(len(runs))

        def one(i, r):
            start.wait(timeout=120)
            out[i] = r.resume().result
        threads = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(runs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        for cl in clients:
            cl.close()
    for i in range(len(runs)):
        _same(out[i], base)
    stats = sched.counters
    assert stats["rows_stepped"] - before["rows_stepped"] == len(runs) * (N - k)
    assert stats["batched_steps"] - before["batched_steps"] < len(runs) * (N - k)


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


def test_a_lane_fuses_llama_norms_only_and_runs_off_the_engine_keep_their_bits(server, kernel,
                                                                              model_name):
    from kernel_server.model import lane_kernels
    scheduler.set_mode("off")
    before = _solo(server, model_name, PROMPTS[1], 2)
    scheduler.set_mode("on")
    _solo(server, model_name, PROMPTS[1], 2)
    loaded = _loaded(kernel, model_name)
    # a lane wrapped the model's RMSNorms (LlamaRMSNorm's math: two per block and the final
    # one), none of GPT-2's LayerNorms; they fuse inside lane steps on CUDA only
    llama = model_name != "tiny-gpt2"
    assert lane_kernels.installed(loaded.model) == (2 * loaded.num_layers + 1 if llama else 0)
    scheduler.set_mode("off")
    _same(_solo(server, model_name, PROMPTS[1], 2), before)    # (if wrapped only now: the same)


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


# ---- standing rules inside the batched step (lane programs: kernel_server/runtime/lane_rules.py)
def _unit(width: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(width).astype(np.float32)
    return v / np.linalg.norm(v)


def _expression_rules(s, kind: int, layer: int):
    """Expression rules (evaluated by the lane program on the row's slice, with the
    constants in per-row buffers) beside plain ones."""
    h = dj.ops.h
    v = dj.ops.const(_unit(s.hidden_size, kind))
    if kind == 0:             # direction ablation, then a scale at the same layer
        s.steer(layer=layer, edit=h - dj.ops.dot(h, v) * v)
        s.steer(layer=layer, scale=0.75)
    elif kind == 1:           # a projection added back twice, at the MLP site; a clamp on resid
        s.steer(layer=layer, site="mlp", edit=h + 2.0 * dj.ops.project(h, v))
        s.steer(layer=layer - 1, edit=dj.ops.clamp(h, -0.5, 0.5))
    else:                     # a step-limited expression and a rule on explicit positions
        s.steer(layer=layer, edit=dj.ops.tanh(h) * 3.0, steps=[2, 4, 7])
        p0 = len(s.tokenize(PROMPTS[kind % len(PROMPTS)]))
        s.steer(layer=0, add=np.ones(s.hidden_size, dtype=np.float32), alpha=2.0,
                positions=[p0 + 1, p0 + 5])


def _outside_the_batch(server, name, prompt, setup, n=N):
    """The same session's run with every decode step outside the batch: a breakpoint on
    every decode step (no edit), resumed: the run's own eager hooks apply its rules."""
    with dj.connect(server.address) as c:
        s = c.session(model=name)
        setup(s)
        s.breakpoint(layer=0)
        ev = s.generate(prompt, max_new_tokens=n, return_logits=True, stop_at_eos=False)
        while isinstance(ev, dj.Paused):
            ev = s.resume()
        return ev.result


def test_expression_and_step_limited_rules_run_inside_the_batch_with_their_eager_bits(
        server, kernel, model_name):
    """Rows with different expressions (per-row constants), step-limited rules and rules
    on explicit positions, decoding together in batched steps: each equals the same
    session's run whose every step ran outside the batch with the eager hooks."""
    layer = _layer(model_name)
    jobs = [(PROMPTS[k], k) for k in range(3)]
    eager = [_outside_the_batch(server, model_name, p,
                                lambda s, k=k: _expression_rules(s, k, layer)) for p, k in jobs]
    sched = _loaded(kernel, model_name).decode_scheduler
    before = dict(sched.counters)
    out: dict = {}
    errors: list = []
    start = threading.Barrier(len(jobs))

    def one(i, prompt, k):
        try:
            with dj.connect(server.address) as c:
                s = c.session(model=model_name)
                _expression_rules(s, k, layer)
                start.wait(timeout=120)
                out[i] = s.generate(prompt, max_new_tokens=N, return_logits=True,
                                    stop_at_eos=False).result
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i in range(len(jobs)):
        _same(out[i], eager[i])
    stats = sched.counters
    # every decode step of the three runs was a row of a batched step (none outside)
    assert stats["own_steps"] == before["own_steps"]
    assert stats["rows_stepped"] - before["rows_stepped"] == len(jobs) * (N - 1)
    if sched.use_graphs:
        assert stats["capture_failures"] == 0 and not sched.graphs_broken
        assert stats["graph_steps"] > before["graph_steps"]


def test_a_slider_move_rewrites_the_rows_buffers_without_a_new_program(server, kernel, model_name):
    layer = _layer(model_name)
    sched = _loaded(kernel, model_name).decode_scheduler
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        results = []
        for scale in (0.5, 0.25, 0.5):
            s.clear_steering()
            s.steer(layer=layer, scale=scale)
            s.steer(layer=layer, add=np.linspace(-1, 1, s.hidden_size).astype(np.float32) * scale)
            results.append(s.generate(PROMPTS[0], max_new_tokens=N, return_logits=True,
                                      stop_at_eos=False).result)
            if len(results) == 1:
                lane = next(l for l in sched.lanes if l.program is not None
                            and any(k == (layer, "resid") for k, _ in l.program))
                programs, captures = dict(lane.programs), sched.counters["captures"]
        assert lane.programs.keys() == programs.keys()        # the same program ...
        assert all(lane.programs[p] is programs[p] for p in programs)   # ... and buffers
        assert sched.counters["captures"] == captures             # nothing captured again
    _same(results[2], results[0])
    assert not np.array_equal(results[1].logits, results[0].logits)
    ruled = _outside_the_batch(server, model_name, PROMPTS[0], lambda s: (
        s.steer(layer=layer, scale=0.25),
        s.steer(layer=layer, add=np.linspace(-1, 1, s.hidden_size).astype(np.float32) * 0.25)))
    _same(results[1], ruled)


def test_a_rule_the_lane_cannot_apply_takes_its_steps_outside_the_batch(server, kernel, model_name):
    """A rule on one attention head (a heads-site rule: not in lane programs) moves its
    row's steps outside the batch, with the bits of the run's own eager hooks."""
    layer = _layer(model_name)

    def setup(s):
        s.steer(layer=layer, site="heads", head=1, scale=0.0)
    first = _solo(server, model_name, PROMPTS[0], 0)          # (makes the scheduler)
    sched = _loaded(kernel, model_name).decode_scheduler
    before = sched.counters["own_steps"]
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        setup(s)
        res = s.generate(PROMPTS[1], max_new_tokens=N, return_logits=True, stop_at_eos=False).result
    assert sched.counters["own_steps"] - before == N - 1
    assert not np.array_equal(res.logits, _solo(server, model_name, PROMPTS[1], 0).logits)
    _same(res, _outside_the_batch(server, model_name, PROMPTS[1], setup))
    assert first.tokens


# ---- batch calls and sweeps ride the engine ---------------------------------------------------
def test_batch_call_rows_ride_the_engine_and_equal_their_solo_runs(server, kernel, model_name):
    """``generate([p1, ...])``: every row prefilled alone, then a row of the batched step
    (with a rule on one row only and one on all), beside another client's session: each
    row's tokens and logits are its solo run's, bit for bit."""
    layer = _layer(model_name)
    width = _loaded(kernel, model_name).hidden_size
    vec = np.linspace(-1, 1, width).astype(np.float32)
    solo = []
    for i, p in enumerate(PROMPTS):
        with dj.connect(server.address) as c:
            s = c.session(model=model_name)
            s.steer(layer=layer, scale=0.5)
            if i == 2:
                s.steer(layer=layer, add=vec, alpha=4.0)
            solo.append(s.generate(p, max_new_tokens=N, return_logits=True, stop_at_eos=False).result)
    other = _solo(server, model_name, PROMPTS[0], 2, n=2 * N)
    sched = _loaded(kernel, model_name).decode_scheduler
    before = dict(sched.counters)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(_together(server, model_name, [(PROMPTS[0], 2, 2 * N)])))
    t.start()
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        s.steer(layer=layer, scale=0.5)
        s.steer(layer=layer, add=vec, alpha=4.0, rows=[2])
        batch = s.generate(PROMPTS, max_new_tokens=N, return_logits=True, stop_at_eos=False)
    t.join(timeout=600)
    assert isinstance(batch, dj.BatchFinished) and len(batch) == len(PROMPTS)
    for got, want in zip(batch.results, solo):
        assert got.prompt_tokens == want.prompt_tokens
        _same(got, want)
    _same(out[0], other)
    stats = sched.counters
    assert stats["joins"] - before["joins"] == len(PROMPTS) + 1
    assert stats["own_steps"] == before["own_steps"]


def test_forks_of_one_checkpoint_resumed_together_are_rows_of_one_step(server, kernel, model_name):
    """A sweep: one prefill, a checkpoint, then forks with different scales resumed at once
    by their clients (a loaded checkpoint file each: a fork is its client's) decode as rows
    of batched steps; each equals the same fork resumed alone."""
    layer, scales = _layer(model_name), (0.5, 0.0, 1.0, 2.0)
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        s.breakpoint(layer=0, steps=[1])
        assert s.generate(PROMPTS[0], max_new_tokens=N, return_logits=True, stop_at_eos=False).paused
        ck = s.checkpoint().wait()
        s.stop()
        alone = []
        for x in scales:
            f = s.fork(ck)
            f.clear_breakpoints()
            f.steer(layer=layer, add=np.linspace(-1, 1, s.hidden_size).astype(np.float32), alpha=x)
            alone.append(f.resume().result)
            f.close()
        import tempfile
        from pathlib import Path
        path = Path(tempfile.mkdtemp(prefix="djinn-sweep-")) / "ck.djckpt"
        ck.save(path)
    sched = _loaded(kernel, model_name).decode_scheduler
    clients = [dj.connect(server.address) for _ in scales]
    try:
        forks = []
        for cl, x in zip(clients, scales):
            f = cl.load_checkpoint(path).session
            f.clear_breakpoints()
            f.steer(layer=layer, add=np.linspace(-1, 1, f.hidden_size).astype(np.float32), alpha=x)
            forks.append(f)
        before = dict(sched.counters)
        out: dict = {}
        start = threading.Barrier(len(forks))

        def one(i, f):
            start.wait(timeout=120)
            out[i] = f.resume().result
        threads = [threading.Thread(target=one, args=(i, f)) for i, f in enumerate(forks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        for cl in clients:
            cl.close()
    for i in range(len(scales)):
        _same(out[i], alone[i])
    assert len({tuple(r.tokens) for r in alone}) > 1 or model_name == "tiny-gpt2"
    stats = sched.counters
    assert stats["rows_stepped"] - before["rows_stepped"] == len(scales) * (N - 1)
    # rows shared steps: fewer batched steps than rows stepped
    assert stats["batched_steps"] - before["batched_steps"] < len(scales) * (N - 1)


# ---- chunked prefill: a long prompt joins between the running rows' steps --------------------
LONG = " ".join(["The history of the river valley is long and"] * 5)     # ~50 tokens


@pytest.fixture
def small_chunks(monkeypatch):
    """Prefill chunks of 8 tokens (the server runs in this process): a long prompt is
    several chunks on the tiny models."""
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 8)


def test_a_long_prompt_prefilled_in_chunks_beside_running_rows_gets_its_solo_bits(
        server, kernel, model_name, small_chunks, monkeypatch):
    """The joiner's chunked prefill equals its solo (chunked) run bit for bit while another
    session decodes; between two chunks the running row steps (seen by the counter at each
    chunk boundary, not by timing); and chunked equals one forward to rounding."""
    layer = _layer(model_name)
    solo_long = _solo(server, model_name, LONG, 1)
    sched = _loaded(kernel, model_name).decode_scheduler
    n_chunks = -(-len(solo_long.prompt_tokens) // 8)
    assert n_chunks >= 4
    runner_solo = _solo(server, model_name, PROMPTS[0], 2, n=160)
    boundaries: list = []
    original = sched._yield_to_decode

    def observed():
        with sched.cond:
            running = len(sched.expected)
            before = sched.counters["batched_steps"]
        original()
        with sched.cond:
            boundaries.append((running, before, sched.counters["batched_steps"], len(sched.expected)))
    monkeypatch.setattr(sched, "_yield_to_decode", observed)
    out: dict = {}
    with dj.connect(server.address) as ca, dj.connect(server.address) as cb:
        a, b = ca.session(model=model_name), cb.session(model=model_name)
        _rules(a, 2, layer)
        _rules(b, 1, layer)
        joins = sched.counters["joins"]
        t = threading.Thread(target=lambda: out.update(a=a.generate(
            PROMPTS[0], max_new_tokens=160, return_logits=True, stop_at_eos=False).result))
        t.start()
        with sched.cond:           # a is a row of the lane (its decode started)
            assert sched.cond.wait_for(lambda: sched.counters["joins"] > joins, timeout=120)
        chunks = sched.counters["prefill_chunks"]
        joined = b.generate(LONG, max_new_tokens=N, return_logits=True, stop_at_eos=False).result
        t.join(timeout=600)
    assert sched.counters["prefill_chunks"] - chunks == n_chunks
    _same(joined, solo_long)
    _same(out["a"], runner_solo)
    # every boundary where a was running and still is after: a stepped in between
    stepped = [(before, after) for running, before, after, still in boundaries if running and still]
    assert len(stepped) >= n_chunks - 2, boundaries
    assert all(after > before for before, after in stepped), boundaries
    # one forward (no chunks): the same tokens, logits to rounding
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 0)
    whole = _solo(server, model_name, LONG, 1)
    assert whole.tokens == solo_long.tokens
    assert np.abs(whole.logits - solo_long.logits).max() < 1e-3


def test_a_batch_row_with_a_long_prompt_is_chunked_as_alone(server, model_name, small_chunks):
    solo = [_solo(server, model_name, p, 1) for p in (LONG, PROMPTS[1])]
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        _rules(s, 1, _layer(model_name))
        batch = s.generate([LONG, PROMPTS[1]], max_new_tokens=N, return_logits=True, stop_at_eos=False)
    for got, want in zip(batch.results, solo):
        _same(got, want)


def test_a_prefill_breakpoint_keeps_the_prompt_in_one_forward(server, kernel, model_name, small_chunks,
                                                               monkeypatch):
    """A pause in the prefill sees the whole prompt (no chunks) and resumes to the bits of
    the same run with its prefill in one forward."""
    layer = _layer(model_name)
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        s.generate(PROMPTS[0], max_new_tokens=2)          # (makes the scheduler)
        sched = _loaded(kernel, model_name).decode_scheduler
        sched_before = sched.counters["prefill_chunks"]
        s.breakpoint(layer=layer, phase="prefill")
        ev = s.generate(LONG, max_new_tokens=N, return_logits=True, stop_at_eos=False)
        assert isinstance(ev, dj.Paused) and ev.positions == len(s.tokenize(LONG))
        paused = s.resume().result
    assert sched.counters["prefill_chunks"] == sched_before
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 0)
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        _same(s.generate(LONG, max_new_tokens=N, return_logits=True, stop_at_eos=False).result, paused)


def test_stats_counts_rows_steps_and_tokens(server, kernel, model_name):
    first = _solo(server, model_name, PROMPTS[0], 0)
    sched = _loaded(kernel, model_name).decode_scheduler
    before = sched.stats()
    assert set(before) >= {"rows_active", "rows_paused", "steps", "tokens"}
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        s.breakpoint(layer=0, steps=[3])
        assert isinstance(s.generate(PROMPTS[1], max_new_tokens=N), dj.Paused)
        mid = sched.stats()
        assert mid["rows_paused"] - before["rows_paused"] == 1
        assert s.resume().finished
    after = sched.stats()
    assert after["rows_paused"] == before["rows_paused"]
    assert after["tokens"] - before["tokens"] == N - 1          # decode steps (not the prefill)
    assert after["steps"] - before["steps"] == N - 1            # alone: one row a step
    assert first.tokens


def test_a_batch_call_checkpoint_is_refused_by_name(server, model_name):
    """A checkpoint is one sequence: a batch call's session refuses it with a typed error
    that says so, and the session stays usable (a single generation then checkpoints)."""
    with dj.connect(server.address) as c:
        s = c.session(model=model_name)
        assert s.generate(PROMPTS[:3], max_new_tokens=4, stop_at_eos=False).finished
        with pytest.raises(dj.CheckpointError, match="holds one sequence and this session's "
                                                     r"generate\(\) made 3"):
            s.checkpoint()
        assert s.generate(PROMPTS[0], max_new_tokens=4, stop_at_eos=False).finished
        assert s.checkpoint().wait()
