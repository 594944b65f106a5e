"""Batched generation: several prompts in one decode loop, left-padded, with attention
masks and position ids, so each row computes what it would alone (greedy rows give the
same tokens as single runs; tests check it token for token).

Breakpoints pause the whole batch (the forward pass is shared); the paused tensor is
[rows, positions, width] in padded coordinates. Steering rules act on every row, or on
the rows a rule names (``steer(..., rows=[...])``). Rules with explicit positions are
refused for batches: positions differ per row once prompts are padded.

With the model's decode scheduler on (kernel_server/runtime/scheduler.py) and no
breakpoint set, the rows ride the engine instead: each row is prefilled alone (no
padding: the bits of its solo prefill), then decodes as a row of the model's batched step
beside every other session, with its own rules; so each row's tokens and logits are
bit-identical to the same prompt generated alone on the engine.

Sampling: row b draws from its own generator, seeded ``row_seed(seed, b)`` (the row's
``result["seed"]``), so a sampled row is a solo run with that seed and owns its RNG state.

Checkpoints: a checkpoint holds one sequence, so a batch call is checkpointed a row at a
time (``row_checkpoint``): the row's unpadded prompt and tokens, records, logits, RNG state,
the rules that act on it and its keys and values. On the engine those are the row's own
run's cache (its solo bits: a restore continues bit for bit); off the engine, the row's
positions cut out of the padded cache (computed beside padding: a restore continues as a
solo run from those keys and values, equal to the padded row's continuation to rounding).
"""
from __future__ import annotations

import time

import torch

from dataclasses import replace

from djinn_protocol.errors import InvalidArgumentError
from kernel_server.runtime import scheduler, throughput
from kernel_server.runtime.generation import GenerationRun, GenState, _eos_ids
from kernel_server.model.interventions import Interventions
from kernel_server.model.registry import LoadedModel


