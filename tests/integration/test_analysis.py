"""Teacher-forced scoring (``s.score``) and steering vectors, through a real server."""
from __future__ import annotations

import numpy as np
import pytest

import djinn_nb as dj
from conftest import MIDDLE

PROMPT = "The quick brown fox jumps over"


def _log_softmax(z):
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _tol(session):
    return 2e-3 if session.dtype != "float32" else 1e-4


@pytest.mark.parametrize("rules", ["none", "scale", "add_last_some_steps"])
def test_score_matches_logits_collected_during_generation(session, rules):
    layer = MIDDLE[session.model] if session.model in MIDDLE else 2
    if rules == "scale":
        session.steer(layer, scale=0.9)
    elif rules == "add_last_some_steps":
        rng = np.random.default_rng(0)
        session.steer(layer, add=rng.standard_normal(session.hidden_size).astype(np.float32),
                      alpha=0.5, positions="last", steps=[0, 2, 3])
    fin = session.generate(PROMPT, 10, return_logits=True, stop_at_eos=False)
    res = fin.result
    sc = session.score(fin)                       # the session's rules, start = prompt length
    assert sc.start == len(res.prompt_tokens) and len(sc) == len(res.tokens)
    want = _log_softmax(res.logits)[np.arange(len(res.tokens)), res.tokens]
    np.testing.assert_allclose(sc.token_logprobs, want, atol=_tol(session))
    # full logits on request: the same as the generation's, position by position
    full = session.score(fin, return_logits=True, compare=False)
    np.testing.assert_allclose(full.logits, res.logits, atol=_tol(session) * 10)
    assert full.kl is None
    # the generated token is the argmax at every step (greedy), so top-1 agrees
    assert [int(t[0]) for t in sc.top_ids] == res.tokens
    if rules == "none":
        assert np.all(sc.kl == 0) and np.all(sc.top1_agree) and np.all(sc.rel_logit_change == 0)
    else:
        assert sc.kl.max() > 0 and sc.rel_logit_change.max() > 0
        np.testing.assert_allclose(session.score(fin, steering=None).token_logprobs,
                                   sc.baseline_token_logprobs, atol=1e-9)


def test_score_with_explicit_rules_equals_session_rules(client):
    s = client.session(model="tiny-gpt2")
    fin = s.generate(PROMPT, 8, stop_at_eos=False)
    explicit = s.score(fin, steering=[{"layer": 4, "scale": 0.5}])
    s.steer(4, scale=0.5)
    standing = s.score(fin)
    np.testing.assert_array_equal(explicit.token_logprobs, standing.token_logprobs)
    np.testing.assert_array_equal(explicit.kl, standing.kl)
    assert explicit.kl.max() > 0
    # a text works too; start defaults to 1
    text = s.score(PROMPT, steering=None)
    assert text.start == 1 and len(text) == len(text.tokens) - 1
    s.close()


def test_score_metrics_agree_with_client_divergence(client):
    """The server's per-position KL/TV along fixed tokens equal dj.divergence's numbers
    for the first step (where both runs share the same prefix)."""
    s = client.session(model="tiny-gpt2")
    base = s.generate(PROMPT, 6, return_logits=True, stop_at_eos=False)
    s.steer(4, scale=0.7)
    steered = s.generate(PROMPT, 6, return_logits=True, stop_at_eos=False)
    d = dj.divergence(base, steered)
    sc = s.score(base)
    assert sc.kl[0] == pytest.approx(d.kl[0], rel=1e-4, abs=1e-7)
    assert sc.tv[0] == pytest.approx(d.tv[0], rel=1e-4, abs=1e-7)
    assert sc.rel_logit_change[0] == pytest.approx(d.rel_logit_change[0], rel=1e-4)
    assert bool(sc.top1_agree[0]) == bool(d.top1_agree[0])
    s.close()


