"""The generation executor: a KV-cache decode loop in a worker thread, with layer hooks
that can pause the forward pass mid-model until the client says resume.

The model's hooks (kernel_server.runtime.hooks, installed once per model) dispatch to the hook
target active in the calling thread: a run's worker makes its run the target for the whole
decode, so many sessions share one model without touching each other's breakpoints; a
layer no run cares about costs one attribute lookup and a set membership test.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import random
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from djinn_protocol.errors import DjinnError, LimitExceededError, ServerError
from kernel_server.runtime import fast_decode, scheduler, throughput
from kernel_server.model.interventions import EditOp, Interventions, apply_edit, apply_rule
from kernel_server.model.registry import LoadedModel

log = logging.getLogger("kernel_server.runtime.generation")
# Generation workers are reused: on CUDA the first forward pass in a new thread costs
# 60-90 ms (per-thread cuBLAS handles and workspaces; measured on an H200), a reused
# thread pays it once. A paused run holds its worker, so the pool is large.
MAX_WORKERS = 512
_WORKERS = concurrent.futures.ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="djinn-generation")
# generations running or paused at once, server-wide: below MAX_WORKERS, so a new run never
# waits in the pool's queue behind paused ones (a deadlock), it is refused instead
MAX_ACTIVE_RUNS = MAX_WORKERS - 16
_ACTIVE = threading.BoundedSemaphore(MAX_ACTIVE_RUNS)
# runs with a live worker; at interpreter exit the paused ones are aborted, else the
# executor's exit hook would wait forever on their workers (a server inside a notebook
# or a test process that ends while a generation is paused)
_LIVE: "weakref.WeakSet" = weakref.WeakSet()


def _abort_paused_runs_at_exit() -> None:
    for run in list(_LIVE):
        if run.pause is not None:
            run.abort()


# threading runs these hooks in reverse order of registration: this one before the
# executor's (registered when concurrent.futures.thread was imported above)
threading._register_atexit(_abort_paused_runs_at_exit)


class _Aborted(BaseException):
    """Raised inside a hook to unwind a paused forward pass (stop, close, disconnect,
    pause timeout); its argument is the stop reason."""


def install_layer_hooks(loaded: LoadedModel) -> None:
    """Install the dispatching hook on every decoder layer of ``loaded`` (idempotent):
    ``loaded.hooks.install_layers()``, done when a session opens on a model."""
    loaded.hooks.install_layers()


@dataclass
class GenerationConfig:
    max_new_tokens: int = 20
    temperature: float = 0.0          # 0: greedy
    top_k: int | None = None          # sampling filter
    top_p: float | None = None
    seed: int | None = None
    stop_at_eos: bool = True
    record_top_k: int = 5
    return_logits: bool = False


@dataclass
class GenState:
    """A run at a token boundary: enough to continue it bit for bit (checkpoints hold one)."""
    prompt_ids: list
    tokens: list
    step: int
    records: list
    logits: list               # numpy rows, one per step, when return_logits
    config: GenerationConfig
    seed: int
    rng_state: torch.Tensor | None = None   # the sampling generator's state (None: greedy/unused)

    @classmethod
    def fresh(cls, prompt_ids: list, config: GenerationConfig) -> "GenState":
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**63)
        return cls(list(prompt_ids), list(prompt_ids), 0, [], [], config, seed)

    @property
    def kv_length(self) -> int:
        """Positions in the KV cache at this boundary: all tokens but the last one, which
        is the input of the next forward pass (none before the prefill)."""
        return len(self.tokens) - 1 if self.step > 0 else 0


@dataclass
class PausePoint:
    """Where a run is paused: the hidden state of one layer, editable until resume."""
    layer: int
    step: int
    phase: str
    start: int                 # absolute position of row 0 of ``hidden``
    hidden: torch.Tensor       # [1, positions, width] (possibly already steered)
    edits: list = field(default_factory=list)
    site: str = "resid"        # see kernel_server.model.sites

    def event(self) -> dict:
        n = int(self.hidden.shape[1])
        return {"event": "paused", "layer": None if self.layer < 0 else self.layer,
                "site": self.site, "step": self.step, "phase": self.phase,
                "position": self.start + n - 1, "start": self.start, "positions": n,
                "hidden_size": int(self.hidden.shape[-1])}


class GenerationRun:
    """One generation: the token ids, the KV cache (never leaves this object), per-step
    records, and the worker thread that drives the decode loop.

    The run is the model's hook target (``kernel_server.runtime.hooks.HookTarget``) in its worker
    thread: ``hot_layers`` / ``hot_sites`` say where its rules and breakpoints are, and
    ``on_site`` applies the rules and pauses. The service thread talks to it through
    ``start``, ``command``, ``abort`` and ``next_event``."""

    def __init__(self, loaded: LoadedModel, state: GenState, interventions: Interventions,
                 cache=None):
        self.loaded = loaded
        self.config = state.config
        self.interventions = interventions
        self.prompt_ids = list(state.prompt_ids)
        self.tokens: list[int] = list(state.tokens)
        self.step = state.step
        self._records: list[dict] = list(state.records)
        self._raw_records: list[tuple] = []     # steps not yet turned into dicts (see records)
        self.logits: list = list(state.logits)
        self.seed = state.seed
        self.cache = cache           # None: a new, empty cache (the run starts with the prefill)
        self.generator = None
        if self.config.temperature > 0:
            self.generator = torch.Generator(device=loaded.device).manual_seed(self.seed)
            if state.rng_state is not None:
                self.generator.set_state(state.rng_state)
        self.stop_reason: str | None = None
        self.interrupted = threading.Event()     # set by interrupt(): stop at the next step
        self.pause_timeout: float | None = None   # seconds a pause may last (None: forever)
        self.ignore_breakpoints = False
        self.step_target: tuple | None = None    # one-shot pause at (layer, step)
        self.pause: PausePoint | None = None
        self.hot_layers: frozenset = frozenset()
        self.hot_sites: frozenset = frozenset()    # (layer, site) off the residual stream
        self._events: queue.Queue = queue.Queue()
        self._commands: queue.Queue = queue.Queue()
        self._deliver = None         # one-shot: the next event goes here, not to _events
        self._fast = None            # the fast-decode path of this run (kernel_server.runtime.fast_decode)
        self._member = None          # its row in the model's decode scheduler (kernel_server.runtime.scheduler)
        self._future = None
        self._phase = "prefill"
        self._fired_breaks: list[int] = []
        self._fired_rules: list[int] = []
        self._paused_s = 0.0
        self.refresh_hot_layers()

    @property
    def records(self) -> list[dict]:
        """One dict per step. The decode loop keeps each step as a raw tuple (the top-k as
        tensors where they were computed); the dicts, the token texts and the top-k lists are
        made here, when somebody reads them (the result, a checkpoint): nothing of this runs
        between a step's forward pass and the next one, and the top-k of all pending steps
        come to the host in one copy."""
        raw = self._raw_records
        if raw:
            self._raw_records = []
            with torch.inference_mode():
                ids = torch.stack([r[2] for r in raw]).tolist()
                probs = torch.stack([r[3] for r in raw]).tolist()
            decode = self.loaded.tokenizer.decode
            self._records += [
                {"step": step, "token_id": token_id, "text": decode([token_id]),
                 "top_ids": top_ids, "top_probs": top_probs, "forward_ms": forward_ms,
                 "paused_ms": paused_ms, "breakpoints": breaks, "rules": rules}
                for (step, token_id, _, _, forward_ms, paused_ms, breaks, rules), top_ids, top_probs
                in zip(raw, ids, probs)]
        return self._records

    def boundary_state(self) -> GenState:
        """The state at the start of the current step (mid-forward: before this token)."""
        rng = self.generator.get_state() if self.generator is not None else None
        return GenState(self.prompt_ids, list(self.tokens), self.step, self.records[:self.step],
                        self.logits[:self.step], self.config, self.seed, rng)

    # ---- control, called from the service thread ----------------------------------
    def refresh_hot_layers(self) -> None:
        live = list(self.interventions.rules)
        if not self.ignore_breakpoints:
            live += self.interventions.breakpoints
        # a block with any site in use counts as hot (a fast path then runs it eagerly)
        layers = set(x.layer for x in live)
        if self.step_target is not None:
            layers.add(self.step_target[0])
        self.hot_sites = frozenset((x.layer, x.site) for x in live if x.site != "resid")
        self.hot_layers = frozenset(layers)

    def start(self) -> dict:
        if not _ACTIVE.acquire(blocking=False):
            return {"event": "error", "error": LimitExceededError(
                f"{MAX_ACTIVE_RUNS} generations are already running or paused on this server; "
                "resume, stop or close some first")}
        _LIVE.add(self)
        try:
            self._future = _WORKERS.submit(self._worker)
        except BaseException:
            _ACTIVE.release()
            raise
        return self._events.get()

    def command(self, what: str, deliver=None) -> dict | None:
        """Send ``resume`` / ``abort`` to the paused worker and wait for its next event.
        With ``deliver``: return None at once; the worker calls ``deliver(event)`` itself,
        in its own thread, when the event happens (the control channel's direct reply: the
        thread that computed the next pause answers the client, no hand-off back)."""
        self.pause = None
        self._deliver = deliver
        self._commands.put(what)
        return self._events.get() if deliver is None else None

    def interrupt(self) -> None:
        """Stop at the next step boundary, from any thread, without waiting (the notebook's
        interrupt): the run finishes with ``stop_reason`` "interrupted" and the tokens so far.
        A paused run is not interrupted: ``stop()`` ends it."""
        self.interrupted.set()

    def abort(self) -> None:
        """Tell a paused worker to unwind, without waiting: its final event follows (to the
        pending ``deliver``, else for ``next_event``)."""
        self._commands.put("abort")

    def next_event(self) -> dict:
        """Wait for the worker's next event and take it: how a session learns the end of a
        run that stopped on its own while paused (a pause timeout)."""
        return self._events.get()

    def add_fired_rules(self, rule_ids) -> None:
        """Note rules applied on this step outside the hooks (fast decode's graph step):
        the step record lists them."""
        self._fired_rules.extend(rule_ids)

    def _emit(self, event: dict) -> None:
        deliver, self._deliver = self._deliver, None
        if deliver is None:
            self._events.put(event)
            return
        try:
            deliver(event)
        except Exception:        # (it sends on a socket: never let that kill the worker)
            log.exception("delivering a generation event failed")

    # ---- the worker -------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            with self.loaded.hooks.active(self), torch.inference_mode():
                try:
                    self._decode_loop()
                finally:   # the KV cache leaves its static slot / lane row before any event
                    if self._fast is not None:
                        self._fast.close()
                    if self._member is not None:
                        member, self._member = self._member, None
                        member.scheduler.leave(member)
            event = self.finished_event()
        except _Aborted as why:
            self.stop_reason = str(why.args[0]) if why.args else "stopped"
            event = self.finished_event()
        except DjinnError as exc:
            event = {"event": "error", "error": exc}
        except Exception as exc:  # a bug or a model failure: report it, keep the server up
            event = {"event": "error",
                     "error": ServerError(f"generation failed: {type(exc).__name__}: {exc}")}
        finally:
            _ACTIVE.release()
        self._emit(event)      # (last: the slot is free when the client hears of the end)

    def _decode_loop(self) -> None:
        from transformers import DynamicCache
        loaded, cfg = self.loaded, self.config
        model, device = loaded.model, loaded.device
        if self.cache is None:
            self.cache = DynamicCache(config=model.config)
        eos = _eos_ids(loaded)
        # the model's decode scheduler batches the decode steps of every run (None: off)
        sched = scheduler.scheduler_for(loaded)
        # None: fast decode off (CPU default) or the scheduler runs the decode steps
        fast = self._fast = fast_decode.attach(self) if sched is None else None
        # the prefill feeds the whole prompt; a restored run feeds its last token
        next_input = torch.tensor([self.tokens if self.step == 0 else self.tokens[-1:]], device=device)
        while self.step < cfg.max_new_tokens:
            if self.interrupted.is_set():          # (a step boundary: the cache is whole)
                self.stop_reason = "interrupted"
                return
            self._phase = "prefill" if self.step == 0 else "decode"
            self._fired_breaks, self._fired_rules, self._paused_s = [], [], 0.0
            mask = torch.ones((1, len(self.tokens)), dtype=torch.long, device=device)
            t0 = time.perf_counter()
            if sched is not None and self.step > 0:
                # a row of the batched step, or the same shape outside it (may pause);
                # the scheduler takes the compute lock itself
                if self._member is None:
                    self._member = sched.join(self)
                logits = self._member.forward(next_input)
                token = self._pick(logits)
                top_p, top_i = torch.softmax(logits.float(), dim=-1).topk(cfg.record_top_k)
                token_id = int(token)
            else:
                # on the engine a long prompt is prefilled in chunks between the running
                # rows' steps (None: one forward, below)
                chunked = sched.prefill(self, next_input) if sched is not None and self.step == 0 else None
                with loaded.compute_lock:
                    # a CUDA-graph step on a static cache, or None: the eager forward below
                    logits = chunked if chunked is not None else (
                        fast.forward(next_input) if fast is not None else None)
                    if logits is None:
                        out = model(input_ids=next_input, attention_mask=mask, use_cache=True,
                                    logits_to_keep=1, **{loaded.cache_kwarg: self.cache})
                        logits = out.logits[:, -1, :]
                    token = self._pick(logits)
                    top_p, top_i = torch.softmax(logits.float(), dim=-1).topk(cfg.record_top_k)
                    token_id = int(token)          # the one host sync of a step
            t1 = time.perf_counter()
            if cfg.return_logits:
                self.logits.append(logits[0].float().cpu().numpy())
            self.tokens.append(token_id)
            paused_ms = self._paused_s * 1e3
            self._raw_records.append((self.step, token_id, top_i[0], top_p[0],
                                      (t1 - t0) * 1e3 - paused_ms, paused_ms,
                                      self._fired_breaks, self._fired_rules))
            self.step += 1
            throughput.count(loaded.name)          # the load record's tokens/s (cluster)
            next_input = token.view(1, 1)
            if cfg.stop_at_eos and token_id in eos:
                self.stop_reason = "eos"
                return
        self.stop_reason = "length"

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.temperature <= 0:
            return logits.argmax(dim=-1)[0]
        scores = logits.float() / cfg.temperature
        if cfg.top_k:
            kth = scores.topk(min(cfg.top_k, scores.shape[-1])).values[..., -1, None]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            sorted_scores, order = scores.sort(descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum - sorted_scores.softmax(-1) > cfg.top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0, 0]

    # ---- called by the model's hooks, in the worker thread --------------------------------
    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        """The rules and breakpoints of (``layer``, ``site``) on this step: the edited
        tensor, or None when nothing changed it."""
        start = len(self.tokens) - hidden.shape[1]
        new = self.apply_rules(layer, site, hidden)
        if self._should_pause(layer, site):
            self._fired_breaks.append(layer)
            new = self._wait_while_paused(PausePoint(layer, self.step, self._phase, start, new,
                                                     site=site))
        return None if new is hidden else new

    def apply_rules(self, layer: int, site: str, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` with the standing rules of (``layer``, ``site``) on this step applied
        (the same tensor when none fires); the decode scheduler calls it on this run's row."""
        start = len(self.tokens) - hidden.shape[1]
        new = hidden
        for rule in self.interventions.rules:
            if rule.site == site and rule.matches(layer, self.step, self._phase):
                new = apply_rule(new, rule, start)
                self._fired_rules.append(rule.id)
        return new

    def _should_pause(self, layer: int, site: str = "resid") -> bool:
        target = self.step_target
        if site == "resid" and target is not None and target == (layer, self.step):
            self.step_target = None
            self.refresh_hot_layers()
            return True
        if self.ignore_breakpoints:
            return False
        return any(b.site == site and b.matches(layer, self.step, self._phase)
                   for b in self.interventions.breakpoints)

    def _wait_while_paused(self, point: PausePoint) -> torch.Tensor:
        lock = self.loaded.compute_lock
        self.pause = point
        t0 = time.perf_counter()
        lock.release()              # other sessions may compute while this one waits
        try:
            self._emit(point.event())
            try:
                what = self._commands.get(timeout=self.pause_timeout)
            except queue.Empty:           # nobody came back: give the worker and memory back
                self.pause = None
                what = "pause_timeout"
        finally:
            lock.acquire()
            self._paused_s += time.perf_counter() - t0
        if what == "abort":
            raise _Aborted("stopped")
        if what == "pause_timeout":
            raise _Aborted("pause_timeout")
        return point.hidden

    # ---- results ------------------------------------------------------------------------
    def finished_event(self) -> dict:
        return {"event": "finished", "result": self.result()}

    def result(self) -> dict:
        generated = self.tokens[len(self.prompt_ids):]
        res = {
            "tokens": generated, "prompt_tokens": self.prompt_ids,
            "text": self.loaded.tokenizer.decode(generated), "steps": self.records,
            "stop_reason": self.stop_reason, "seed": self.seed, "model": self.loaded.name,
        }
        if self.config.return_logits:
            import numpy as np
            res["logits"] = (np.stack(self.logits) if self.logits
                             else np.zeros((0, self.loaded.vocab_size), dtype="float32"))
        return res


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids = loaded.model.generation_config.eos_token_id if loaded.model.generation_config else None
    if ids is None:
        ids = loaded.tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}


def apply_paused_edit(point: PausePoint, op: EditOp) -> None:
    """Apply ``op`` to the paused hidden state now (the client sees it in ``activation()``)."""
    with torch.inference_mode():
        point.hidden = apply_edit(point.hidden, op, point.start)
    point.edits.append(op.describe())
