"""One-shot forward passes on the server: teacher-forced scoring and steering vectors.

A pass dispatches through the same per-layer hooks as a generation (its ``ForwardPass``
is the hook target of the model's hook registry, kernel_server.runtime.hooks, for the pass), so
its steering rules go through the same ``apply_edit`` as a standing ``steer()`` and agree
with it bit for bit on the same rows.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from kernel_server.model import sites
from kernel_server.model.interventions import SteeringRule, apply_edit
from djinn_protocol.errors import UnsupportedModelError
from kernel_server.model.registry import LoadedModel


class ForwardPass:
    """The hook target (kernel_server.runtime.hooks.HookTarget) of one forward pass over a whole
    sequence, in place of a ``GenerationRun``.

    ``rules`` are applied as the decode loop would have applied them had the sequence
    been generated from a prompt of ``prompt_len`` tokens: step 0 (the prefill) covers
    positions ``[0, prompt_len)``, decode step k covers position ``prompt_len + k - 1``.
    ``capture`` names the (layer, site) pairs whose (edited) tensor is kept in
    ``captured``, reduced over positions by ``reduce`` (None, "last", "mean", "norm")."""

    def __init__(self, rules=(), prompt_len: int = 1, capture=(), reduce=None, loaded=None):
        self.rules = list(rules)
        self.prompt_len = prompt_len
        self.capture = frozenset(capture)
        self.reduce = reduce
        self.loaded = loaded
        self.captured: dict[tuple, torch.Tensor] = {}
        keys = {(r.layer, r.site) for r in self.rules} | self.capture
        self.hot_layers = frozenset(layer for layer, _ in keys)
        self.hot_sites = frozenset(k for k in keys if k[1] != "resid")

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        new = hidden
        for rule in self.rules:
            if rule.layer == layer and rule.site == site and (rule.rows is None or 0 in rule.rows):
                new = self._apply_rule(new, rule)
        if (layer, site) in self.capture:
            self.captured[(layer, site)] = self._reduced(new, site)
        return None if new is hidden else new

    def _reduced(self, h: torch.Tensor, site: str) -> torch.Tensor:
        h = h[0] if h.dim() >= 3 else h
        if site == "heads":
            h = h.reshape(h.shape[0], *sites.head_geometry(self.loaded))
        if self.reduce == "last":
            return h[-1]
        if self.reduce == "mean":
            return h.float().mean(dim=0)
        if self.reduce == "norm":
            return h.float().norm(dim=-1)
        return h

    def _apply_rule(self, hidden: torch.Tensor, rule: SteeringRule) -> torch.Tensor:
        n, p = hidden.shape[1], min(self.prompt_len, hidden.shape[1])
        parts, cursor = [], 0
        if rule.matches(rule.layer, 0, "prefill"):
            parts.append(apply_edit(hidden[:, :p], rule.op, 0))
        else:
            parts.append(hidden[:, :p])
        cursor = p
        # decode rows, grouped in runs of consecutive steps the rule matches (or not)
        while cursor < n:
            step = cursor - self.prompt_len + 1
            hit = rule.matches(rule.layer, step, "decode")
            end = cursor + 1
            while end < n and rule.matches(rule.layer, end - self.prompt_len + 1, "decode") == hit:
                end += 1
            chunk = hidden[:, cursor:end]
            if hit:
                op = rule.op
                if op.positions == "last":   # every decode step's one row is its last
                    from dataclasses import replace
                    op = replace(op, positions="all")
                chunk = apply_edit(chunk, op, cursor)
            parts.append(chunk)
            cursor = end
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def run_pass(loaded: LoadedModel, ids: list[int], fp: ForwardPass, logits_to_keep: int = 1,
             lock: bool = True):
    """One forward pass over ``ids`` with ``fp`` dispatched by the layer hooks; the logits
    of the last ``logits_to_keep`` positions, float32, [positions, vocab]. ``lock=False``:
    the caller holds the model's compute lock."""
    loaded.check_context(len(ids), f"a pass over {len(ids)} tokens")
    loaded.hooks.install_layers()
    x = torch.tensor([ids], device=loaded.device)
    with torch.inference_mode(), (loaded.compute_lock if lock else contextlib.nullcontext()):
        with loaded.hooks.active(fp):
            out = loaded.model(input_ids=x, use_cache=False, logits_to_keep=logits_to_keep)
        return out.logits[0].float()