def test_steering_vector_equals_mean_difference_of_paused_activations(client):
    s = client.session(model="tiny-gpt2")
    pos, neg = ["I love this film", "What a happy day"], ["I hate this film", "What a sad day"]
    for reduce in ("last", "mean"):
        v = s.steering_vector(pos, neg, layer=3, reduce=reduce)
        assert v.shape == (s.hidden_size,) and v.dtype == np.float32

        def acts(prompts):
            out = []
            for p in prompts:
                s.clear_breakpoints()
                s.breakpoint(3, phase="prefill")
                ev = s.generate(p, 1)
                assert ev.paused
                out.append(s.activation(positions="last")[0] if reduce == "last"
                           else s.activation(reduce="mean"))
                s.stop()
            return np.mean(out, axis=0)
        np.testing.assert_allclose(v, acts(pos) - acts(neg), atol=1e-5)
    s.clear_breakpoints()
    # usable as a steering rule straight away
    s.steer(3, add=v, alpha=2.0)
    assert s.generate(pos[0], 3).finished
    s.close()


@pytest.mark.parametrize("kwargs, error", [
    (dict(tokens=[5]), dj.InvalidArgumentError),
    (dict(tokens=[1, 2, 3], start=3), dj.InvalidArgumentError),
    (dict(tokens=[1, 2, 3], steering=[{"layer": 99, "scale": 1.0}]), dj.LayerOutOfRangeError),
    (dict(tokens=[1, 2, 3], steering=[{"layer": 1, "scale": 1.0, "bogus": 1}]), dj.InvalidArgumentError),
    (dict(tokens=[1, 2, 3], steering=[{"layer": 1}]), dj.InvalidEditError),
    (dict(tokens=[1, 2, 3], steering="everything"), dj.InvalidArgumentError),
    (dict(tokens=[1, 2, 10**9]), dj.InvalidArgumentError),
])
def test_score_bad_input_is_a_typed_error(client, kwargs, error):
    s = client.session(model="tiny-gpt2")
    with pytest.raises(error):
        client.call("score", session=s.id, **kwargs)
    assert s.generate(PROMPT, 2).finished        # still usable
    with pytest.raises(dj.InvalidArgumentError):
        s.steering_vector([], ["x"], layer=1)
    with pytest.raises(dj.InvalidArgumentError):
        s.steering_vector(["a"], ["b"], layer=1, reduce="max")
    s.close()


# ---- batched one-shot passes: each row equals its one-prompt pass ------------------------
BATCH = ["I love this film", "What a happy day it is today", "x y", "The quick brown fox jumps over"]


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"], indirect=True)
def test_batched_cache_lens_score_equal_one_prompt_passes(session):
    """Left-padded batches (mask + position ids) give each row its one-prompt numbers:
    to 1e-5 (batched matrix products round differently in the last bits)."""
    layers = [0, 1, 2]
    sites = ["resid", "attn", "mlp", "heads", "attn_pattern"]
    for reduce in (None, "last", "mean", "norm"):
        many = session.cache(BATCH, sites=sites, layers=layers, reduce=reduce)
        assert len(many) == len(BATCH)
        for prompt, got in zip(BATCH, many):
            one = session.cache(prompt, sites=sites, layers=layers, reduce=reduce)
            assert got.keys() == one.keys()
            for key in one.keys():
                np.testing.assert_allclose(got[key], one[key], atol=1e-5, rtol=1e-5)
    for want, got in zip([session.lens(p, target=5) for p in BATCH], session.lens(BATCH, target=5)):
        assert [list(r) for r in got["top_ids"]] == [list(r) for r in want["top_ids"]]
        np.testing.assert_allclose(got["target_probs"], want["target_probs"], atol=1e-6)
    rules = [{"layer": 1, "scale": 0.5}, {"layer": 2, "add": [0.1] * session.hidden_size,
                                          "positions": "last", "steps": [0, 2]}]
    batch = session.score(BATCH, steering=rules, start=1)
    for prompt, got in zip(BATCH, batch):
        want = session.score(prompt, steering=rules, start=1)
        assert got.tokens == want.tokens
        np.testing.assert_allclose(got.token_logprobs, want.token_logprobs, atol=1e-5)
        np.testing.assert_allclose(got.kl, want.kl, atol=1e-6)
        assert got.kl.max() > 0


def test_batched_steering_vector_equals_one_prompt_means(client):
    s = client.session(model="tiny-gpt2")
    pos, neg = BATCH[:2], BATCH[2:]
    for reduce in ("last", "mean"):
        v = s.steering_vector(pos, neg, layer=3, reduce=reduce)
        acts = lambda ps: np.mean([s.cache(p, layers=3, reduce=reduce)["resid", 3] for p in ps], 0)  # noqa: E731
        np.testing.assert_allclose(v, acts(pos) - acts(neg), atol=1e-5)
    s.close()


