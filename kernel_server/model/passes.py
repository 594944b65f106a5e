"""One-shot forward passes on the server: teacher-forced scoring, steering vectors,
activation caches, the logit lens, gradients and attribution patching (the exact patching
sweep is kernel_server.model.patching).

A pass dispatches through the same per-layer hooks as a generation (its ``ForwardPass``
is the hook target of the model's hook registry, kernel_server.runtime.hooks, for the pass), so
its steering rules go through the same ``apply_edit`` as a standing ``steer()`` and agree
with it bit for bit on the same rows.

Many prompts run as padded batches (``pad_batch``: left padding, an attention mask and
position ids counted over the real tokens, as batched generation does); each row's rules,
captures and logits are taken on its own unpadded positions, so a row computes what its
one-prompt pass computes (equal to about 1e-6: batched matrix products round differently).
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from kernel_server.model import sites
from kernel_server.model.interventions import SteeringRule, apply_edit
from djinn_protocol.errors import UnsupportedModelError
from kernel_server.model.registry import LoadedModel


#: tokens (rows x padded width) of one batched forward; longer lists of prompts are cut into
#: several batches (prompts sorted by length first, so little of a batch is padding)
BATCH_TOKENS = 4096
#: full-vocabulary logits kept by one batched scoring forward (rows x kept positions)
SCORE_LOGIT_ROWS = 512


def pad_id(loaded: LoadedModel) -> int:
    """The id put in padding positions (masked out: its value never reaches a real row)."""
    tok = loaded.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_batch(loaded: LoadedModel, prompts: list) -> tuple:
    """(input_ids, attention_mask, position_ids, pads) of ``prompts`` left-padded to one
    width: ``pads[b]`` padding positions, then row b's tokens; its position ids count its
    real tokens from 0, so each row sees what it would alone."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    fill = pad_id(loaded)
    ids = torch.tensor([[fill] * k + list(p) for k, p in zip(pads, prompts)], device=loaded.device)
    mask = torch.tensor([[0] * k + [1] * len(p) for k, p in zip(pads, prompts)],
                        dtype=torch.long, device=loaded.device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), pads


def batches(lengths: list, cost=None, budget: int = BATCH_TOKENS) -> list:
    """Indices of prompts grouped into batches: sorted by length, each batch's
    ``cost(rows, width)`` (default rows x width) within ``budget`` (a batch holds one row at least)."""
    cost = cost or (lambda rows, width: rows * width)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur = [], []
    for i in order:
        if cur and cost(len(cur) + 1, lengths[i]) > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


class PassDone(Exception):
    """Raised by a ``ForwardPass``'s hook once the last block it needs has run (``stop_after``):
    the blocks after it, the final norm and the unembedding are not computed. ``run_batch``
    catches it (and returns no logits)."""