class BatchRun(GenerationRun):
    """One batched generation. ``tokens`` (inherited) is the padded length, so the hooks'
    ``start`` arithmetic holds in padded coordinates; rows live in ``row_tokens``."""

    def __init__(self, loaded: LoadedModel, prompts: list, config, interventions):
        check_rules(interventions)
        width = max(len(p) for p in prompts)
        pad = _pad_id(loaded)
        padded = [[pad] * (width - len(p)) + list(p) for p in prompts]
        super().__init__(loaded, GenState.fresh(padded[0], config), interventions)
        self.rows = len(prompts)
        self.row_prompts = [list(p) for p in prompts]
        self.row_tokens = [[] for _ in prompts]
        self.row_records = [[] for _ in prompts]
        self.row_logits = [[] for _ in prompts]
        self.row_done = [False] * len(prompts)
        self.row_stop = [None] * len(prompts)
        self._padded = padded
        self._mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]

    def boundary_state(self):
        from djinn_protocol.errors import CheckpointError
        # A checkpoint (and its file format) is one sequence: one token list, one KV cache,
        # one RNG state, restored into one session; a restore could not say which row goes on.
        raise CheckpointError(
            f"a checkpoint holds one sequence and this session's generate() made {self.rows}: "
            f"checkpoint one row with checkpoint(row=b) (b in 0..{self.rows - 1}), or every "
            "row with checkpoint(row='all'), a list of one-sequence checkpoints")

    def row_checkpoint(self, b: int, interventions: Interventions):
        """Row ``b`` at the current token boundary as one sequence: (GenState, KV cache,
        Interventions) for ``CheckpointStore.take``. The breakpoints (they act on every row)
        and the rules that act on row ``b``, as a solo session would have them."""
        from djinn_protocol.errors import CheckpointError
        runs = getattr(self, "_runs", None)
        if runs is None:
            raise CheckpointError("this batch call has not started decoding; nothing to checkpoint")
        n = len(self.row_tokens[b])              # the row's tokens so far (fewer once it ended)
        run = runs[b]
        rng = run.generator.get_state() if run.generator is not None else None
        state = GenState(list(self.row_prompts[b]), self.row_prompts[b] + self.row_tokens[b], n,
                         list(self.row_records[b][:n]), list(self.row_logits[b][:n]),
                         run.config, run.seed, rng)
        cache = run.cache if self._on_engine else self._row_cache(b, state.kv_length)
        return state, cache, row_interventions(interventions, b)

    def _row_cache(self, b: int, length: int):
        """Row ``b``'s keys and values cut out of the padded cache: its ``length`` positions
        after its padding (paused mid-forward, the positions of this token are left out)."""
        from transformers import DynamicCache
        if length == 0:
            return None
        pad = len(self._padded[b]) - len(self.row_prompts[b])
        cache = DynamicCache(config=self.loaded.model.config)
        for i, layer in enumerate(self.cache.layers):
            keys = layer.keys[b:b + 1, :, pad:pad + length]
            values = layer.values[b:b + 1, :, pad:pad + length]
            cache.update(keys, values, i)      # (a copy: the row owns its tensors)
        return cache

    def _decode_loop(self) -> None:
        sched = scheduler.scheduler_for(self.loaded)
        # one run per row: its generator and rules (on the engine, its cache and steps too)
        self._runs = [self._row_run(b) for b in range(self.rows)]
        self._on_engine = (sched is not None and self.step == 0
                           and not self.interventions.breakpoints and self.step_target is None)
        if self._on_engine:
            return self._decode_on_engine(sched)
        from transformers import DynamicCache
        loaded, cfg = self.loaded, self.config
        model, device = loaded.model, loaded.device
        self.cache = DynamicCache(config=model.config)
        eos = _eos_ids(loaded)
        mask = torch.tensor(self._mask, dtype=torch.long, device=device)
        next_input = torch.tensor(self._padded, device=device)
        while self.step < cfg.max_new_tokens:
            if self.interrupted.is_set():          # (a step boundary: the cache is whole)
                self.stop_reason = "interrupted"
                return
            self._phase = "prefill" if self.step == 0 else "decode"
            self._fired_breaks, self._fired_rules, self._paused_s = [], [], 0.0
            positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -next_input.shape[1]:]
            t0 = time.perf_counter()
            with loaded.compute_lock:
                out = model(input_ids=next_input, attention_mask=mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: self.cache})
                logits = out.logits[:, -1, :]
                # each row samples from its own generator; an ended row draws nothing
                picked = torch.stack([logits[b].argmax() if self.row_done[b]
                                      else self._runs[b]._pick(logits[b:b + 1])
                                      for b in range(self.rows)])
                top_p, top_i = torch.softmax(logits.float(), dim=-1).topk(cfg.record_top_k)
                ids = picked.tolist()              # the one host sync of a step
            ms = (time.perf_counter() - t0) * 1e3
            top_p, top_i = top_p.tolist(), top_i.tolist()
            for b, token_id in enumerate(ids):
                if self.row_done[b]:
                    continue
                if cfg.return_logits:
                    self.row_logits[b].append(logits[b].float().cpu().numpy())
                self.row_tokens[b].append(token_id)
                throughput.count(loaded.name)   # the load record's tokens/s (cluster)
                self.row_records[b].append({
                    "step": self.step, "token_id": token_id,
                    "text": loaded.tokenizer.decode([token_id]),
                    "top_ids": top_i[b], "top_probs": top_p[b],
                    "forward_ms": ms - self._paused_s * 1e3, "paused_ms": self._paused_s * 1e3,
                    "breakpoints": list(self._fired_breaks), "rules": list(self._fired_rules)})
                if cfg.stop_at_eos and token_id in eos:
                    self.row_done[b], self.row_stop[b] = True, "eos"
            self.records.append({"step": self.step})
            self.tokens.append(ids[0])
            self.step += 1
            if all(self.row_done):
                self.stop_reason = "eos"
                return
            # finished rows keep decoding (rows never see each other); their tokens are dropped
            next_input = picked.view(self.rows, 1)
            mask = torch.cat([mask, torch.ones((self.rows, 1), dtype=mask.dtype, device=device)], 1)
        self.stop_reason = "length"

    def _row_run(self, b: int) -> GenerationRun:
        """Row ``b`` as a run of its own (never started: this worker drives it): its prompt
        unpadded, its seed, and the rules that act on it, as a solo session would have them."""
        state = GenState.fresh(self.row_prompts[b], replace(self.config, seed=row_seed(self.seed, b)))
        return GenerationRun(self.loaded, state,
                             Interventions([], row_interventions(self.interventions, b).rules))

    def _decode_on_engine(self, sched) -> None:
        """Every row prefilled alone, then decoded as rows of the model's batched step."""
        from transformers import DynamicCache
        loaded, cfg = self.loaded, self.config
        model, device = loaded.model, loaded.device
        eos = _eos_ids(loaded)
        runs = self._runs
        members: dict = {}
        try:
            while self.step < cfg.max_new_tokens:
                if self.interrupted.is_set():
                    self.stop_reason = "interrupted"
                    return
                live = [b for b in range(self.rows) if not self.row_done[b]]
                t0 = time.perf_counter()
                logits = {}
                if self.step == 0:
                    for b in live:                 # each row's own prefill: its solo bits
                        run = runs[b]
                        run._phase, run._fired_rules = "prefill", []
                        run.cache = DynamicCache(config=model.config)
                        ids = torch.tensor([run.tokens], device=device)
                        # chunked as the same prompt alone is (a long one)
                        logits[b] = sched.prefill(run, ids)
                        if logits[b] is None:
                            with loaded.compute_lock, loaded.hooks.active(run):
                                out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            use_cache=True, logits_to_keep=1,
                                            **{loaded.cache_kwarg: run.cache})
                            logits[b] = out.logits[:, -1, :]
                else:
                    for b in live:
                        run = runs[b]
                        run._phase, run._fired_rules = "decode", []
                        if b not in members:
                            members[b] = sched.join(run)
                    sched.submit([members[b] for b in live])
                    for b in live:
                        logits[b] = members[b].collect()
                ms = (time.perf_counter() - t0) * 1e3
                for b in live:
                    row = logits[b]
                    token = runs[b]._pick(row)        # the row's own generator
                    top_p, top_i = torch.softmax(row.float(), dim=-1).topk(cfg.record_top_k)
                    token_id = int(token)
                    run = runs[b]
                    if cfg.return_logits:
                        self.row_logits[b].append(row[0].float().cpu().numpy())
                    self.row_tokens[b].append(token_id)
                    throughput.count(loaded.name)   # the load record's tokens/s (cluster)
                    self.row_records[b].append({
                        "step": self.step, "token_id": token_id,
                        "text": loaded.tokenizer.decode([token_id]),
                        "top_ids": top_i[0].tolist(), "top_probs": top_p[0].tolist(),
                        "forward_ms": ms, "paused_ms": 0.0, "breakpoints": [],
                        "rules": list(run._fired_rules)})
                    run.tokens.append(token_id)
                    run.step += 1
                    if cfg.stop_at_eos and token_id in eos:
                        self.row_done[b], self.row_stop[b] = True, "eos"
                        if b in members:
                            sched.leave(members.pop(b))
                self.records.append({"step": self.step})
                self.tokens.append(self.row_tokens[0][-1] if self.row_tokens[0] else 0)
                self.step += 1
                if all(self.row_done):
                    self.stop_reason = "eos"
                    return
            self.stop_reason = "length"
        finally:
            for m in members.values():
                sched.leave(m)

    def result(self) -> dict:
        import numpy as np
        rows = []
        for b in range(self.rows):
            res = {"tokens": self.row_tokens[b], "prompt_tokens": self.row_prompts[b],
                   "text": self.loaded.tokenizer.decode(self.row_tokens[b]),
                   "steps": self.row_records[b], "stop_reason": self.row_stop[b] or self.stop_reason,
                   "seed": row_seed(self.seed, b), "model": self.loaded.name}
            if self.config.return_logits:
                res["logits"] = (np.stack(self.row_logits[b]) if self.row_logits[b]
                                 else np.zeros((0, self.loaded.vocab_size), dtype="float32"))
            rows.append(res)
        return {"batch": rows, "stop_reason": self.stop_reason}


def row_seed(seed: int, b: int) -> int:
    """The sampling seed of row ``b`` of a batch call seeded ``seed``: rows draw apart (the
    same prompt twice samples two ways), and row b replays as a solo run with this seed."""
    return (seed + b) % 2**63


def row_interventions(interventions: Interventions, b: int) -> Interventions:
    """What acts on row ``b`` of a batch call, as a solo session holds it: every breakpoint,
    and the rules on every row or naming ``b`` (with the row filter dropped)."""
    return Interventions(list(interventions.breakpoints),
                         [replace(r, rows=None) for r in interventions.rules
                          if r.rows is None or b in r.rows])


def check_rules(interventions) -> None:
    for r in interventions.rules:
        if isinstance(r.op.positions, tuple):
            raise InvalidArgumentError(
                f"steering rule {r.id} names explicit positions; in a batch each row is padded "
                "differently, so batched generation takes rules on 'all' or 'last' positions only")


def _pad_id(loaded: LoadedModel) -> int:
    tok = loaded.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