def _one_cell_metric(s, acts, ids, site, head, layer, p, answer) -> float:
    """One patching cell by the server's score path: the corrupted ``ids`` with a one-position
    "set" rule of the clean activation ``acts[site, layer][p]``; logit[a0] - logit[a1]."""
    vec = acts[site, layer][p]
    rule = {"layer": layer, "site": site, "positions": [p],
            "set": (vec[head] if head is not None else vec).ravel().tolist()}
    if head is not None:
        rule["head"] = head
    sc = s.score(ids + [answer[0]], start=len(ids), steering=[rule], compare=False, return_logits=True)
    return sc.logits[-1][answer[0]] - sc.logits[-1][answer[1]]


@pytest.mark.parametrize("site, head", [("resid", None), ("attn", None), ("mlp", None), ("heads", 1)])
def test_patching_sweep_as_batch_rows_equals_one_pass_per_cell(client, site, head):
    """The sweep's cells run as batch rows (several layers per forward); each equals a
    one-prompt pass of the corrupted prompt with a one-position "set" rule of the clean
    activation (the server's score path), to 1e-5."""
    s = client.session(model="tiny-gpt2")
    clean, bad = "The cat sat on the mat", "The dog sat on the mat"
    answer = [5, 7]
    grid = s.patch(clean, bad, answer, site=site, head=head, batch=10, progress=True)
    assert grid.metric.shape == (s.layers, len(s.tokenize(bad)))
    acts = s.cache(clean, sites=[site])
    ids = s.tokenize(bad)
    for layer in (1, 4):                          # two layers' cells, one pass each
        for j, p in enumerate(grid.positions):
            want = _one_cell_metric(s, acts, ids, site, head, layer, p, answer)
            assert grid.metric[layer, j] == pytest.approx(want, abs=1e-5)
    one = s.patch(clean, bad, answer, site=site, head=head, progress=False, batch=1)
    np.testing.assert_allclose(one.metric, grid.metric, atol=1e-5)
    s.close()


def test_transformer_lens_hook_names_are_sites(client):
    s = client.session(model="tiny-gpt2")
    c = s.cache("Hello world, again", sites=["blocks.2.hook_resid_post", "blocks.1.hook_attn_out",
                                             "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z",
                                             "blocks.1.hook_resid_pre", "hook_embed"])
    ref = s.cache("Hello world, again", sites=["resid", "attn", "mlp", "heads"], layers=[0, 1, 2])
    np.testing.assert_array_equal(c["blocks.2.hook_resid_post"], ref["resid", 2])
    np.testing.assert_array_equal(c["blocks.1.hook_attn_out"], ref["attn", 1])
    np.testing.assert_array_equal(c["blocks.1.hook_mlp_out"], ref["mlp", 1])
    np.testing.assert_array_equal(c["blocks.1.attn.hook_z"], ref["heads", 1])
    np.testing.assert_array_equal(c["blocks.1.hook_resid_pre"], ref["resid", 0])
    assert c["hook_embed"].shape == ref["resid", 0].shape
    s.breakpoint(site="blocks.2.hook_resid_post", phase="prefill")
    ev = s.generate("Hello world, again", 1)
    assert ev.paused and ev.layer == 2
    np.testing.assert_array_equal(s.activation(), ref["resid", 2])
    s.stop()
    assert s.to_str_tokens("Hello world") == ["Hello", " world"]
    with pytest.raises(dj.InvalidArgumentError):
        s.cache("x", sites=["blocks.1.attn.hook_result"])     # (no honest equivalent: refused)
    s.close()


# ---- the incremental exact sweep (kernel_server.model.patching) ---------------------------
SWEEP_PROMPTS = {"smollm2-135m": ("The Eiffel Tower is in the city of", "The Colosseum is in the city of",
                                  " Paris", " Rome")}