class ForwardPass:
    """The hook target (kernel_server.runtime.hooks.HookTarget) of one forward pass over
    whole sequences (one, or a left-padded batch with ``pads``), in place of a ``GenerationRun``.

    ``rules`` are applied to each row as the decode loop would have applied them had its
    sequence been generated from a prompt of ``prompt_len`` tokens: step 0 (the prefill)
    covers positions ``[0, prompt_len)``, decode step k covers position ``prompt_len + k - 1``
    (a batch row's positions counted from its first real token). ``capture`` names the
    (layer, site) pairs whose (edited) tensor is kept in ``captured[key][row]``, reduced
    over the row's positions by ``reduce`` (None, "last", "mean", "norm"). ``stop_after``: the
    pass ends after that block's output (nothing later is computed, no logits)."""

    def __init__(self, rules=(), prompt_len=1, capture=(), reduce=None, loaded=None, pads=(0,),
                 stop_after=None):
        self.rules = list(rules)
        self.pads = list(pads)
        self.prompt_lens = (list(prompt_len) if isinstance(prompt_len, (list, tuple))
                            else [prompt_len] * len(self.pads))
        self.capture = frozenset(capture)
        self.reduce = reduce
        self.loaded = loaded
        self.captured: dict[tuple, list] = {}
        keys = {(r.layer, r.site) for r in self.rules} | self.capture
        self.stop_after = stop_after
        self.hot_layers = frozenset(layer for layer, _ in keys) | (
            frozenset() if stop_after is None else {stop_after})
        self.hot_sites = frozenset(k for k in keys if k[1] != "resid")

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        new = self._on_site(layer, site, hidden)
        if site == "resid" and layer == self.stop_after:
            raise PassDone
        return new

    def _on_site(self, layer: int, site: str, hidden: torch.Tensor):
        rules = [r for r in self.rules
                 if r.layer == layer and r.site == site and (r.rows is None or 0 in r.rows)]
        new = hidden
        if rules and len(self.pads) == 1 and self.pads[0] == 0:
            for rule in rules:
                new = self._apply_rule(new, rule, self.prompt_lens[0])
        elif rules:                          # each row on its own real positions
            rows = []
            for b, k in enumerate(self.pads):
                h = hidden[b:b + 1, k:]
                for rule in rules:
                    h = self._apply_rule(h, rule, self.prompt_lens[b])
                rows.append(torch.cat([hidden[b:b + 1, :k], h], dim=1) if k else h)
            new = torch.cat(rows)
        if (layer, site) in self.capture:
            self.captured[(layer, site)] = [self._reduced(new[b, k:], site)
                                            for b, k in enumerate(self.pads)]
        return None if new is hidden else new

    def _reduced(self, h: torch.Tensor, site: str) -> torch.Tensor:
        """One row's tensor [positions, width] reduced as asked."""
        if site == "heads":
            h = h.reshape(h.shape[0], *sites.head_geometry(self.loaded))
        if self.reduce == "last":
            return h[-1]
        if self.reduce == "mean":
            return h.float().mean(dim=0)
        if self.reduce == "norm":
            return h.float().norm(dim=-1)
        return h

    @staticmethod
    def _apply_rule(hidden: torch.Tensor, rule: SteeringRule, prompt_len: int) -> torch.Tensor:
        n, p = hidden.shape[1], min(prompt_len, hidden.shape[1])
        parts = []
        if rule.matches(rule.layer, 0, "prefill"):
            parts.append(apply_edit(hidden[:, :p], rule.op, 0))
        else:
            parts.append(hidden[:, :p])
        cursor = p
        # decode rows, grouped in runs of consecutive steps the rule matches (or not)
        while cursor < n:
            step = cursor - prompt_len + 1
            hit = rule.matches(rule.layer, step, "decode")
            end = cursor + 1
            while end < n and rule.matches(rule.layer, end - prompt_len + 1, "decode") == hit:
                end += 1
            chunk = hidden[:, cursor:end]
            if hit:
                op = rule.op
                if op.positions == "last":   # every decode step's one row is its last
                    op = dataclasses.replace(op, positions="all")
                chunk = apply_edit(chunk, op, cursor)
            parts.append(chunk)
            cursor = end
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def run_batch(loaded: LoadedModel, prompts: list, fp, logits_to_keep: int = 1,
              lock: bool = True, grad: bool = False) -> torch.Tensor:
    """One forward pass over ``prompts`` (token id lists; several are left-padded into one
    batch) with the hook target ``fp`` dispatched by the layer hooks (a ``ForwardPass`` gets
    the batch's ``pads``); the logits of the last ``logits_to_keep`` padded positions,
    float32 [rows, positions, vocab] (None when ``fp`` ended the pass early, ``stop_after``).
    ``lock=False``: the caller holds the compute lock.
    ``grad``: run with autograd on (the caller takes gradients), else in inference mode."""
    width = max(len(p) for p in prompts)
    loaded.check_context(width, f"a pass over {width} tokens")
    loaded.hooks.install_layers()
    if len(prompts) == 1:        # exactly the one-prompt pass: no mask, no position ids
        kwargs = {"input_ids": torch.tensor([list(prompts[0])], device=loaded.device)}
        pads = [0]
    else:
        ids, mask, positions, pads = pad_batch(loaded, prompts)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    if isinstance(fp, ForwardPass):
        fp.pads = pads
    mode = torch.enable_grad() if grad else torch.inference_mode()
    with mode, (loaded.compute_lock if lock else contextlib.nullcontext()):
        try:
            with loaded.hooks.active(fp):
                out = loaded.model(use_cache=False, logits_to_keep=logits_to_keep, **kwargs)
        except PassDone:
            return None
        return out.logits.float()