def score(loaded: LoadedModel, ids: list[int], start: int, rules, compare: bool, top_k: int,
          return_logits: bool) -> dict:
    """Per-position log-probs of ``ids[start:]`` under ``rules`` (teacher-forced, one pass),
    and against an unsteered pass when ``compare``: KL(unsteered || steered), total
    variation, top-1 agreement, relative logit change (computed here; only these
    per-position numbers cross the wire unless ``return_logits``)."""
    keep = len(ids) - start + 1
    logits = run_pass(loaded, ids, ForwardPass(rules, prompt_len=start), keep)[:-1]
    target = torch.tensor(ids[start:], device=logits.device)
    logp = torch.log_softmax(logits.double(), dim=-1)
    probs, top = logp.exp().topk(min(top_k, logp.shape[-1]), dim=-1)
    out = {"start": start, "tokens": list(ids),
           "token_logprobs": logp.gather(-1, target[:, None])[:, 0].cpu().numpy(),
           "top_ids": top.cpu().numpy().astype(np.int64), "top_probs": probs.float().cpu().numpy()}
    if compare:
        base = run_pass(loaded, ids, ForwardPass((), prompt_len=start), keep)[:-1]
        base_logp = torch.log_softmax(base.double(), dim=-1)
        p = base_logp.exp()
        out["kl"] = (p * (base_logp - logp)).sum(-1).clamp_min(0).cpu().numpy()
        out["tv"] = (0.5 * (p - logp.exp()).abs().sum(-1)).cpu().numpy()
        out["top1_agree"] = (base.argmax(-1) == logits.argmax(-1)).cpu().numpy()
        norm = base.double().norm(dim=-1)
        out["rel_logit_change"] = ((logits.double() - base.double()).norm(dim=-1)
                                   / torch.where(norm > 0, norm, torch.ones_like(norm))).cpu().numpy()
        out["baseline_token_logprobs"] = base_logp.gather(-1, target[:, None])[:, 0].cpu().numpy()
    if return_logits:
        out["logits"] = logits.cpu().numpy()
    return out


def layer_output(loaded: LoadedModel, ids: list[int], layer: int, reduce: str) -> torch.Tensor:
    """Block ``layer``'s output for ``ids``, reduced over positions ("last" or "mean")."""
    fp = ForwardPass(capture=[(layer, "resid")], reduce=reduce, loaded=loaded)
    run_pass(loaded, ids, fp)
    return fp.captured[(layer, "resid")].float()


def steering_vector(loaded: LoadedModel, positive: list, negative: list, layer: int,
                    reduce: str) -> np.ndarray:
    """mean(layer output over ``positive``) - mean(over ``negative``), float32 [hidden]."""
    pos = torch.stack([layer_output(loaded, ids, layer, reduce) for ids in positive]).mean(0)
    neg = torch.stack([layer_output(loaded, ids, layer, reduce) for ids in negative]).mean(0)
    return (pos - neg).cpu().numpy().astype(np.float32)


# ---- activation cache, logit lens, patching ------------------------------------------
def cache(loaded: LoadedModel, ids: list[int], keys: list, reduce, rules=()) -> dict:
    """One pass over ``ids``; the tensors of every (layer, site) in ``keys``, reduced on the
    server, as float32 numpy arrays: ``{site: {layer: array}}`` (module sites: layer -1).
    ``attn_pattern`` runs the pass with the eager attention implementation (the fused
    kernels never form the probabilities); its arrays are [heads, query, key]."""
    patterns = sorted(layer for layer, site in keys if site == "attn_pattern")
    fp = ForwardPass(rules, prompt_len=len(ids),
                     capture=[k for k in keys if k[1] != "attn_pattern"], reduce=reduce, loaded=loaded)
    got, handles = {}, []
    for layer in patterns:
        module = sites.resolve(loaded, layer, "attn_pattern").module
        handles.append(module.register_forward_hook(
            lambda mod, args, out, layer=layer: got.__setitem__(layer, out[1])))
    previous = loaded.model.config._attn_implementation
    switch = bool(patterns) and previous != "eager"
    # the switch and the pass hold the compute lock together: no other session ever
    # computes with the eager attention (its numbers would differ in the last bits)
    try:
        with loaded.compute_lock:
            try:
                if switch:
                    _set_attention(loaded, "eager")
                run_pass(loaded, ids, fp, lock=False)
            finally:
                if switch:
                    _set_attention(loaded, previous)
    finally:
        for h in handles:
            h.remove()
    out: dict = {}
    for (layer, site), t in fp.captured.items():
        out.setdefault(site, {})[str(layer)] = t.float().cpu().numpy()
    for layer in patterns:
        w = got.get(layer)
        if w is None:
            raise UnsupportedModelError(f"{type(loaded.model).__name__} gave no attention "
                                        "probabilities even with eager attention")
        w = w[0].float()
        if reduce == "last":
            w = w[:, -1]
        elif reduce == "mean":
            w = w.mean(dim=0)
        elif reduce == "norm":
            w = w.norm(dim=-1)
        out.setdefault("attn_pattern", {})[str(layer)] = w.cpu().numpy()
    return out