def _sweep_setup(session, kernel):
    """(loaded model, clean ids, corrupted ids, answer) of the model's patching example."""
    loaded = kernel.models.get(session.model)
    clean, bad, a, b = SWEEP_PROMPTS.get(session.model, ("The cat sat on the mat", "The dog sat on the mat",
                                                        None, None))
    answer = [5, 7] if a is None else [session.tokenize(a)[0], session.tokenize(b)[0]]
    return loaded, session.tokenize(clean), session.tokenize(bad), answer


def _reference_grid(loaded, clean, bad, site, layers, answer, head):
    """The grid as every cell a row of a whole-prompt forward (``rows_sweep``)."""
    from kernel_server.model import patching
    from kernel_server.model.passes import ForwardPass, run_batch
    fp = ForwardPass(capture=[(layer, site) for layer in layers], loaded=loaded)
    run_batch(loaded, [clean], fp)
    acts = {layer: fp.captured[(layer, site)][0] for layer in layers}
    values, corrupted = patching.rows_sweep(loaded, bad, site, layers, list(range(len(bad))), answer,
                                            acts, head, 64)
    return np.array(values).reshape(len(layers), len(bad)), corrupted


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama",
                                   pytest.param("smollm2-135m", marks=pytest.mark.smollm2)], indirect=True)
@pytest.mark.parametrize("site, head", [("resid", None), ("attn", None), ("mlp", None), ("heads", 1)])
def test_incremental_sweep_equals_one_pass_per_cell(session, kernel, site, head):
    """The sweep runs each cell from its layer and position on (the corrupted prefix's keys
    and values reused): every cell equals the whole-prompt pass with that one patch, to
    1e-4 (measured ~1e-7 on the tiny models, ~1e-5 on SmolLM2), for every site."""
    if session.model == "smollm2-135m" and site in ("attn", "heads"):
        pytest.skip("SmolLM2 runs resid and mlp only (the 30 x 9 reference takes minutes per site on CPU)")
    from kernel_server.model import patching
    loaded, clean, bad, answer = _sweep_setup(session, kernel)
    grid = session.patch(clean, bad, answer, site=site, head=head, progress=False)
    layers = list(range(session.layers))
    ref, ref_corrupted = _reference_grid(loaded, clean, bad, site, layers, answer, head)
    np.testing.assert_allclose(grid.metric, ref, atol=1e-4, rtol=0)
    assert grid.corrupted == pytest.approx(ref_corrupted, abs=1e-4)
    assert np.ptp(ref) > 1e-3                 # the grid is not flat: patches change the metric
    # one pass per cell, through the server's score path, for two layers' cells
    acts = session.cache(clean, sites=[site])
    for layer in (1, session.layers - 2):
        for j, p in enumerate(grid.positions):
            want = _one_cell_metric(session, acts, bad, site, head, layer, p, answer)
            assert grid.metric[layer, j] == pytest.approx(want, abs=1e-4)
    # it ran incrementally (no fall-back to whole-prompt rows)
    out = patching.patch_cells(loaded, clean, bad, site, [0, 2], [0, len(bad) - 1],
                                  tuple(answer), head)
    assert out["method"] == "incremental"


def test_sweep_cells_before_the_first_different_token_are_the_corrupted_run(client, kernel):
    """Position 0 holds the same token in both prompts: its activations are equal at every
    layer, so its cells are the corrupted metric (not computed, and equal to one pass)."""
    s = client.session(model="tiny-gpt2")
    clean, bad = s.tokenize("The cat sat on the mat"), s.tokenize("The dog sat on the mat")
    assert clean[0] == bad[0] and clean[1] != bad[1]
    grid = s.patch(clean, bad, [5, 7], progress=False)
    np.testing.assert_array_equal(grid.metric[:, 0], np.full(s.layers, grid.corrupted))
    ref, _ = _reference_grid(kernel.models.get(s.model), clean, bad, "resid", list(range(s.layers)), [5, 7], None)
    np.testing.assert_allclose(grid.metric[:, 0], ref[:, 0], atol=1e-5)
    s.close()


