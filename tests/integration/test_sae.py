"""Sparse autoencoders through the server: SAELens-format files with known weights, feature
activations, steering by a feature (added direction and clamp with the reconstruction error
added back) and the ``sae_encode`` / ``sae_decode`` expression ops, each against a hand
computation in numpy on the activations ``cache`` returns; bad files and names get typed
errors and the session stays usable."""
from __future__ import annotations

import json

import numpy as np
import pytest

import djinn_nb as dj
from djinn_nb.analysis import save_sae, train_sae

PROMPT = "The quick brown fox jumps over the lazy"
LAYER = 3
TOL = dict(atol=2e-5, rtol=1e-5)


def _weights(d_in, d_sae=96, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((d_in, d_sae)).astype(np.float32) * 0.3,
            rng.standard_normal(d_sae).astype(np.float32) * 0.1,
            rng.standard_normal((d_sae, d_in)).astype(np.float32) * 0.3,
            rng.standard_normal(d_in).astype(np.float32) * 0.1)


def _encode(x, W_enc, b_enc, W_dec, b_dec, threshold=None, subtract=True):
    pre = (x - (b_dec if subtract else 0)) @ W_enc + b_enc
    return np.where(pre > (0 if threshold is None else threshold), pre, 0)


@pytest.fixture
def s(client):
    s = client.session(model="tiny-gpt2")
    yield s
    if not client.closed:
        s.close()


@pytest.fixture
def sae(s, tmp_path):
    w = _weights(s.hidden_size)
    path = save_sae(tmp_path / "known", *w, hook_name=f"blocks.{LAYER}.hook_resid_post")
    info = s.load_sae(path)
    assert info == {"name": "known", "layer": LAYER, "site": "resid", "d_in": s.hidden_size,
                    "d_sae": 96, "architecture": "standard",
                    "hook_name": f"blocks.{LAYER}.hook_resid_post", "apply_b_dec_to_input": True}
    return w


def test_features_over_a_prompt_equal_a_hand_computation(s, sae):
    x = s.cache(PROMPT, layers=[LAYER])["resid", LAYER]
    f = _encode(x, *sae)
    got = s.sae_features(PROMPT, sae="known", k=6, features=[0, 5, 95])
    order = np.argsort(-f, axis=1, kind="stable")[:, :6]
    np.testing.assert_allclose(got.values, np.take_along_axis(f, order, 1), **TOL)
    # indices agree wherever the values are not (near) tied
    gaps = np.diff(-np.sort(-f, axis=1)[:, :7], axis=1)
    assert np.all((got.indices == order) | (np.abs(gaps[:, :6]) < 1e-5)
                  | (np.abs(np.roll(gaps, 1, 1)[:, :6]) < 1e-5))
    np.testing.assert_allclose(got.activations, f[:, [0, 5, 95]], **TOL)
    np.testing.assert_array_equal(got.l0, (f > 0).sum(1))
    recon = f @ sae[2] + sae[3]
    np.testing.assert_allclose(got.recon_error, np.linalg.norm(recon - x, axis=1) / np.linalg.norm(x, axis=1),
                               rtol=1e-4)
    assert got.tokens == s.to_str_tokens(PROMPT) and got.positions == list(range(len(got.tokens)))
    assert got.top(-1)[0] == (int(got.indices[-1, 0]), pytest.approx(float(got.values[-1, 0])))


def test_features_at_a_pause_equal_the_paused_activation(s, sae):
    s.breakpoint(LAYER, phase="both", steps=[0, 2])
    ev = s.generate(PROMPT, 4)
    assert ev.paused and ev.step == 0
    x = s.activation()
    got = s.sae_features(sae="known", k=4, features=[7])
    np.testing.assert_allclose(got.activations[:, 0], _encode(x, *sae)[:, 7], **TOL)
    assert got.positions == list(range(x.shape[0])) and got.step == 0
    ev = s.resume()
    assert ev.paused and ev.step == 2
    got = s.sae_features(sae="known", k=4)
    np.testing.assert_allclose(got.values, -np.sort(-_encode(s.activation(), *sae), axis=1)[:, :4], **TOL)
    assert got.positions == [ev.position]
    s.stop()
    s.clear_breakpoints()
    s.breakpoint(LAYER + 1, phase="prefill")
    assert s.generate(PROMPT, 2).paused
    with pytest.raises(dj.InvalidArgumentError, match="reads layer 3"):
        s.sae_features(sae="known")
    s.stop()


