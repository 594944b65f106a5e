"""Intervention sites, logit lens, activation cache and patching, checked against direct
Hugging Face runs of the same model object (the kernel runs in this process)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import djinn_nb as dj
from conftest import MIDDLE

PROMPT = "The quick brown fox jumps over the lazy"


def _loaded(kernel, session):
    return kernel.models.get(session.model)


def _modules(loaded, layer):
    block = loaded.layers[layer]
    attn = getattr(block, "self_attn", None) or getattr(block, "attn")
    proj = getattr(attn, "o_proj", None) or getattr(attn, "c_proj")
    return {"resid": block, "attn": attn, "mlp": block.mlp}, proj


def _direct(loaded, ids, layer):
    """What plain forward hooks on the modules see in a direct run (no djinn hooks fire:
    this thread has no run)."""
    seen, handles = {}, []
    mods, proj = _modules(loaded, layer)
    for name, m in mods.items():
        handles.append(m.register_forward_hook(
            lambda mod, a, out, name=name: seen.__setitem__(name, (out[0] if isinstance(out, tuple) else out)[0].float().clone())))
    handles.append(proj.register_forward_pre_hook(
        lambda mod, a: seen.__setitem__("heads", a[0][0].float().clone())))
    try:
        with torch.inference_mode(), loaded.compute_lock:
            out = loaded.model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen, out.logits[0, -1].float()


def _tol(session):
    return 1e-5 if session.dtype == "float32" else 1e-2


def test_each_site_equals_a_plain_hook(kernel, session):
    loaded = _loaded(kernel, session)
    layer = MIDDLE.get(session.model, 2)
    ids = session.tokenize(PROMPT)
    want, _ = _direct(loaded, ids, layer)
    cache = session.cache(ids, sites=["resid", "attn", "mlp", "heads"], layers=[layer])
    heads, head_dim = cache["heads", layer].shape[1:]
    for site in ("resid", "attn", "mlp"):
        np.testing.assert_allclose(cache[site, layer], want[site].cpu().numpy(), atol=_tol(session))
    np.testing.assert_allclose(cache["heads", layer].reshape(len(ids), heads * head_dim),
                               want["heads"].cpu().numpy(), atol=_tol(session))
    # a breakpoint at each site pauses on the same tensor (prefill: every position)
    for site in ("resid", "attn", "mlp", "heads"):
        session.clear_breakpoints()
        session.breakpoint(layer, phase="prefill", site=site)
        ev = session.generate(ids, 2)
        assert ev.paused and ev.site == site and ev.layer == layer
        got = session.activation()
        np.testing.assert_allclose(got, cache[site, layer], atol=_tol(session))
        session.stop()
    session.clear_breakpoints()


def test_site_steering_at_scale_one_is_exact(session):
    layer = MIDDLE.get(session.model, 2)
    base = session.generate(PROMPT, 8, stop_at_eos=False).tokens
    for site in ("attn", "mlp", "heads"):
        session.clear_steering()
        session.steer(layer, site=site, scale=1.0)
        assert session.generate(PROMPT, 8, stop_at_eos=False).tokens == base, site
    session.clear_steering()
    session.steer(layer, site="heads", head=0, scale=1.0)
    assert session.generate(PROMPT, 8, stop_at_eos=False).tokens == base


def test_zero_ablating_a_head_changes_exactly_that_head(kernel, client):
    s = client.session(model="tiny-gpt2")
    loaded = kernel.models.get("tiny-gpt2")
    layer, head = 3, 2
    ids = s.tokenize(PROMPT)
    clean = s.cache(ids, sites=["heads", "attn"], layers=[layer])
    rule = [{"layer": layer, "site": "heads", "head": head, "scale": 0.0}]
    ablated = s.cache(ids, sites=["heads", "attn"], layers=[layer], steering=rule)
    h0, h1 = clean["heads", layer], ablated["heads", layer]
    assert np.all(h1[:, head] == 0)
    others = [i for i in range(h0.shape[1]) if i != head]
    np.testing.assert_array_equal(h1[:, others], h0[:, others])
    # the attention output moves by exactly the head's slice through the output projection
    _, proj = _modules(loaded, layer)
    d = h0.shape[2]
    w = proj.weight.detach().float().cpu().numpy()   # GPT-2 Conv1D: [in, out]
    contribution = h0[:, head] @ w[head * d:(head + 1) * d]
    np.testing.assert_allclose(clean["attn", layer] - ablated["attn", layer], contribution, atol=1e-5)
    # the same rule as a standing steer() during generation reads the same at a pause
    s.steer(layer, site="heads", head=head, scale=0.0)
    s.breakpoint(layer, phase="prefill", site="heads")
    s.generate(ids, 2)
    np.testing.assert_allclose(s.activation(), h1, atol=1e-6)
    s.stop()
    s.close()


def test_logit_lens_at_the_last_layer_is_the_models_distribution(kernel, session):
    loaded = _loaded(kernel, session)
    ids = session.tokenize(PROMPT)
    last = session.layers - 1
    _, logits = _direct(loaded, ids, 0)
    probs = torch.softmax(logits, -1).cpu().numpy()
    lens = session.lens(ids, layers=[0, last], k=5, target=int(probs.argmax()))
    assert lens["layers"] == [0, last]
    np.testing.assert_allclose(lens["top_probs"][1], np.sort(probs)[::-1][:5], atol=_tol(session))
    assert lens["top_ids"][1][0] == probs.argmax() == lens["model_top_id"]
    assert lens["target_probs"][1] == pytest.approx(lens["model_target_prob"], abs=_tol(session))
    # at a pause: the prefill's last position through the lens = the first step's record
    session.breakpoint(last, phase="prefill")
    session.generate(ids, 1)
    paused = session.logit_lens(k=5)
    fin = session.resume()
    np.testing.assert_allclose(paused["top_probs"][0], fin.steps[0].top_probs, atol=_tol(session))
    assert list(paused["top_ids"][0]) == fin.steps[0].top_ids
    session.clear_breakpoints()


def test_reduced_cache_equals_reducing_the_full_cache(client):
    s = client.session(model="tiny-gpt2")
    full = s.cache(PROMPT, sites=["resid", "mlp"])
    assert len(full) == 2 * s.layers and full.stack("resid").shape[0] == s.layers
    for reduce, fn in [("norm", lambda a: np.linalg.norm(a, axis=-1)), ("mean", lambda a: a.mean(0)),
                       ("last", lambda a: a[-1])]:
        red = s.cache(PROMPT, sites=["resid", "mlp"], reduce=reduce)
        for key in full.keys():
            np.testing.assert_allclose(red[key], fn(full[key]), rtol=1e-5, atol=1e-5)
    norms = s.cache(PROMPT, reduce="norm")
    assert norms.nbytes < full.nbytes / 10
    pat = s.cache(PROMPT, sites="attn_pattern", layers=[1, 2])
    a = pat["attn_pattern", 1]
    n = len(s.tokenize(PROMPT))
    assert a.shape[1:] == (n, n)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(a[0], 1) == 0)            # causal
    # the attention switch does not leak into generation: tokens as before
    base = s.generate(PROMPT, 6).tokens
    s.cache(PROMPT, sites="attn_pattern", layers=[0])
    assert s.generate(PROMPT, 6).tokens == base
    s.close()


def test_module_path_site(kernel, client):
    s = client.session(model="tiny-gpt2")
    loaded = kernel.models.get("tiny-gpt2")
    ids = s.tokenize(PROMPT)
    path = "transformer.h.2.mlp.c_fc"
    cache = s.cache(ids, sites=f"module:{path}")
    seen = {}
    h = dict(loaded.model.named_modules())[path].register_forward_hook(
        lambda m, a, o: seen.__setitem__("x", o[0].float().clone()))
    try:
        with torch.inference_mode():
            loaded.model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False)
    finally:
        h.remove()
    seen["x"] = seen["x"].cpu()
    np.testing.assert_allclose(cache[f"module:{path}"], seen["x"].numpy(), atol=1e-6)
    s.breakpoint(site=f"module:{path}", phase="prefill")
    ev = s.generate(ids, 1)
    assert ev.paused and ev.layer is None and ev.site == f"module:{path}"
    np.testing.assert_allclose(s.activation(), seen["x"].numpy(), atol=1e-6)
    s.stop()
    s.close()


@pytest.mark.parametrize("call, error", [
    (lambda s: s.breakpoint(1, site="module:transformer.h.99.mlp"), dj.InvalidArgumentError),
    (lambda s: s.breakpoint(1, site="__import__('os')"), dj.InvalidArgumentError),
    (lambda s: s.breakpoint(1, site="attn_pattern"), dj.InvalidArgumentError),
    (lambda s: s.steer(1, site="attn", head=1, scale=0.0), dj.InvalidArgumentError),
    (lambda s: s.steer(1, site="heads", head=99, scale=0.0), dj.InvalidArgumentError),
    (lambda s: s.steer(1, site="heads", head=1, add=np.ones(64)), dj.InvalidEditError),
    (lambda s: s.cache("hi", sites=["resid", "nope"]), dj.InvalidArgumentError),
    (lambda s: s.cache("hi", layers=[99]), dj.LayerOutOfRangeError),
    (lambda s: s.patch("a b c", "a b", answer=[1, 2], layers=[1]), dj.InvalidArgumentError),
    (lambda s: s.logit_lens(), dj.NotPausedError),
])
def test_site_bad_input_is_a_typed_error(client, call, error):
    s = client.session(model="tiny-gpt2")
    with pytest.raises(error):
        call(s)
    assert s.generate(PROMPT, 2).finished
    s.close()


def test_patching(client):
    s = client.session(model="tiny-gpt2")
    clean = s.tokenize("The cat sat on the mat and then")
    corrupted = list(clean)
    corrupted[2] = s.tokenize(" dog")[0] if len(s.tokenize(" dog")) == 1 else (clean[2] + 1)
    base = s.generate(clean, 1).tokens[0]
    other = s.generate(corrupted, 1).tokens[0]
    answer = [base, other if other != base else (base + 1)]
    # a clean run patched into itself changes nothing
    same = s.patch(clean, clean, answer=answer, layers=[0, 3, 7], progress=False)
    assert np.all(same.metric == same.clean) and same.clean == same.corrupted
    res = s.patch(clean, corrupted, answer=answer, progress=False)
    assert res.metric.shape == (s.layers, len(clean))
    # positions before the corrupted token see identical inputs: patching them is a no-op
    np.testing.assert_array_equal(res.metric[:, :2], res.corrupted)
    # at the corrupted position patching moves the metric
    assert np.max(np.abs(res.normalized[:, 2])) > 1e-3
    # ... and the last layer only matters at the last position: a non-trivial pattern
    assert res.normalized[-1, -1] == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.abs(res.normalized[-1, 2:-1]) < 1e-4)
    s.close()
    pytest.importorskip("plotly", reason="the heatmap needs plotly (the widgets extra)")
    fig = dj.plots.patching_heatmap(res)
    assert fig.data[0].z.shape == (s.layers, len(clean))


def test_site_rules_survive_a_checkpoint_file(client, server, tmp_path):
    """A heads-ablation rule and an mlp breakpoint travel in a saved checkpoint and act the
    same after loading it on a fresh connection."""
    s = client.session(model="tiny-gpt2")
    s.steer(3, site="heads", head=1, scale=0.0)
    s.steer(5, site="mlp", scale=0.5)
    s.breakpoint(2, site="attn", phase="decode", steps=[3])
    ev = s.generate(PROMPT, 6, stop_at_eos=False)
    assert ev.paused and ev.site == "attn" and ev.step == 3
    ck = s.checkpoint()
    want = s.resume()
    assert want.finished
    path = ck.save(tmp_path / "sites.djckpt")
    other = dj.connect(server.address)
    try:
        s2 = other.load_checkpoint(path).session
        info = s2.info()
        assert {(r["site"], r.get("head")) for r in info["steering"]} == {("heads", 1), ("mlp", None)}
        assert info["breakpoints"][0]["site"] == "attn"
        again = s2.resume()          # the restored breakpoint pauses at the same place
        assert again.paused and (again.site, again.layer, again.step) == ("attn", 2, 3)
        assert s2.resume().tokens == want.tokens
    finally:
        other.close()
    s.close()


def _plain_run(loaded, ids, hooks):
    """A direct forward pass with plain hooks {name: (module, pre)}; what each saw (row 0)."""
    seen, handles = {}, []
    for name, (module, pre) in hooks.items():
        if pre:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: seen.__setitem__(name, a[0][0].float().clone())))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: seen.__setitem__(
                    name, (out[0] if isinstance(out, tuple) else out)[0].float().clone())))
    try:
        with torch.inference_mode(), loaded.compute_lock:
            loaded.model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu().numpy() for k, v in seen.items()}


def _open_block_1(kernel, client, model, request):
    """A session on ``model`` ("tiny-gpt2" or "tiny-llama"), its loaded model, PROMPT's ids,
    decoder block 1 and whether it is the Llama."""
    name = request.getfixturevalue("tiny_llama_path") if model == "tiny-llama" else model
    s = client.session(model=name)
    loaded = kernel.models.get(s.model)
    return s, loaded, s.tokenize(PROMPT), loaded.layers[1], model == "tiny-llama"


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_more_transformer_lens_names(kernel, client, model, request):
    """hook_resid_mid (the input of the norm before the MLP), ln1/ln2.hook_normalized,
    attn.hook_q/k/v (Llama's separate projections) and hook_pos_embed (GPT-2's wpe) equal
    plain hooks on those modules; the names the architecture lacks are clear errors."""
    s, loaded, ids, block, llama = _open_block_1(kernel, client, model, request)
    hooks = {"blocks.1.hook_resid_mid": (block.post_attention_layernorm if llama else block.ln_2, True),
             "blocks.1.ln1.hook_normalized": (block.input_layernorm if llama else block.ln_1, False),
             "blocks.1.ln2.hook_normalized": (block.post_attention_layernorm if llama else block.ln_2, False)}
    if llama:
        hooks.update({f"blocks.1.attn.hook_{x}": (getattr(block.self_attn, f"{x}_proj"), False)
                      for x in "qkv"})
    else:
        hooks["hook_pos_embed"] = (loaded.model.transformer.wpe, False)
    want = _plain_run(loaded, ids, hooks)
    cache = s.cache(ids, sites=list(hooks))
    for hook in hooks:
        np.testing.assert_allclose(cache[hook], want[hook], atol=1e-6, err_msg=hook)
    # resid_mid = resid_pre + attn_out, as TransformerLens defines it
    ref = s.cache(ids, sites=["resid", "attn"], layers=[0, 1])
    np.testing.assert_allclose(cache["blocks.1.hook_resid_mid"], ref["resid", 0] + ref["attn", 1], atol=1e-5)
    if llama:       # grouped-query attention: k and v have fewer heads than q
        assert cache["blocks.1.attn.hook_k"].shape[1] < cache["blocks.1.attn.hook_q"].shape[1]
        s.steer(site="blocks.1.attn.hook_v", scale=1.0)      # a real module output: writable
        assert s.info()["steering"][0]["site"].endswith("layers.1.self_attn.v_proj")
        s.clear_steering()
        with pytest.raises(dj.UnsupportedModelError, match="position embedding"):
            s.cache(ids, sites=["hook_pos_embed"])
    else:
        with pytest.raises(dj.UnsupportedModelError, match="c_attn"):
            s.cache(ids, sites=["blocks.1.attn.hook_q"])
    # resid_mid is read-only: no rule, breakpoint, patch or gradient there
    for call in (lambda: s.steer(1, site="resid_mid", scale=1.0),
                 lambda: s.breakpoint(site="blocks.1.hook_resid_mid"),
                 lambda: s.grad(ids, "logprob", target=ids[0], sites="resid_mid", layers=[1]),
                 lambda: s.cache(ids, steering=[{"layer": 1, "site": "resid_mid", "scale": 1.0}])):
        with pytest.raises(dj.InvalidArgumentError, match="read-only|block sites"):
            call()
    assert s.generate(ids, 2).finished
    s.close()


def _zeroing_run(loaded, ids, module, pre):
    """A direct forward pass with a plain hook that zeroes ``module``'s input (``pre``) or
    output; the last position's logits."""
    if pre:
        h = module.register_forward_pre_hook(lambda m, a: (torch.zeros_like(a[0]),) + tuple(a[1:]))
    else:
        h = module.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        with torch.inference_mode(), loaded.compute_lock:
            out = loaded.model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False)
    finally:
        h.remove()
    return out.logits[0, -1].float().cpu().numpy()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_attn_in_mlp_in_and_mlp_hook_names(kernel, client, model, request):
    """hook_attn_in / hook_mlp_in (the inputs of the block's two norms), mlp.hook_pre (GPT-2's
    c_fc, Llama's gate_proj), mlp.hook_pre_linear (Llama's up_proj) and mlp.hook_post (the
    input of the MLP's down projection) equal plain hooks on those modules; edits there act
    as a plain hook's edit does; the names with no honest equivalent are refused with why."""
    s, loaded, ids, block, llama = _open_block_1(kernel, client, model, request)
    down = block.mlp.down_proj if llama else block.mlp.c_proj
    mid = block.post_attention_layernorm if llama else block.ln_2
    hooks = {"blocks.1.hook_attn_in": (block.input_layernorm if llama else block.ln_1, True),
             "blocks.1.hook_mlp_in": (mid, True),
             "blocks.1.mlp.hook_pre": (block.mlp.gate_proj if llama else block.mlp.c_fc, False),
             "blocks.1.mlp.hook_post": (down, True)}
    if llama:
        hooks["blocks.1.mlp.hook_pre_linear"] = (block.mlp.up_proj, False)
    want = _plain_run(loaded, ids, hooks)
    cache = s.cache(ids, sites=list(hooks))
    for hook in hooks:
        np.testing.assert_allclose(cache[hook], want[hook], atol=1e-6, err_msg=hook)
    d_mlp = 128 if llama else 4 * loaded.hidden_size
    assert cache["blocks.1.mlp.hook_post"].shape == (len(ids), d_mlp)
    assert cache["mlp_post", 1].shape == (len(ids), d_mlp)           # the site by its own name
    # the same values as the residual stream there: resid_pre of block 1, resid_mid
    ref = s.cache(ids, sites=["resid", "resid_mid"], layers=[0, 1])
    np.testing.assert_array_equal(cache["blocks.1.hook_attn_in"], ref["resid", 0])
    np.testing.assert_array_equal(cache["blocks.1.hook_mlp_in"], ref["resid_mid", 1])
    # edits: scale 1.0 is bit-identical to no rule; scale 0 equals a plain hook zeroing the
    # same tensor (at hook_attn_in / hook_mlp_in only that sub-block's input changes)
    base = s.generate(ids, 4, return_logits=True, stop_at_eos=False).result
    for hook in ("blocks.1.hook_attn_in", "blocks.1.hook_mlp_in", "blocks.1.mlp.hook_post"):
        s.steer(site=hook, scale=1.0)
        same = s.generate(ids, 4, return_logits=True, stop_at_eos=False).result
        assert same.tokens == base.tokens and np.array_equal(same.logits, base.logits), hook
        s.clear_steering()
        s.steer(site=hook, scale=0.0)
        zeroed = s.generate(ids, 1, return_logits=True).result.logits[0]
        s.clear_steering()
        module, pre = hooks[hook]
        np.testing.assert_allclose(zeroed, _zeroing_run(loaded, ids, module, pre), atol=1e-5,
                                   err_msg=hook)
        assert np.abs(zeroed - base.logits[0]).max() > 1e-3, hook      # the edit did something
    # an mlp_post vector is d_mlp wide; a hidden-size one is refused
    s.steer(site="blocks.1.mlp.hook_post", add=np.zeros(d_mlp, dtype=np.float32))
    s.clear_steering()
    with pytest.raises(dj.InvalidEditError):
        s.steer(site="blocks.1.mlp.hook_post", add=np.zeros(loaded.hidden_size + 1, dtype=np.float32))
    # a pause at mlp.hook_post shows that tensor; resuming gives the same tokens
    s.breakpoint(site="blocks.1.mlp.hook_post", phase="decode", steps=[2])
    ev = s.generate(ids, 4, stop_at_eos=False)
    assert ev.paused and (ev.layer, ev.site, ev.step) == (1, "mlp_post", 2)
    assert s.activation().shape == (1, d_mlp)
    assert s.resume().tokens == base.tokens
    s.clear_breakpoints()
    if not llama:
        with pytest.raises(dj.UnsupportedModelError, match="gated MLP"):
            s.cache(ids, sites=["blocks.1.mlp.hook_pre_linear"])
    for hook, why in (("blocks.1.attn.hook_rot_q", "rotary"), ("blocks.0.attn.hook_rot_k", "rotary"),
                      ("blocks.1.attn.hook_attn_scores", "pre-softmax"),
                      ("blocks.1.attn.hook_result", "per-head outputs"),
                      ("blocks.1.ln2.hook_scale", "scale"), ("ln_final.hook_scale", "scale"),
                      ("blocks.1.hook_q_input", "one normalised input")):
        with pytest.raises(dj.InvalidArgumentError, match=f"not mapped: .*{why}"):
            s.cache(ids, sites=[hook])
        with pytest.raises(dj.InvalidArgumentError, match="not mapped"):
            s.steer(site=hook, scale=1.0)
    assert s.generate(ids, 2).finished
    s.close()