@pytest.mark.parametrize("how", ["blocks_not_callable", "self_check_fails"])
def test_sweep_falls_back_to_whole_prompt_rows(client, kernel, monkeypatch, how):
    """Where a model's blocks cannot be driven one by one, or the unpatched row does not give
    the corrupted metric, the sweep runs every cell as a whole-prompt row: same grid,
    ``method`` "rows"."""
    from kernel_server.model import patching
    s = client.session(model="tiny-gpt2")
    loaded = kernel.models.get(s.model)
    clean, bad = s.tokenize("The cat sat on the mat"), s.tokenize("The dog sat on the mat")
    want = patching.patch_cells(loaded, clean, bad, "resid", [0, 1, 2, 3], list(range(len(bad))), (5, 7))
    assert want["method"] == "incremental"
    if how == "blocks_not_callable":
        def refuse(*a, **k):
            raise patching._Unsupported("test")
        monkeypatch.setattr(patching, "_block_calls", refuse)
    else:
        monkeypatch.setattr(patching, "SELF_CHECK_TOL", -1.0)
        monkeypatch.setattr(patching, "SELF_CHECK_EPS", -1.0)
    got = patching.patch_cells(loaded, clean, bad, "resid", [0, 1, 2, 3], list(range(len(bad))), (5, 7))
    assert got["method"] == "rows"
    np.testing.assert_allclose(got["metric"], want["metric"], atol=1e-5)
    # the model's blocks are whole again: a generation is unchanged
    assert all("forward" not in vars(block) for block in loaded.layers)
    grid = s.patch(clean, bad, [5, 7], progress=False)
    np.testing.assert_allclose(grid.metric[:4], np.array(want["metric"]), atol=1e-5)
    s.close()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"], indirect=True)
@pytest.mark.parametrize("how", ["eager_attention", "many_passes_small_calls"])
def test_incremental_sweep_layouts_equal_whole_prompt_rows(session, kernel, monkeypatch, how):
    """The flat token calls of the incremental sweep give the whole-prompt grid whatever their
    layout: with eager attention (an additive 4-D mask instead of a boolean one), and with the
    cells split over several passes and calls of a few tokens (cells cut at call borders)."""
    from kernel_server.model import patching
    loaded, clean, bad, answer = _sweep_setup(session, kernel)
    layers, positions = list(range(session.layers)), list(range(len(bad)))
    ref, ref_corrupted = _reference_grid(loaded, clean, bad, "resid", layers, answer, None)
    previous = loaded.model.config._attn_implementation
    if how == "eager_attention":
        assert previous == "sdpa"
        loaded.model.set_attn_implementation("eager")
    else:
        monkeypatch.setattr(patching, "CALL_TOKENS", 7)
        monkeypatch.setattr(patching, "MAX_STATE_BYTES", 20 * 4 * loaded.hidden_size * loaded.dtype.itemsize)
    try:
        out = patching.patch_cells(loaded, clean, bad, "resid", layers, positions, tuple(answer))
    finally:
        loaded.model.set_attn_implementation(previous)
    assert out["method"] == "incremental"
    np.testing.assert_allclose(np.array(out["metric"]), ref, atol=1e-4, rtol=0)
    assert out["corrupted"] == pytest.approx(ref_corrupted, abs=1e-4)


def test_passes_that_read_early_blocks_stop_there(client, kernel):
    """A steering vector or cache of block 1 computes no later block (stop_after), and its
    numbers equal those of a whole forward."""
    import torch
    from kernel_server.model.passes import ForwardPass, run_batch
    s = client.session(model="tiny-gpt2")
    loaded = kernel.models.get(s.model)
    calls = []
    handle = loaded.layers[2].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        v = s.steering_vector(BATCH[:2], BATCH[2:], layer=1)
        c = s.cache(BATCH[0], sites=["resid", "mlp"], layers=[0, 1])
        assert calls == []
        s.cache(BATCH[0], layers=[3])
        assert len(calls) == 1
    finally:
        handle.remove()
    fp = ForwardPass(capture=[(1, "resid")], loaded=loaded)
    for prompt in BATCH[:1]:
        run_batch(loaded, [s.tokenize(prompt)], fp)
        np.testing.assert_array_equal(c["resid", 1], fp.captured[(1, "resid")][0].float().cpu().numpy())
    acts = lambda ps: np.mean([s.cache(p, layers=1, reduce="last")["resid", 1] for p in ps], 0)  # noqa: E731
    np.testing.assert_allclose(v, acts(BATCH[:2]) - acts(BATCH[2:]), atol=1e-5)
    assert torch.is_tensor(fp.captured[(1, "resid")][0])
    s.close()