def test_steering_by_a_feature_adds_its_decoder_direction(s, sae):
    x = s.cache(PROMPT, layers=[LAYER])["resid", LAYER]
    rule = s.steer(sae="known", feature=7, alpha=2.5)
    assert (rule["layer"], rule["site"], rule["op"], rule["alpha"]) == (LAYER, "resid", "add", 2.5)
    y = s.cache(PROMPT, layers=[LAYER], steering="session")["resid", LAYER]
    np.testing.assert_allclose(y, x + np.float32(2.5) * sae[2][7], atol=1e-6)
    steered = s.generate(PROMPT, 6, return_logits=True)
    s.clear_steering()
    s.steer(LAYER, add=sae[2][7], alpha=2.5)          # the same rule written by hand: bit for bit
    by_hand = s.generate(PROMPT, 6, return_logits=True)
    assert steered.tokens == by_hand.tokens
    np.testing.assert_array_equal(steered.result.logits, by_hand.result.logits)


def test_clamping_a_feature_adds_the_reconstruction_error_back(s, sae):
    x = s.cache(PROMPT, layers=[LAYER])["resid", LAYER]
    f = _encode(x, *sae)
    W_dec, b_dec = sae[2], sae[3]
    s.steer(sae="known", feature=11, clamp=4.0)
    y = s.cache(PROMPT, layers=[LAYER], steering="session")["resid", LAYER]
    clamped = f.copy()
    clamped[:, 11] = 4.0
    want = clamped @ W_dec + b_dec + (x - (f @ W_dec + b_dec))
    np.testing.assert_allclose(y, want, atol=1e-5)
    # = h + (c - f_i) * W_dec[i]: only that direction moves
    np.testing.assert_allclose(y - x, (4.0 - f[:, 11:12]) * W_dec[11], atol=1e-5)
    # the feature now reads c wherever the encoder is linear there (pre > 0 at feature 11)
    after = s.sae_features(PROMPT, sae="known", features=[11], steering="session")
    live = clamped[:, 11] > 0
    assert np.all(after.activations[live, 0] > 0)


def test_expression_ops_encode_and_decode(s, sae):
    h = dj.ops.h
    x = s.cache(PROMPT, layers=[LAYER])["resid", LAYER]
    f = _encode(x, *sae)
    s.steer(LAYER, edit=dj.ops.sae_decode(dj.ops.sae_encode(h, "known"), "known"))   # the splice
    y = s.cache(PROMPT, layers=[LAYER], steering="session")["resid", LAYER]
    np.testing.assert_allclose(y, f @ sae[2] + sae[3], atol=1e-5)
    s.clear_steering()
    # one-shot rule dicts name the SAE too; and the error term alone
    err = h - dj.ops.sae_decode(dj.ops.sae_encode(h, "known"), "known")
    y = s.cache(PROMPT, layers=[LAYER], steering=[{"layer": LAYER, "edit": err}])["resid", LAYER]
    np.testing.assert_allclose(y, x - (f @ sae[2] + sae[3]), atol=1e-5)
    # while paused
    s.breakpoint(LAYER, phase="prefill")
    assert s.generate(PROMPT, 2).paused
    s.edit(edit=dj.ops.sae_decode(dj.ops.sae_encode(h, "known") * 0.0, "known"))
    np.testing.assert_allclose(s.activation(), np.broadcast_to(sae[3], x.shape), atol=1e-6)
    s.stop()


