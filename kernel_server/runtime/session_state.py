"""Server-side sessions: the state machine around one generation at a time.

States: idle -> running -> paused <-> running -> finished, and closed; restoring a
checkpoint leaves the session "ready": at a token boundary, where resume() continues.
Every method checks the state first and raises a typed error that changes nothing. The
one-shot passes are in ``session_passes``, the registry of sessions in ``session_manager``.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import uuid
from concurrent.futures import Future

import numpy as np
import torch

from djinn_protocol.errors import (CheckpointError, InvalidArgumentError, InvalidEditError,
                             LimitExceededError, NotPausedError, SessionBusyError,
                             SessionClosedError)
from kernel_server.model import sites
from kernel_server.model import validation
from kernel_server.checkpoints.snapshot import Checkpoint, cache_from_host, copy_interventions
from kernel_server.checkpoints.store import CheckpointStore
from kernel_server.runtime.generation import (GenerationConfig, GenerationRun, GenState,
                                              apply_paused_edit, install_layer_hooks)
from kernel_server.model.interventions import Breakpoint, Interventions, SteeringRule
from kernel_server.model.registry import LoadedModel
from kernel_server.runtime.session_passes import OneShotPasses
from kernel_server.runtime.states import CLOSED, FINISHED, IDLE, PAUSED, READY, RUNNING


class Session(OneShotPasses):
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
        self.saes: dict = {}             # name -> kernel_server.model.sae.SAE (load_sae)

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
    def checkpoint(self, store: CheckpointStore, row=None):
        """Snapshot at the current token boundary (mid-forward: the start of this token).
        After a batch call (``generate([p1, ...])``) a checkpoint is of one row: ``row=b``
        gives row b's checkpoint, ``row="all"`` a list with one per row (all or none: a
        budget error takes none)."""
        from kernel_server.runtime.batch import BatchRun
        with self._lock:
            self._require(PAUSED, FINISHED, READY)
            if row is None:
                return store.take(self.owner, self.loaded, self.run.boundary_state(),
                                  self.run.cache, self.interventions)
            if not isinstance(self.run, BatchRun):
                raise InvalidArgumentError(
                    f"row={row!r:.40} picks a row of a batch call (generate([p1, ...])); this "
                    "session's generation is one sequence: checkpoint() takes no row")
            last = self.run.rows - 1
            if row == "all":
                rows = range(self.run.rows)
            elif type(row) is int:
                rows = [validation.integer(row, "row", 0, last)]
            else:
                raise InvalidArgumentError(f"row must be an int in 0..{last} or 'all', "
                                           f"got {type(row).__name__}")
            taken: list = []
            try:
                for b in rows:
                    state, cache, interventions = self.run.row_checkpoint(b, self.interventions)
                    taken.append(store.take(self.owner, self.loaded, state, cache, interventions))
            except BaseException:
                for ck in taken:
                    store.delete(ck.id, self.owner)
                raise
            return taken if row == "all" else taken[0]

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
        from kernel_server.model.sae import resolve_names
        with self._lock:
            self._require(PAUSED)
            args = dict(scale=scale, add=add, alpha=alpha, set=set, positions=positions,
                        edit=resolve_names(edit, self.saes))
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
        if writable and site == "resid_mid":
            raise InvalidArgumentError("resid_mid is read-only (the block adds the residual from its "
                                       "own reference: an edit there would reach the MLP only); read "
                                       "it with cache() or grad()")
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
              rows=None, sae=None, feature=None, clamp=None) -> dict:
        from kernel_server.model.sae import resolve_names
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if sae is not None:
                layer, site, add, edit = self._sae_rule(layer, site, sae, feature, clamp,
                                                        (scale, add, set, edit, head))
            elif feature is not None or clamp is not None:
                raise InvalidArgumentError("feature= and clamp= steer by an SAE feature: give sae= too")
            args = dict(scale=scale, add=add, alpha=alpha, set=set, positions=positions,
                        edit=resolve_names(edit, self.saes))
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

    def _sae_rule(self, layer, site, name, feature, clamp, others) -> tuple:
        """(layer, site, add, edit) of a rule on SAE feature ``feature``: ``add`` its decoder
        direction (times alpha), or with ``clamp`` an expression that sets the feature's
        activation to ``clamp`` and adds the SAE's reconstruction error back:
        ``decode(f with f[i] = clamp) + (h - decode(f))``, ``f = encode(h)``."""
        sae = self._sae_arg(name)
        if any(x is not None for x in others):
            raise InvalidEditError("steering by an SAE feature takes sae=, feature= and alpha= or "
                                   "clamp=; not scale=, add=, set=, edit= or head=")
        if feature is None:
            raise InvalidArgumentError("sae= needs feature= (the index of one of its features)")
        feature = validation.integer(feature, "feature", 0, sae.d_sae - 1)
        if layer is not None and layer != sae.layer:
            raise InvalidArgumentError(f"SAE {sae.name!r} reads layer {sae.layer}, not {layer!r:.40}")
        if site not in ("resid", sae.site):
            raise InvalidArgumentError(f"SAE {sae.name!r} reads site {sae.site!r}, not {site!r:.80}")
        if clamp is None:
            return sae.layer, sae.site, sae.direction(feature), None
        value = validation.number(clamp, "clamp", -1e6, 1e6)
        onehot = np.zeros(sae.d_sae, dtype=np.float32)
        onehot[feature] = 1.0
        h = {"op": "h"}
        f = {"op": "sae_encode", "sae": sae.name, "args": [h]}
        clamped = {"op": "where", "args": [{"op": "const", "value": onehot},
                                           {"op": "const", "value": float(value)}, f]}
        error = {"op": "sub", "args": [h, {"op": "sae_decode", "sae": sae.name, "args": [f]}]}
        edit = {"op": "add", "args": [{"op": "sae_decode", "sae": sae.name, "args": [clamped]}, error]}
        return sae.layer, sae.site, None, edit

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
