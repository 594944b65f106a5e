"""Gradients through the server (``s.grad``) and attribution patching, against
torch.autograd on the same Hugging Face model run in-process with plain forward hooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import djinn_nb as dj

PROMPT = "The cat sat on the mat because it"
CLEAN, CORRUPTED = "The cat sat on the mat", "The dog sat on the mat"


@pytest.fixture(scope="module")
def hf():
    """The server's tiny-gpt2 (seeded random init) loaded again in this process: a plain HF model."""
    from kernel_server.model.registry import load_model
    return load_model("tiny-gpt2", device="cpu")


def _autograd(hf, ids, metric, layers):
    """d(metric)/d(block output) by torch.autograd with plain forward hooks."""
    model, blocks, kept = hf.model, hf.layers, {}

    def hook(layer):
        def fn(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h.retain_grad()
            kept[layer] = h
        return fn
    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        with torch.enable_grad():
            x = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_()
            logits = model(inputs_embeds=x, use_cache=False).logits[0].float()
            metric(logits).backward()
    finally:
        for h in handles:
            h.remove()
    return {layer: kept[layer].grad[0].numpy() for layer in layers}


@pytest.mark.parametrize("metric", ["logit_diff", "logprob", "loss"])
def test_grad_equals_torch_autograd_on_hf_model(client, hf, metric):
    s = client.session(model="tiny-gpt2")
    ids = s.tokenize(PROMPT)
    layers = [0, 2, 5]
    kw = {"logit_diff": dict(answer=[5, 7]), "logprob": dict(target=11), "loss": dict(start=2)}[metric]
    fn = {"logit_diff": lambda z: z[-1, 5] - z[-1, 7],
          "logprob": lambda z: torch.log_softmax(z[-1], -1)[11],
          "loss": lambda z: torch.nn.functional.cross_entropy(z[1:-1], torch.tensor(ids[2:]))}[metric]
    want = _autograd(hf, ids, fn, layers)
    got = s.grad(PROMPT, metric, layers=layers, **kw)
    for layer in layers:
        np.testing.assert_allclose(got["resid", layer], want[layer], atol=1e-5, rtol=1e-4)
        assert np.abs(want[layer]).max() > 0
    last = s.grad(PROMPT, metric, layers=layers, reduce="last", **kw)
    np.testing.assert_allclose(last["blocks.2.hook_resid_post"], want[2][-1], atol=1e-5, rtol=1e-4)
    # sub-block sites: the gradient at attn/mlp/heads is the same backward read elsewhere
    sub = s.grad(PROMPT, metric, layers=[3], sites=["attn", "mlp", "heads"], **kw)
    assert sub["heads", 3].shape == (len(ids), 4, 16) and sub["attn", 3].shape == (len(ids), 64)
    s.close()


def test_attribution_patch_is_the_first_order_estimate(client, hf):
    s = client.session(model="tiny-gpt2")
    answer = [5, 7]
    est = s.attribution_patch(CLEAN, CORRUPTED, answer)
    exact = s.patch(CLEAN, CORRUPTED, answer, progress=False)
    assert est.metric.shape == exact.metric.shape
    assert est.clean == pytest.approx(exact.clean, abs=1e-5)
    assert est.corrupted == pytest.approx(exact.corrupted, abs=1e-5)
    # hand computation: corrupted + (clean - corrupted act) . grad at the corrupted run
    g = s.grad(CORRUPTED, answer=answer)
    a_clean, a_bad = s.cache(CLEAN), s.cache(CORRUPTED)
    for layer in est.layers:
        want = est.corrupted + ((a_clean["resid", layer] - a_bad["resid", layer])
                                * g["resid", layer]).sum(-1)
        np.testing.assert_allclose(est.metric[layer], want, atol=1e-4)
    corr = np.corrcoef(est.metric.ravel(), exact.metric.ravel())[0, 1]
    assert corr > 0.5, corr
    s.close()


def test_grad_bad_input_and_memory_limit(client):
    s = client.session(model="tiny-gpt2")
    with pytest.raises(dj.InvalidArgumentError):
        s.grad(PROMPT, "logit_diff")                   # no answer
    with pytest.raises(dj.InvalidArgumentError):
        s.grad(PROMPT, "entropy", answer=[1, 2])
    with pytest.raises(dj.InvalidArgumentError):
        s.grad(PROMPT, "logprob", target=3, sites=["attn_pattern"])
    with pytest.raises(dj.LimitExceededError):
        s.grad([5] * 1024 * 7, "logprob", target=3)   # the backward estimate is over 2 GiB
    assert s.grad(PROMPT, "logprob", target=3, layers=1).metric < 0     # still usable
    s.close()