def test_jumprelu_and_no_b_dec_subtraction(s, tmp_path):
    W_enc, b_enc, W_dec, b_dec = _weights(s.hidden_size, 40, seed=3)
    threshold = np.abs(np.random.default_rng(4).standard_normal(40)).astype(np.float32) * 0.3
    path = save_sae(tmp_path / "jump", W_enc, b_enc, W_dec, b_dec, hook_name="blocks.2.hook_mlp_out",
                    threshold=threshold, apply_b_dec_to_input=False)
    info = s.load_sae(path, name="j")
    assert (info["architecture"], info["layer"], info["site"], info["apply_b_dec_to_input"]) == \
        ("jumprelu", 2, "mlp", False)
    x = s.cache(PROMPT, sites="mlp", layers=[2])["mlp", 2]
    want = _encode(x, W_enc, b_enc, W_dec, b_dec, threshold, subtract=False)
    got = s.sae_features(PROMPT, sae="j", k=40)
    np.testing.assert_allclose(np.sort(got.values, 1), np.sort(want, 1), **TOL)
    np.testing.assert_array_equal(got.l0, (want > 0).sum(1))


def test_an_sae_rule_travels_in_a_checkpoint_file(client, server, s, sae, tmp_path):
    """A clamp rule carries the SAE's weights: a fresh connection with no SAE loaded
    continues with the same tokens."""
    s.steer(sae="known", feature=3, clamp=6.0)
    s.breakpoint(LAYER, phase="decode", steps=[2])
    ev = s.generate(PROMPT, 6, stop_at_eos=False)
    assert ev.paused
    ck = s.checkpoint()
    want = s.resume()
    path = ck.save(tmp_path / "sae.djckpt")
    other = dj.connect(server.address)
    try:
        s2 = other.load_checkpoint(path).session
        assert "sae_encode[known]" in s2.info()["steering"][0]["expr"]
        assert s2.resume().paused
        assert s2.resume().tokens == want.tokens
    finally:
        other.close()


def test_trained_sae_on_cached_activations(s, tmp_path):
    """``train_sae`` (numpy, seeded) on activations from ``cache`` lowers its loss; the saved
    SAE's features on the server equal the trained SAE's own encoder."""
    prompts = [f"{a} {b} is here" for a in ("The cat", "A dog", "My friend", "Some bird")
               for b in ("today", "again", "now", "soon")]
    acts = np.concatenate([c["resid", LAYER][1:] for c in s.cache(prompts, layers=[LAYER])])
    trained = train_sae(acts, d_sae=128, steps=200, l1=1e-3, lr=3e-3, seed=0)
    again = train_sae(acts, d_sae=128, steps=200, l1=1e-3, lr=3e-3, seed=0)
    np.testing.assert_array_equal(trained.W_enc, again.W_enc)        # seeded
    assert np.mean(trained.mse[-20:]) < 0.5 * np.mean(trained.mse[:5])
    path = trained.save(tmp_path / "trained", hook_name=f"blocks.{LAYER}.hook_resid_post")
    s.load_sae(path)
    x = s.cache(PROMPT, layers=[LAYER])["resid", LAYER]
    got = s.sae_features(PROMPT, sae="trained", k=3, features=list(range(128)))
    np.testing.assert_allclose(got.activations, trained.encode(x), atol=1e-4)


def _write(path, cfg, tensors):
    from safetensors.numpy import save_file
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return str(path)