def run_pass(loaded: LoadedModel, ids: list[int], fp, logits_to_keep: int = 1,
             lock: bool = True):
    """``run_batch`` of one prompt: its logits [positions, vocab]."""
    return run_batch(loaded, [ids], fp, logits_to_keep, lock)[0]


def score(loaded: LoadedModel, ids: list[int], start: int, rules, compare: bool, top_k: int,
          return_logits: bool) -> dict:
    """Per-position log-probs of ``ids[start:]`` under ``rules`` (teacher-forced, one pass),
    and against an unsteered pass when ``compare``: KL(unsteered || steered), total
    variation, top-1 agreement, relative logit change (computed here; only these
    per-position numbers cross the wire unless ``return_logits``)."""
    return score_many(loaded, [ids], [start], rules, compare, top_k, return_logits)[0]


def score_many(loaded: LoadedModel, seqs: list, starts: list, rules, compare: bool, top_k: int,
               return_logits: bool) -> list:
    """``score`` of every sequence, in padded batches; one dict per sequence, in order."""
    keeps = [len(s) - st + 1 for s, st in zip(seqs, starts)]
    out = [None] * len(seqs)
    group_cost = lambda rows, width: rows * width              # noqa: E731
    for group in batches([len(s) for s in seqs], group_cost):
        # and within a group, the kept logits bounded too (rows x kept positions x vocab)
        for sub in batches([keeps[i] for i in group], budget=SCORE_LOGIT_ROWS):
            idx = [group[j] for j in sub]
            rows = [seqs[i] for i in idx]
            keep = max(keeps[i] for i in idx)
            lens = [starts[i] for i in idx]
            steered = run_batch(loaded, rows, ForwardPass(rules, prompt_len=lens), keep)
            base = (run_batch(loaded, rows, ForwardPass((), prompt_len=lens), keep)
                    if compare else None)
            for b, i in enumerate(idx):
                k = keeps[i]
                out[i] = _score_row(seqs[i], starts[i], steered[b, -k:][:-1],
                                    None if base is None else base[b, -k:][:-1], top_k, return_logits)
    return out


def _score_row(ids, start, logits, base, top_k, return_logits) -> dict:
    target = torch.tensor(ids[start:], device=logits.device)
    logp = torch.log_softmax(logits.double(), dim=-1)
    probs, top = logp.exp().topk(min(top_k, logp.shape[-1]), dim=-1)
    out = {"start": start, "tokens": list(ids),
           "token_logprobs": logp.gather(-1, target[:, None])[:, 0].cpu().numpy(),
           "top_ids": top.cpu().numpy().astype(np.int64), "top_probs": probs.float().cpu().numpy()}
    if base is not None:
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


def layer_outputs(loaded: LoadedModel, prompts: list, layer: int, reduce: str) -> torch.Tensor:
    """Block ``layer``'s output for each prompt, reduced over its positions ("last" or
    "mean"): float32 [prompts, hidden], in padded batches."""
    out = [None] * len(prompts)
    for idx in batches([len(p) for p in prompts]):
        fp = ForwardPass(capture=[(layer, "resid")], reduce=reduce, loaded=loaded, stop_after=layer)
        run_batch(loaded, [prompts[i] for i in idx], fp)
        for i, t in zip(idx, fp.captured[(layer, "resid")]):
            out[i] = t.float()
    return torch.stack(out)


def steering_vector(loaded: LoadedModel, positive: list, negative: list, layer: int,
                    reduce: str) -> np.ndarray:
    """mean(layer output over ``positive``) - mean(over ``negative``), float32 [hidden];
    all prompts of both sides in one padded batch (or a few, for many long prompts)."""
    acts = layer_outputs(loaded, list(positive) + list(negative), layer, reduce)
    pos, neg = acts[:len(positive)].mean(0), acts[len(positive):].mean(0)
    return (pos - neg).cpu().numpy().astype(np.float32)


# ---- activation cache, logit lens, patching ------------------------------------------
def cache(loaded: LoadedModel, ids: list[int], keys: list, reduce, rules=()) -> dict:
    """One pass over ``ids``; the tensors of every (layer, site) in ``keys``, reduced on the
    server, as float32 numpy arrays: ``{site: {layer: array}}`` (module sites: layer -1).
    ``attn_pattern`` runs the pass with the eager attention implementation (the fused
    kernels never form the probabilities); its arrays are [heads, query, key]."""
    return cache_many(loaded, [ids], keys, reduce, rules)[0]


