"""Server-side sessions: the state machine around one generation at a time.

States: idle -> running -> paused <-> running -> finished, and closed; restoring a
checkpoint leaves the session "ready": at a token boundary, where resume() continues.
Every method checks the state first and raises a typed error that changes nothing.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import uuid
from concurrent.futures import Future

import numpy as np
import torch

from djinn_protocol.errors import (CheckpointError, InvalidArgumentError, LimitExceededError,
                             NotPausedError, SessionBusyError, SessionClosedError,
                             UnknownSessionError)
from kernel_server.model import sites
from kernel_server.model import validation
from kernel_server.checkpoints.snapshot import Checkpoint, cache_from_host, copy_interventions
from kernel_server.checkpoints.store import CheckpointStore
from kernel_server.runtime.generation import (GenerationConfig, GenerationRun, GenState,
                                              apply_paused_edit, install_layer_hooks)
from kernel_server.model.interventions import Breakpoint, Interventions, SteeringRule
from kernel_server.model.registry import LoadedModel

IDLE, RUNNING, PAUSED, FINISHED, CLOSED = "idle", "running", "paused", "finished", "closed"
READY = "ready"   # restored to a token boundary; resume() continues from there

class Session:
    """One conversation's generation state on the server."""

    def __init__(self, loaded: LoadedModel, limits: validation.Limits, owner: str):
        install_layer_hooks(loaded)
        self.id = uuid.uuid4().hex[:12]
        self.owner = owner
        self.loaded = loaded
        self.limits = limits
        self.state = IDLE
        self.interventions = Interventions()
        self.run: GenerationRun | None = None
        self._rule_ids = itertools.count(1)
        self._lock = threading.RLock()   # one call at a time per session

    # ---- info ---------------------------------------------------------------------------
    def info(self) -> dict:
        with self._lock:
            self._note_timed_out_end()
        return {"id": self.id, "state": self.state, **self.loaded.info(),
                "breakpoints": [b.describe() for b in self.interventions.breakpoints],
                "steering": [r.describe() for r in self.interventions.rules]}

    def _note_timed_out_end(self) -> None:
        """A paused run may have ended on its own (pause timeout): take its event now."""
        if self.state == PAUSED and self.run is not None and self.run.pause is None:
            event = self.run.next_event()
            self.state = FINISHED if event["event"] == "finished" else IDLE

    def _require(self, *states: str) -> None:
        self._note_timed_out_end()
        if self.state == CLOSED:
            raise SessionClosedError(f"session {self.id} is closed")
        if self.state not in states:
            if PAUSED in states and self.state in (IDLE, FINISHED):
                why = ""
                if self.run is not None and self.run.stop_reason == "pause_timeout":
                    why = (f" (it stayed paused longer than the server's pause timeout, "
                           f"{self.limits.pause_timeout_s:g} s, and was stopped)")
                raise NotPausedError(f"session {self.id} is {self.state}, not paused{why}: "
                                     "this call needs a generation paused at a breakpoint")
            raise SessionBusyError(f"session {self.id} is {self.state}; "
                                   f"this call needs it to be {' or '.join(states)}")

    # ---- generation -------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens=20, chat=False, temperature=0.0, top_k=None,
                 top_p=None, seed=None, stop_at_eos=True, record_top_k=5, return_logits=False) -> dict:
        with self._lock:
            self._require(IDLE, FINISHED, READY)
            lim = self.limits
            max_new = validation.integer(max_new_tokens, "max_new_tokens", 1)
            if max_new > lim.max_new_tokens:
                raise LimitExceededError(f"max_new_tokens={max_new} is over the server limit "
                                         f"{lim.max_new_tokens} (--max-new-tokens)")
            config = GenerationConfig(
                max_new_tokens=max_new,
                temperature=validation.number(temperature, "temperature", 0.0, 100.0),
                top_k=None if top_k is None else validation.integer(top_k, "top_k", 1),
                top_p=None if top_p is None else validation.number(top_p, "top_p", 0.0, 1.0),
                seed=None if seed is None else validation.integer(seed, "seed", 0, 2**63 - 1),
                stop_at_eos=validation.boolean(stop_at_eos, "stop_at_eos"),
                record_top_k=validation.integer(record_top_k, "record_top_k", 1, 100),
                return_logits=validation.boolean(return_logits, "return_logits"))
            validation.logits_cap(config.return_logits, max_new, self.loaded.vocab_size, lim)
            chat = validation.boolean(chat, "chat")
            if validation.is_batch(prompt):
                from kernel_server.runtime.batch import BatchRun
                if len(prompt) > lim.max_batch:
                    raise LimitExceededError(f"a batch of {len(prompt)} prompts is over the server "
                                             f"limit {lim.max_batch}")
                rows = [validation.prompt_ids(p, self.loaded.tokenizer, chat, lim, self.loaded.vocab_size)
                        for p in prompt]
                self.loaded.check_context(max(map(len, rows)) + max_new,
                                          "the longest prompt plus max_new_tokens")
                self.run = BatchRun(self.loaded, rows, config, self.interventions)
            else:
                ids = validation.prompt_ids(prompt, self.loaded.tokenizer, chat, lim, self.loaded.vocab_size)
                self.loaded.check_context(len(ids) + max_new, "the prompt plus max_new_tokens")
                self.run = GenerationRun(self.loaded, GenState.fresh(ids, config), self.interventions)
            self.run.pause_timeout = lim.pause_timeout_s
            self.state = RUNNING
            return self._enter_state_of(self.run.start())

    def resume(self, ignore_breakpoints=False) -> Future:
        with self._lock:
            self._require(PAUSED, READY)
            if validation.boolean(ignore_breakpoints, "ignore_breakpoints"):
                self.run.ignore_breakpoints = True
                self.run.refresh_hot_layers()
            return self._continue("resume")

    def step(self, to="layer") -> Future:
        """Run to the next layer boundary (``to="layer"``) or to the same layer of the next
        token (``to="token"``) and pause there, whatever the breakpoints say."""
        with self._lock:
            self._require(PAUSED, READY)
            validation.choice(to, "to", ("layer", "token"))
            point = self.run.pause
            if point is None:          # ready at a token boundary: the next layer is layer 0
                target = (0, self.run.step)
            elif to == "token":
                target = (point.layer, point.step + 1)
            elif point.layer + 1 < self.loaded.num_layers:
                target = (point.layer + 1, point.step)
            else:
                target = (0, point.step + 1)
            self.run.step_target = target
            self.run.refresh_hot_layers()
            return self._continue("resume")

    def interrupt(self) -> bool:
        """Ask a running generation to stop at its next step boundary (the notebook's
        interrupt, Ctrl-C); the pending ``generate``/``resume`` call then returns a finished
        event with stop_reason "interrupted". Takes no lock: that call holds it. Returns
        whether a running generation was asked."""
        run = self.run
        if self.state != RUNNING or run is None:
            return False
        run.interrupt()
        return True

    def stop(self) -> Future:
        """Abort a paused generation; the tokens so far are kept in the result."""
        with self._lock:
            self._require(PAUSED)
            return self._continue("abort")

    def _continue(self, what: str) -> Future:
        """Resume the run (``what``: "resume" or "abort"): a Future of the next event. From a
        pause the generation thread settles it when that event happens (a transport may let
        that thread send the reply itself: no hand-off back to a serving thread in the hot
        cycle); from a token boundary (ready) it is settled before it is returned."""
        was_ready = self.state == READY
        self.state = RUNNING
        outcome: Future = Future()
        if was_ready:
            outcome.set_result(self._enter_state_of(self.run.start()))
            return outcome
        run = self.run

        def deliver(event: dict) -> None:       # in the generation thread
            with self._lock:
                if self.run is not run or self.state == CLOSED:
                    # closed while it ran (its client went): a pause is aborted at once
                    if event["event"] == "paused":
                        run.abort()
                    outcome.set_exception(SessionClosedError(f"session {self.id} was closed"))
                    return
                try:
                    outcome.set_result(self._enter_state_of(event))
                except BaseException as exc:
                    outcome.set_exception(exc)

        run.command(what, deliver)
        return outcome

    def _enter_state_of(self, event: dict) -> dict:
        kind = event["event"]
        if kind == "paused":
            self.state = PAUSED
        elif kind == "finished":
            self.state = FINISHED
        else:  # the worker failed: the session stays usable for a new generate()
            self.state = FINISHED if self.run and self.run.records else IDLE
            raise event["error"]
        return event

    # ---- checkpoints ------------------------------------------------------------------
    def checkpoint(self, store: CheckpointStore) -> Checkpoint:
        """Snapshot at the current token boundary (mid-forward: the start of this token)."""
        with self._lock:
            self._require(PAUSED, FINISHED, READY)
            return store.take(self.owner, self.loaded, self.run.boundary_state(), self.run.cache,
                              self.interventions)

    def restore(self, ck: Checkpoint) -> dict:
        """Rewind to ``ck``: KV cache, tokens, step, RNG, rules and breakpoints."""
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if ck.model != self.loaded.name:
                raise CheckpointError(f"checkpoint {ck.id} is of model {ck.model!r}; this session "
                                      f"runs {self.loaded.name!r}")
            # positions so far plus the tokens still to make must fit the model's context
            # (a file's fields are checked on load; this holds for every restore)
            self.loaded.check_context(len(ck.state.prompt_ids) + ck.state.config.max_new_tokens,
                                      f"checkpoint {ck.id}'s generation")
            cache = cache_from_host(ck, self.loaded)
            if self.state == PAUSED:
                self.run.command("abort")
            self.interventions = copy_interventions(ck.interventions)
            for x in [*self.interventions.breakpoints, *self.interventions.rules]:
                if x.site != "resid":     # a file from another server: hook its sites here
                    self.loaded.hooks.install_site(sites.resolve(self.loaded, x.layer, x.site))
            # new rules must not reuse the ids of the restored ones
            self._rule_ids = itertools.count(max((r.id for r in self.interventions.rules), default=0) + 1)
            self.run = GenerationRun(self.loaded, ck.state, self.interventions, cache=cache)
            self.run.pause_timeout = self.limits.pause_timeout_s
            self.state = READY
            return self.info()

    # ---- one-shot passes (no generation; allowed whenever no forward pass of ours runs) ---
    def score(self, tokens, start=None, steering="session", compare=True, top_k=5,
              return_logits=False) -> dict:
        """Teacher-forced log-probs of ``tokens[start:]`` in one pass (see analysis.score);
        a list of sequences runs as padded batches and gives a list (one ``start`` for all)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if validation.is_batch(tokens):
                seqs = self._prompts_arg(tokens, "tokens")
                if min(len(q) for q in seqs) < 2:
                    raise InvalidArgumentError("score needs at least 2 tokens in every sequence")
                first = 1 if start is None else validation.integer(
                    start, "start", 1, min(len(q) for q in seqs) - 1)
                return analysis.score_many(
                    self.loaded, seqs, [first] * len(seqs), self._rules_arg(steering),
                    validation.boolean(compare, "compare"), validation.integer(top_k, "top_k", 1, 100),
                    validation.boolean(return_logits, "return_logits"))
            ids = validation.prompt_ids(tokens, self.loaded.tokenizer, False, self.limits,
                               self.loaded.vocab_size)
            if len(ids) < 2:
                raise InvalidArgumentError("score needs at least 2 tokens (a context and a target)")
            start = 1 if start is None else validation.integer(start, "start", 1, len(ids) - 1)
            rules = self._rules_arg(steering)
            return analysis.score(self.loaded, ids, start, rules, validation.boolean(compare, "compare"),
                                  validation.integer(top_k, "top_k", 1, 100),
                                  validation.boolean(return_logits, "return_logits"))

    def steering_vector(self, positive, negative, layer, reduce="last") -> np.ndarray:
        """mean(block ``layer`` output | positive prompts) - mean(| negative prompts)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            tok, lim, vocab = self.loaded.tokenizer, self.limits, self.loaded.vocab_size
            pos = validation.prompt_list(positive, "positive", tok, lim, vocab)
            neg = validation.prompt_list(negative, "negative", tok, lim, vocab)
            return analysis.steering_vector(self.loaded, pos, neg,
                                            validation.layer(layer, self.loaded.num_layers),
                                            validation.choice(reduce, "reduce", ("last", "mean")))

    def _prompts_arg(self, value, name: str) -> list:
        """Token ids of each prompt of a batch (a list of texts / id lists), at most 256."""
        return validation.prompt_list(value, name, self.loaded.tokenizer, self.limits,
                                      self.loaded.vocab_size)

    def _rules_arg(self, steering) -> list:
        if steering == "session":
            return list(self.interventions.rules)
        if steering is None:
            return []
        rules = validation.rules(steering, self.loaded, self.limits)
        for r in rules:
            self.loaded.hooks.install_site(sites.resolve(self.loaded, r.layer, r.site))
        return rules

    def _layers_arg(self, layers) -> list:
        n = self.loaded.num_layers
        if layers is None:
            return list(range(n))
        if isinstance(layers, int) and type(layers) is not bool:
            layers = [layers]
        if not isinstance(layers, list) or not layers or len(layers) > n:
            raise InvalidArgumentError("layers must be None (all), an int or a list of layer indices")
        return sorted({validation.layer(x, n) for x in layers})

    def tokenize(self, text) -> list:
        """Token ids of ``text`` (no special tokens), as ``generate`` would see it."""
        with self._lock:
            if not isinstance(text, str):
                raise InvalidArgumentError("text must be a str")
            return validation.prompt_ids(text, self.loaded.tokenizer, False, self.limits, self.loaded.vocab_size)

    def decode(self, tokens) -> str:
        with self._lock:
            ids = validation.prompt_ids(tokens, self.loaded.tokenizer, False, self.limits, self.loaded.vocab_size)
            return self.loaded.tokenizer.decode(ids)

    def cache(self, prompt, sites=("resid",), layers=None, reduce=None, steering=None) -> dict:
        """One forward pass over ``prompt``; the activations of ``sites`` x ``layers``,
        reduced on the server (see analysis.cache); a list of prompts runs as padded
        batches and gives a list of caches."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            batch = self._prompts_arg(prompt, "prompt") if validation.is_batch(prompt) else None
            ids = max(batch, key=len) if batch else validation.prompt_ids(
                prompt, self.loaded.tokenizer, False, self.limits, self.loaded.vocab_size)
            if isinstance(sites, str):
                sites = [sites]
            if not isinstance(sites, (list, tuple)) or not sites or len(sites) > 16:
                raise InvalidArgumentError("sites must be a site name or a list of 1..16 of them")
            if reduce is not None:
                validation.choice(reduce, "reduce", ("last", "mean", "norm"))
            layers = self._layers_arg(layers)
            keys = []
            for name in sites:
                for layer in ([None] if isinstance(name, str) and name.startswith("module:") else layers):
                    resolved, _, _, _ = self._site(layer, name, writable=False)
                    if resolved.key not in keys:        # (a hook name holds its one layer)
                        keys.append(resolved.key)
            per_row = self.loaded.hidden_size * 4 * (len(ids) if reduce in (None, "norm") else 1)
            if reduce is None and len(keys) * per_row * len(ids) * len(batch or [1]) > 2**30:
                raise LimitExceededError("this cache would be over 1 GiB: ask for fewer layers or "
                                         "sites, or a reduce= ('last', 'mean', 'norm')")
            if batch:
                return analysis.cache_many(self.loaded, batch, keys, reduce, self._rules_arg(steering))
            return analysis.cache(self.loaded, ids, keys, reduce, self._rules_arg(steering))

    def lens(self, prompt, layers=None, k=10, target=None) -> dict:
        """Logit lens of the prompt's last position after each of ``layers``, one pass (a
        list of prompts: padded batches, a list of results)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if target is not None:
                target = validation.integer(target, "target", 0, self.loaded.vocab_size - 1)
            if validation.is_batch(prompt):
                return analysis.lens_many(self.loaded, self._prompts_arg(prompt, "prompt"),
                                          self._layers_arg(layers), validation.integer(k, "k", 1, 1000),
                                          target)
            ids = validation.prompt_ids(prompt, self.loaded.tokenizer, False, self.limits,
                               self.loaded.vocab_size)
            return analysis.lens_layers(self.loaded, ids, self._layers_arg(layers),
                                        validation.integer(k, "k", 1, 1000), target)

    def patch(self, clean, corrupted, layer, answer, positions=None, site="resid", head=None) -> dict:
        """Activation patching of one layer, its positions as the rows of one batch (see
        analysis.patch_row)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            clean_ids, bad_ids, name, layers, positions, answer, head = self._patch_args(
                clean, corrupted, layer, answer, positions, site, head)
            return analysis.patch_row(self.loaded, clean_ids, bad_ids, layers[0], name,
                                      positions, answer, head)

    def patch_sweep(self, clean, corrupted, answer, layers=None, positions=None, site="resid",
                    head=None, batch=64) -> dict:
        """Activation patching of every layer x position cell in one call, ``batch`` cells
        as the rows of one forward (see analysis.patch_cells)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            clean_ids, bad_ids, name, layers, positions, answer, head = self._patch_args(
                clean, corrupted, layers, answer, positions, site, head, many=True)
            if len(layers) * len(positions) > 4096:
                raise LimitExceededError(f"{len(layers) * len(positions)} patching cells in one call "
                                         "is over the limit of 4096: split the layers")
            return analysis.patch_cells(self.loaded, clean_ids, bad_ids, name, layers, positions,
                                        answer, head, validation.integer(batch, "batch", 1, 256))

    def attribution_patch(self, clean, corrupted, answer, layers=None, site="resid") -> dict:
        """Attribution patching: the first-order estimate of the patching grid from one
        clean forward and one corrupted forward + backward (see analysis.attribution_patch)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            clean_ids, bad_ids, name, layers, _, answer, _ = self._patch_args(
                clean, corrupted, layers, answer, None, site, None, many=True)
            if name not in ("resid", "attn", "mlp", "heads"):
                raise InvalidArgumentError(f"attribution patching works on resid, attn, mlp, heads; "
                                           f"not {name!r}")
            self._check_grad_memory(len(bad_ids))
            return analysis.attribution_patch(self.loaded, clean_ids, bad_ids, name, layers, answer)

    def grad(self, prompt, metric="logit_diff", answer=None, target=None, start=None,
             sites=("resid",), layers=None, reduce=None) -> dict:
        """d(metric)/d(activation) at ``sites`` x ``layers`` (see analysis.grad)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            vocab = self.loaded.vocab_size
            ids = validation.prompt_ids(prompt, self.loaded.tokenizer, False, self.limits, vocab)
            kind = validation.choice(metric, "metric", ("logit_diff", "logprob", "loss"))
            spec: dict = {"kind": kind}
            if kind == "logit_diff":
                if not isinstance(answer, list) or len(answer) != 2:
                    raise InvalidArgumentError("metric='logit_diff' needs answer=[correct, wrong] token ids")
                spec["answer"] = tuple(validation.integer(a, "answer token", 0, vocab - 1) for a in answer)
            elif kind == "logprob":
                if target is None:
                    raise InvalidArgumentError("metric='logprob' needs target= (a token id)")
                spec["target"] = validation.integer(target, "target", 0, vocab - 1)
            else:
                if len(ids) < 2:
                    raise InvalidArgumentError("metric='loss' needs at least 2 tokens")
                spec["start"] = 1 if start is None else validation.integer(start, "start", 1, len(ids) - 1)
            if reduce is not None:
                validation.choice(reduce, "reduce", ("last", "mean", "norm"))
            if isinstance(sites, str):
                sites = [sites]
            if not isinstance(sites, (list, tuple)) or not sites or len(sites) > 16:
                raise InvalidArgumentError("sites must be a site name or a list of 1..16 of them")
            keys = []
            for name in sites:
                for layer in self._layers_arg(layers):
                    resolved, _, _, _ = self._site(layer, name, writable=False)
                    if resolved.layer < 0 or resolved.name == "attn_pattern":
                        raise InvalidArgumentError("gradients are taken at block sites (resid, attn, "
                                                   f"mlp, heads), not {name!r:.80}")
                    if resolved.key not in keys:
                        keys.append(resolved.key)
            self._check_grad_memory(len(ids))
            return analysis.grad(self.loaded, ids, keys, spec, reduce)

    def _check_grad_memory(self, n: int) -> None:
        from kernel_server.model import passes as analysis
        need = analysis.grad_bytes(self.loaded, n)
        if need > analysis.GRAD_BYTES:
            raise LimitExceededError(
                f"a gradient pass over {n} tokens would hold about {need / 2**30:.1f} GiB for its "
                f"backward, over the limit of {analysis.GRAD_BYTES / 2**30:.0f} GiB: use a shorter prompt")

    def _patch_args(self, clean, corrupted, layers, answer, positions, site, head, many=False):
        """Checked arguments of a patching call: (clean ids, corrupted ids, site name,
        layers, positions, answer, head)."""
        tok, lim, vocab = self.loaded.tokenizer, self.limits, self.loaded.vocab_size
        clean_ids = validation.prompt_ids(clean, tok, False, lim, vocab)
        bad_ids = validation.prompt_ids(corrupted, tok, False, lim, vocab)
        if len(clean_ids) != len(bad_ids):
            raise InvalidArgumentError(
                f"clean and corrupted prompts must have the same number of tokens "
                f"({len(clean_ids)} vs {len(bad_ids)}) so that positions line up")
        layer_list = self._layers_arg(layers) if many else [layers]
        names = set()
        for i, layer in enumerate(layer_list):
            resolved, head_i, _, _ = self._site(layer, site, head)
            if resolved.layer < 0:
                raise InvalidArgumentError("patching works on block sites (resid, attn, mlp, heads)")
            layer_list[i] = resolved.layer
            names.add(resolved.name)
        head = head_i
        if not isinstance(answer, list) or len(answer) != 2:
            raise InvalidArgumentError("answer must be two token ids [correct, wrong]")
        answer = tuple(validation.integer(a, "answer token", 0, vocab - 1) for a in answer)
        n = len(clean_ids)
        positions = list(range(n)) if positions is None else \
            [validation.integer(p, "position", 0, n - 1) for p in (positions if isinstance(positions, list) else [positions])]
        return clean_ids, bad_ids, names.pop(), layer_list, positions, answer, head

    def to_str_tokens(self, text) -> list:
        """The text of each token of ``text`` (TransformerLens's ``to_str_tokens``)."""
        with self._lock:
            ids = validation.prompt_ids(text, self.loaded.tokenizer, False, self.limits,
                                        self.loaded.vocab_size)
            return [self.loaded.tokenizer.decode([t]) for t in ids]

    # ---- while paused -----------------------------------------------------------------
    def _paused_rows(self, positions, row: int = 0) -> torch.Tensor:
        point = self.run.pause
        pos = validation.positions(positions)
        h = point.hidden[row]
        if pos == "last":
            return h[-1:]
        if isinstance(pos, tuple):
            validation.positions_in_chunk(pos, point.start, h.shape[0])
            return h[torch.tensor([p - point.start for p in pos], device=h.device)]
        return h

    def activation(self, positions="all", reduce=None, row=None) -> np.ndarray:
        """The paused tensor, [positions, width]; a batch pause gives [rows, positions,
        width] (padded coordinates) unless ``row`` picks one."""
        with self._lock:
            self._require(PAUSED)
            if reduce is not None:
                validation.choice(reduce, "reduce", ("norm", "mean"))
            batch = int(self.run.pause.hidden.shape[0])
            if batch > 1 and row is None:
                return np.stack([self.activation(positions, reduce, b) for b in range(batch)])
            h = self._paused_rows(positions, 0 if row is None else validation.integer(row, "row", 0, batch - 1))
            if self.run.pause.site == "heads":          # [positions, heads, head_dim]
                h = h.reshape(h.shape[0], *sites.head_geometry(self.loaded))
            with torch.inference_mode():
                if reduce == "norm":
                    h = h.float().norm(dim=-1)
                elif reduce == "mean":
                    h = h.float().mean(dim=0)
                return h.float().cpu().numpy()

    def logit_lens(self, k=10, positions="last") -> dict:
        """The paused hidden state through the final norm and the unembedding: top-k."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(PAUSED)
            k = validation.integer(k, "k", 1, 1000)
            point = self.run.pause
            if point.site not in ("resid", "attn", "mlp"):
                raise InvalidArgumentError(f"the logit lens reads the residual stream (sites resid, "
                                           f"attn, mlp), not {point.site!r}")
            rows = self._paused_rows(positions)
            out = analysis.lens_topk(self.loaded, rows, k)
            pos = validation.positions(positions)
            n = int(point.hidden.shape[1])
            out["positions"] = (list(range(point.start, point.start + n)) if pos == "all"
                                else [point.start + n - 1] if pos == "last" else list(pos))
            out.update(layer=point.layer, site=point.site, step=point.step)
            return out

    def edit(self, scale=None, add=None, alpha=1.0, set=None, edit=None, positions="all",
             head=None) -> dict:
        args = dict(scale=scale, add=add, alpha=alpha, set=set, edit=edit, positions=positions)
        with self._lock:
            self._require(PAUSED)
            point = self.run.pause
            width = int(point.hidden.shape[-1])
            head_dim = 0
            if head is not None:
                if point.site != "heads":
                    raise InvalidArgumentError("head= needs a pause at site='heads'")
                heads, head_dim = sites.head_geometry(self.loaded)
                head, width = validation.integer(head, "head", 0, heads - 1), head_dim
            # the vector is made where the paused layer computes (a model over several devices)
            op = validation.edit_op(args, width, point.hidden.device, self.loaded.dtype)
            if head is not None:
                op = dataclasses.replace(op, head=head, head_dim=head_dim)
            validation.check_rows_fit(op, point.start, int(point.hidden.shape[1]))
            apply_paused_edit(point, op)
            return {"edits": point.edits}

    # ---- breakpoints and steering ------------------------------------------------------
    def _site(self, layer, site, head=None, writable=True):
        """Resolve and hook a site; (Site, head, vector width, device of its tensors).
        A TransformerLens hook name (``blocks.6.hook_resid_post``) names layer and site."""
        layer, site = sites.from_hook_name(self.loaded, layer, site)
        resolved, head, width = validation.site(self.loaded, layer, site, head, writable)
        self.loaded.hooks.install_site(resolved)
        if resolved.layer >= 0:
            device = self.loaded.layer_device(resolved.layer)
        else:
            device = next(resolved.module.parameters(), torch.empty(0, device=self.loaded.device)).device
        return resolved, head, width, device

    def set_breakpoint(self, layer, phase="decode", steps=None, site="resid") -> dict:
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            resolved, _, _, _ = self._site(layer, site)
            bp = Breakpoint(resolved.layer, validation.choice(phase, "phase", validation.PHASES),
                            validation.steps(steps, self.limits), site=resolved.name)
            if bp not in self.interventions.breakpoints:
                validation.intervention_caps(self.interventions, self.limits, breakpoint=bp)
                self.interventions.breakpoints.append(bp)
            self._refresh()
            return bp.describe()

    def clear_breakpoints(self, layer=None, site=None) -> int:
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if layer is not None:
                validation.layer(layer, self.loaded.num_layers)
            if site is not None and not isinstance(site, str):
                raise InvalidArgumentError("site must be a str")
            before = len(self.interventions.breakpoints)
            self.interventions.breakpoints = [
                b for b in self.interventions.breakpoints
                if not ((layer is None or b.layer == layer) and (site is None or b.site == site))]
            self._refresh()
            return before - len(self.interventions.breakpoints)

    def steer(self, layer=None, scale=None, add=None, alpha=1.0, set=None, edit=None,
              positions="all", phase="both", steps=None, site="resid", head=None,
              rows=None) -> dict:
        args = dict(scale=scale, add=add, alpha=alpha, set=set, edit=edit, positions=positions)
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            resolved, head, width, device = self._site(layer, site, head)
            # its vector lives on the site's device (no copy per step)
            op = validation.edit_op(args, width, device, self.loaded.dtype, standing=True)
            if head is not None:
                op = dataclasses.replace(op, head=head, head_dim=resolved.head_dim)
            rule = SteeringRule(
                layer=resolved.layer, op=op,
                phase=validation.choice(phase, "phase", validation.PHASES), steps=validation.steps(steps, self.limits),
                id=next(self._rule_ids), site=resolved.name, rows=validation.rows(rows, self.limits))
            if self.state == PAUSED and hasattr(self.run, "row_tokens"):
                from kernel_server.runtime.batch import check_rules
                check_rules(Interventions(rules=[rule]))
            validation.intervention_caps(self.interventions, self.limits, rule=rule)
            self.interventions.rules.append(rule)
            self._refresh()
            return rule.describe()

    def clear_steering(self, rule_id=None) -> int:
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if rule_id is not None:
                validation.integer(rule_id, "rule_id", 0)
            before = len(self.interventions.rules)
            self.interventions.rules = [r for r in self.interventions.rules
                                        if rule_id is not None and r.id != rule_id]
            self._refresh()
            return before - len(self.interventions.rules)

    def _refresh(self) -> None:
        if self.run is not None:
            self.run.refresh_hot_layers()

    def close(self) -> None:
        with self._lock:
            if self.state == PAUSED and self.run is not None:
                self.run.command("abort")
            self.state = CLOSED
            self.run = None


class SessionManager:
    """All sessions of a server, each owned by one connection (the one that opened it, or
    one that re-attached it: see ``kernel_server.runtime.ownership``)."""

    def __init__(self, limits: validation.Limits):
        self.limits = limits
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, loaded: LoadedModel, owner: str) -> Session:
        with self._lock:
            mine = sum(1 for s in self._sessions.values() if s.owner == owner)
            if mine >= self.limits.max_sessions_per_client:
                raise LimitExceededError(f"this client already has {mine} sessions, the server limit "
                                         f"(--max-sessions-per-client); close some first")
            session = Session(loaded, self.limits, owner)
            self._sessions[session.id] = session
            return session

    def get(self, session_id, owner: str) -> Session:
        if not isinstance(session_id, str):
            raise InvalidArgumentError("session id must be a str")
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise UnknownSessionError(f"no session {session_id!r} on this server for this client")
        return session

    def close(self, session_id: str, owner: str) -> None:
        session = self.get(session_id, owner)
        session.close()
        with self._lock:
            self._sessions.pop(session_id, None)

    def close_owner(self, owner: str) -> int:
        with self._lock:
            mine = [s for s in self._sessions.values() if s.owner == owner]
            for s in mine:
                self._sessions.pop(s.id, None)
        for s in mine:
            s.close()
        return len(mine)

    def owner_of(self, session_id: str) -> str | None:
        session = self._sessions.get(session_id)
        return None if session is None else session.owner

    def owned_by(self, owner: str) -> list[str]:
        with self._lock:
            return [s.id for s in self._sessions.values() if s.owner == owner]

    def move(self, old: str, new: str, session_id: str | None = None) -> list[str]:
        """Hand ``old``'s sessions (or just ``session_id``) to owner ``new``."""
        with self._lock:
            moving = [s for s in self._sessions.values() if s.owner == old
                      and (session_id is None or s.id == session_id)]
            have = sum(1 for s in self._sessions.values() if s.owner == new)
            if moving and have + len(moving) > self.limits.max_sessions_per_client:
                raise LimitExceededError(
                    f"this client has {have} sessions; taking {len(moving)} more would pass the "
                    "server limit (--max-sessions-per-client); close some first")
            for s in moving:
                s.owner = new
            return [s.id for s in moving]

    def close_all(self) -> int:
        with self._lock:
            everyone = list(self._sessions.values())
            self._sessions.clear()
        for s in everyone:
            s.close()
        return len(everyone)

    def count(self) -> int:
        return len(self._sessions)