def test_bad_saes_and_names_are_typed_errors(s, sae, tmp_path):
    d = s.hidden_size
    W_enc, b_enc, W_dec, b_dec = _weights(d, 16)
    ok = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    cfg = {"hook_name": "blocks.1.hook_resid_post"}
    narrow = _weights(d // 2, 16)
    cases = [
        (lambda: s.load_sae("relative/dir"), dj.InvalidArgumentError, "absolute"),
        (lambda: s.load_sae(str(tmp_path / "missing")), dj.InvalidArgumentError, "no SAE at"),
        (lambda: s.load_sae(str(tmp_path)), dj.InvalidArgumentError, "no SAE at"),
        (lambda: s.load_sae(_write(tmp_path / "narrow", cfg, dict(zip(ok, narrow)))),
         dj.InvalidArgumentError, "width"),
        (lambda: s.load_sae(_write(tmp_path / "shape", cfg, {**ok, "b_dec": b_dec[:-1].copy()})),
         dj.InvalidArgumentError, "b_dec"),
        (lambda: s.load_sae(_write(tmp_path / "nan", cfg, {**ok, "W_dec": W_dec * np.nan})),
         dj.InvalidArgumentError, "NaN"),
        (lambda: s.load_sae(_write(tmp_path / "topk", {**cfg, "architecture": "topk"}, ok)),
         dj.InvalidArgumentError, "architecture"),
        (lambda: s.load_sae(_write(tmp_path / "nohook", {}, ok)), dj.InvalidArgumentError, "hook_name"),
        (lambda: s.load_sae(_write(tmp_path / "nodec", cfg, {"W_enc": W_enc, "b_enc": b_enc})),
         dj.InvalidArgumentError, "W_dec"),
        (lambda: s.load_sae(_write(tmp_path / "pattern", cfg, ok), layer=1, site="attn_pattern"),
         dj.InvalidArgumentError, None),
        (lambda: s.steer(sae="nope", feature=1), dj.InvalidArgumentError, "no SAE named"),
        (lambda: s.steer(sae="known", feature=96), dj.InvalidArgumentError, "feature"),
        (lambda: s.steer(sae="known"), dj.InvalidArgumentError, "feature="),
        (lambda: s.steer(sae="known", feature=1, scale=2.0), dj.InvalidEditError, None),
        (lambda: s.steer(LAYER + 1, sae="known", feature=1), dj.InvalidArgumentError, "reads layer"),
        (lambda: s.steer(LAYER, feature=1, alpha=2.0), dj.InvalidArgumentError, "sae="),
        (lambda: s.steer(LAYER, edit=dj.ops.sae_encode(dj.ops.h, "nope")), dj.InvalidEditError, "no SAE"),
        (lambda: s.steer(LAYER, edit=dj.ops.sae_encode(dj.ops.h, "known")), dj.InvalidEditError, "shape"),
        (lambda: s.sae_features(PROMPT, sae="nope"), dj.InvalidArgumentError, "no SAE"),
        (lambda: s.sae_features(PROMPT, sae="known", features=[1000]), dj.InvalidArgumentError, None),
        (lambda: s.sae_features(sae="known"), dj.NotPausedError, None),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()
    # a hand-made inline node with inconsistent weights is refused before it runs
    bad = {"op": "sae_decode", "sae": "x", "args": [
        {"op": "sae_encode", "sae": "x", "args": [{"op": "h"}, *[{"op": "const", "value": a}
                                                             for a in (W_enc, b_enc, b_dec, b_enc[:3].copy())]]},
        {"op": "const", "value": W_dec}, {"op": "const", "value": b_dec}]}
    with pytest.raises(dj.InvalidEditError, match="threshold"):
        s.client.call("steer", session=s.id, layer=LAYER, edit=bad)
    assert s.info()["steering"] == []
    assert s.generate(PROMPT, 2).finished
    assert s.sae_features(PROMPT, sae="known").values.shape[1] == 10


def test_dashboard_shows_sae_features_when_paused_at_the_saes_site(s, sae):
    pytest.importorskip("plotly", reason="the dashboard needs plotly (the widgets extra)")
    dash = dj.Dashboard(s, prompt=PROMPT, max_new_tokens=4, steer_layer=4, scale=1.0)
    try:
        dash.wait()
        dash.layer_picker.value = (LAYER - 1,)
        dash.bp_steps.value = "2"
        dash.run_steered_button.click()
        dash.wait()
        assert dash.paused is not None and dash.paused.layer == LAYER - 1
        assert dash.sae_view.value == ""                # no SAE reads block 2
        dash.step_button.click()                        # to block 3, where "known" reads
        dash.wait()
        assert dash.last_error is None, dash.message.value
        assert (dash.paused.layer, dash.paused.step) == (LAYER, 2)
        top = _encode(s.activation()[-1], *sae)
        best = int(np.argmax(top))
        assert "SAE known" in dash.sae_view.value and f"#{best}<" in dash.sae_view.value
        assert f"L0 {int((top > 0).sum())}" in dash.sae_view.value
    finally:
        dash.close_sessions()