def cache_many(loaded: LoadedModel, prompts: list, keys: list, reduce, rules=()) -> list:
    """``cache`` of every prompt, in padded batches: one dict per prompt, in order."""
    out = [None] * len(prompts)
    for idx in batches([len(p) for p in prompts]):
        for i, d in zip(idx, _cache_batch(loaded, [prompts[i] for i in idx], keys, reduce, rules)):
            out[i] = d
    return out


def _cache_batch(loaded: LoadedModel, prompts: list, keys: list, reduce, rules) -> list:
    patterns = sorted(layer for layer, site in keys if site == "attn_pattern")
    # nothing after the last block read is computed (a module site outside the blocks,
    # layer -1, may be the final norm: then the whole model runs)
    last = None if any(layer < 0 for layer, _ in keys) else max(layer for layer, _ in keys)
    fp = ForwardPass(rules, prompt_len=[len(p) for p in prompts],
                     capture=[k for k in keys if k[1] != "attn_pattern"], reduce=reduce, loaded=loaded,
                     stop_after=last)
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
                run_batch(loaded, prompts, fp, lock=False)
            finally:
                if switch:
                    _set_attention(loaded, previous)
    finally:
        for h in handles:
            h.remove()
    results = [{} for _ in prompts]
    for (layer, site), per_row in fp.captured.items():
        for b, t in enumerate(per_row):
            results[b].setdefault(site, {})[str(layer)] = t.float().cpu().numpy()
    for layer in patterns:
        w = got.get(layer)
        if w is None:
            raise UnsupportedModelError(f"{type(loaded.model).__name__} gave no attention "
                                        "probabilities even with eager attention")
        for b, k in enumerate(fp.pads):
            wb = w[b, :, k:, k:].float()
            if reduce == "last":
                wb = wb[:, -1]
            elif reduce == "mean":
                wb = wb.mean(dim=0)
            elif reduce == "norm":
                wb = wb.norm(dim=-1)
            results[b].setdefault("attn_pattern", {})[str(layer)] = wb.cpu().numpy()
    return results


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
    return lens_many(loaded, [ids], layers, k, target)[0]


def lens_many(loaded: LoadedModel, prompts: list, layers: list[int], k: int,
              target: int | None) -> list:
    """``lens_layers`` of every prompt, in padded batches: one dict per prompt, in order."""
    out = [None] * len(prompts)
    for idx in batches([len(p) for p in prompts]):
        fp = ForwardPass(capture=[(layer, "resid") for layer in layers], reduce="last", loaded=loaded)
        finals = run_batch(loaded, [prompts[i] for i in idx], fp)[:, -1]
        for b, i in enumerate(idx):
            rows = torch.stack([fp.captured[(layer, "resid")][b] for layer in layers])
            d = lens_topk(loaded, rows, k)
            d["layers"] = list(layers)
            with torch.inference_mode():
                model_probs = torch.softmax(finals[b], dim=-1)
                if target is not None:
                    lens_probs = torch.softmax(sites.unembed(loaded, rows), dim=-1)
                    d["target"] = target
                    d["target_probs"] = lens_probs[:, target].cpu().numpy()
                    d["model_target_prob"] = float(model_probs[target])
                d["model_top_id"] = int(model_probs.argmax())
            out[i] = d
    return out


# ---- gradients -----------------------------------------------------------------------
#: bytes a gradient pass may hold for its backward (estimated before any compute)
GRAD_BYTES = 2 * 2**30


class GradPass:
    """The hook target of a forward pass that keeps a zero tensor added at each captured
    (layer, site): d(metric)/d(that zero) is d(metric)/d(the activation), and the gradient
    flows through every later site (no activation is detached)."""

    def __init__(self, keys: list):
        self.keys = frozenset(keys)
        self.zeros: dict[tuple, torch.Tensor] = {}
        self.values: dict[tuple, torch.Tensor] = {}
        self.hot_layers = frozenset(layer for layer, _ in keys)
        self.hot_sites = frozenset(k for k in keys if k[1] != "resid")

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        if (layer, site) not in self.keys:
            return None
        zero = torch.zeros_like(hidden, requires_grad=True)
        self.zeros[(layer, site)] = zero
        self.values[(layer, site)] = hidden.detach()
        return hidden + zero