def _set_attention(loaded: LoadedModel, impl: str) -> None:
    setter = getattr(loaded.model, "set_attn_implementation", None)
    if setter is None:
        raise UnsupportedModelError("this transformers version cannot switch the attention "
                                    "implementation at run time; attention patterns are unavailable")
    setter(impl)


def lens_topk(loaded: LoadedModel, rows: torch.Tensor, k: int) -> dict:
    """Logit lens of hidden rows [n, hidden]: top-k ids, probabilities and token texts."""
    with torch.inference_mode():
        probs = torch.softmax(sites.unembed(loaded, rows), dim=-1)
        p, i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    ids = i.cpu().numpy().astype(np.int64)
    tok = loaded.tokenizer
    return {"top_ids": ids, "top_probs": p.cpu().numpy(),
            "top_tokens": [[tok.decode([int(t)]) for t in row] for row in ids]}


def lens_layers(loaded: LoadedModel, ids: list[int], layers: list[int], k: int,
                target: int | None) -> dict:
    """Logit lens of the last position after each of ``layers`` in one pass (plus the
    probability of ``target`` at each layer when given)."""
    fp = ForwardPass(capture=[(layer, "resid") for layer in layers], reduce="last", loaded=loaded)
    final = run_pass(loaded, ids, fp)[-1]
    rows = torch.stack([fp.captured[(layer, "resid")] for layer in layers])
    out = lens_topk(loaded, rows, k)
    out["layers"] = list(layers)
    with torch.inference_mode():
        model_probs = torch.softmax(final, dim=-1)
        if target is not None:
            lens_probs = torch.softmax(sites.unembed(loaded, rows), dim=-1)
            out["target"] = target
            out["target_probs"] = lens_probs[:, target].cpu().numpy()
            out["model_target_prob"] = float(model_probs[target])
        out["model_top_id"] = int(model_probs.argmax())
    return out


def patch_row(loaded: LoadedModel, clean: list[int], corrupted: list[int], layer: int, site: str,
              positions: list[int], answer: tuple[int, int], head=None) -> dict:
    """Activation patching at (``layer``, ``site``): for each position p, run ``corrupted``
    with the clean run's activation set at p; the metric is the logit difference
    ``logit[answer[0]] - logit[answer[1]]`` at the last position. Also the clean and
    corrupted metrics (no patch)."""
    from dataclasses import replace
    from kernel_server.model.interventions import EditOp

    def metric(logits):
        return float(logits[-1, answer[0]] - logits[-1, answer[1]])

    fp = ForwardPass(capture=[(layer, site)], loaded=loaded)
    clean_metric = metric(run_pass(loaded, clean, fp))
    act = fp.captured[(layer, site)]              # [n, width] ([n, heads, head_dim] for heads)
    corrupted_metric = metric(run_pass(loaded, corrupted, ForwardPass()))
    row = []
    for p in positions:
        vec = act[p]
        op = EditOp("set", vector=vec.reshape(1, -1) if head is None else vec[head].reshape(1, -1),
                    positions=(p,))
        if head is not None:
            op = replace(op, head=head, head_dim=int(act.shape[-1]))
        rule = SteeringRule(layer=layer, op=op, site=site)
        row.append(metric(run_pass(loaded, corrupted, ForwardPass([rule], prompt_len=len(corrupted)))))
    return {"layer": layer, "site": site, "positions": list(positions), "metric": row,
            "clean": clean_metric, "corrupted": corrupted_metric}