def grad_bytes(loaded: LoadedModel, n: int) -> int:
    """An upper estimate of what a backward over ``n`` positions holds: per layer and
    position about 32 hidden-sized float32 tensors (attention, MLP, norms) plus the
    attention probabilities, and the float32 logits of every position."""
    cfg = loaded.model.config
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1))
    inter = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
                or 4 * loaded.hidden_size)
    per_layer = n * (32 * loaded.hidden_size + 4 * inter + 2 * heads * n) * 4
    return loaded.num_layers * per_layer + 3 * n * loaded.vocab_size * 4


def metric_value(logits: torch.Tensor, ids: list[int], metric: dict) -> torch.Tensor:
    """The scalar metric of one row's logits [positions, vocab] (all positions kept):
    ``logit_diff`` logit[a] - logit[b] at the last position, ``logprob`` log p(target) at
    the last position, ``loss`` the mean next-token cross-entropy of ``ids[start:]``."""
    kind = metric["kind"]
    if kind == "logit_diff":
        a, b = metric["answer"]
        return logits[-1, a] - logits[-1, b]
    if kind == "logprob":
        return torch.log_softmax(logits[-1], dim=-1)[metric["target"]]
    start = metric["start"]
    target = torch.tensor(ids[start:], device=logits.device)
    return torch.nn.functional.cross_entropy(logits[start - 1:-1], target)


def grad(loaded: LoadedModel, ids: list[int], keys: list, metric: dict, reduce,
         with_values: bool = False) -> dict:
    """d(metric)/d(activation) at every (layer, site) of ``keys`` for the prompt ``ids``:
    one forward with autograd (no KV cache) and one ``torch.autograd.grad`` under the
    model's compute lock; the model's weights collect no gradients. Reduced as ``cache``
    reduces (None, "last", "mean", "norm"); ``{"grads": {site: {layer: array}},
    "metric": value}`` (and the activations themselves, unreduced, with ``with_values``)."""
    gp = GradPass(keys)
    with loaded.compute_lock:
        keep = 0 if metric["kind"] == "loss" else 1          # 0: every position
        logits = run_batch(loaded, [ids], gp, logits_to_keep=keep, lock=False, grad=True)[0]
        with torch.enable_grad():
            value = metric_value(logits, ids, metric)
            order = [k for k in keys if k in gp.zeros]
            got = torch.autograd.grad(value, [gp.zeros[k] for k in order], allow_unused=True)
    fp = ForwardPass(reduce=reduce, loaded=loaded)
    out: dict = {"grads": {}, "metric": float(value.detach())}
    for key, g in zip(order, got):
        g = torch.zeros_like(gp.zeros[key]) if g is None else g
        out["grads"].setdefault(key[1], {})[str(key[0])] = \
            fp._reduced(g[0].detach(), key[1]).float().cpu().numpy()
    if with_values:
        out["values"] = {k: gp.values[k][0] for k in order}
        out["raw"] = {k: g[0].detach() for k, g in zip(order, got)}
    return out


def attribution_patch(loaded: LoadedModel, clean: list[int], corrupted: list[int], site: str,
                      layers: list[int], answer: tuple[int, int]) -> dict:
    """Attribution patching: the first-order estimate of every (layer, position) cell of the
    patching grid, ``corrupted metric + (clean act - corrupted act) . d(metric)/d(act)`` at
    the corrupted run (one clean forward, one corrupted forward + backward); the same shape
    as ``patch_cells`` (every position)."""
    keys = [(layer, site) for layer in layers]
    fp = ForwardPass(capture=keys, loaded=loaded)
    logits = run_batch(loaded, [clean], fp)[0, -1]
    clean_metric = float(logits[answer[0]] - logits[answer[1]])
    g = grad(loaded, corrupted, keys, {"kind": "logit_diff", "answer": answer}, None, with_values=True)
    rows = []
    for key in keys:
        delta = fp.captured[key][0].float() - g["values"][key].float()        # [n, width]
        rows.append((g["metric"] + (delta * g["raw"][key].float()).sum(-1)).tolist())
    return {"layers": list(layers), "site": site, "positions": list(range(len(corrupted))),
            "metric": rows, "clean": clean_metric, "corrupted": g["metric"]}
