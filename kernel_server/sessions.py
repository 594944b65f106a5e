"""Server-side sessions: the state machine around one generation at a time.

States: idle -> running -> paused <-> running -> finished, and closed; restoring a
checkpoint leaves the session "ready": at a token boundary, where resume() continues.
Every method checks the state first and raises a typed error that changes nothing.
"""
from __future__ import annotations

import itertools
import threading
import uuid

import numpy as np
import torch

from djinn_nb.errors import (CheckpointError, LimitExceededError, NotPausedError, SessionBusyError,
                             SessionClosedError, UnknownSessionError, InvalidArgumentError)
from . import validation as V
from .checkpoints import Checkpoint, CheckpointStore, cache_from_host, copy_interventions
from .generation import (GenerationConfig, GenerationRun, GenState, apply_paused_edit,
                         install_layer_hooks)
from .interventions import Breakpoint, Interventions, SteeringRule
from .models import LoadedModel

IDLE, RUNNING, PAUSED, FINISHED, CLOSED = "idle", "running", "paused", "finished", "closed"
READY = "ready"   # restored to a token boundary; resume() continues from there


class Session:
    """One conversation's generation state on the server."""

    def __init__(self, loaded: LoadedModel, limits: V.Limits, owner: str):
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
            self._sync()
        return {"id": self.id, "state": self.state, **self.loaded.info(),
                "breakpoints": [b.describe() for b in self.interventions.breakpoints],
                "steering": [r.describe() for r in self.interventions.rules]}

    def _sync(self) -> None:
        """A paused run may have ended on its own (pause timeout): take its event now."""
        if self.state == PAUSED and self.run is not None and self.run.pause is None:
            event = self.run._events.get()
            self.state = FINISHED if event["event"] == "finished" else IDLE

    def _require(self, *states: str) -> None:
        self._sync()
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
            max_new = V.integer(max_new_tokens, "max_new_tokens", 1)
            if max_new > lim.max_new_tokens:
                raise LimitExceededError(f"max_new_tokens={max_new} is over the server limit "
                                         f"{lim.max_new_tokens} (--max-new-tokens)")
            config = GenerationConfig(
                max_new_tokens=max_new,
                temperature=V.number(temperature, "temperature", 0.0, 100.0),
                top_k=None if top_k is None else V.integer(top_k, "top_k", 1),
                top_p=None if top_p is None else V.number(top_p, "top_p", 0.0, 1.0),
                seed=None if seed is None else V.integer(seed, "seed", 0, 2**63 - 1),
                stop_at_eos=V.boolean(stop_at_eos, "stop_at_eos"),
                record_top_k=V.integer(record_top_k, "record_top_k", 1, 100),
                return_logits=V.boolean(return_logits, "return_logits"))
            ids = V.prompt_ids(prompt, self.loaded.tokenizer, V.boolean(chat, "chat"), lim,
                               self.loaded.vocab_size)
            self.run = GenerationRun(self.loaded, GenState.fresh(ids, config), self.interventions)
            self.run.pause_timeout = lim.pause_timeout_s
            self.state = RUNNING
            return self._after(self.run.start())

    def resume(self, ignore_breakpoints=False) -> dict:
        with self._lock:
            self._require(PAUSED, READY)
            if V.boolean(ignore_breakpoints, "ignore_breakpoints"):
                self.run.ignore_breakpoints = True
                self.run.refresh_hot_layers()
            return self._continue("resume")

    def step(self, to="layer") -> dict:
        """Run to the next layer boundary (``to="layer"``) or to the same layer of the next
        token (``to="token"``) and pause there, whatever the breakpoints say."""
        with self._lock:
            self._require(PAUSED, READY)
            V.choice(to, "to", ("layer", "token"))
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

    def stop(self) -> dict:
        """Abort a paused generation; the tokens so far are kept in the result."""
        with self._lock:
            self._require(PAUSED)
            return self._continue("abort")

    def _continue(self, what: str) -> dict:
        was_ready = self.state == READY
        self.state = RUNNING
        return self._after(self.run.start() if was_ready else self.run.command(what))

    def _after(self, event: dict) -> dict:
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
            cache = cache_from_host(ck, self.loaded)
            if self.state == PAUSED:
                self.run.command("abort")
            self.interventions = copy_interventions(ck.interventions)
            # new rules must not reuse the ids of the restored ones
            self._rule_ids = itertools.count(max((r.id for r in self.interventions.rules), default=0) + 1)
            self.run = GenerationRun(self.loaded, ck.state, self.interventions, cache=cache)
            self.run.pause_timeout = self.limits.pause_timeout_s
            self.state = READY
            return self.info()

    # ---- while paused -----------------------------------------------------------------
    def activation(self, positions="all", reduce=None) -> np.ndarray:
        with self._lock:
            self._require(PAUSED)
            point = self.run.pause
            pos = V.positions(positions)
            if reduce is not None:
                V.choice(reduce, "reduce", ("norm", "mean"))
            h = point.hidden[0]
            if pos == "last":
                h = h[-1:]
            elif isinstance(pos, tuple):
                V.positions_in_chunk(pos, point.start, h.shape[0])
                h = h[torch.tensor([p - point.start for p in pos], device=h.device)]
            with torch.inference_mode():
                if reduce == "norm":
                    h = h.float().norm(dim=-1)
                elif reduce == "mean":
                    h = h.float().mean(dim=0)
                return h.float().cpu().numpy()

    def edit(self, **args) -> dict:
        with self._lock:
            self._require(PAUSED)
            point = self.run.pause
            op = V.edit_op(args, self.loaded.hidden_size, self.loaded.device, self.loaded.dtype)
            V.check_rows_fit(op, point.start, int(point.hidden.shape[1]))
            apply_paused_edit(point, op)
            return {"edits": point.edits}

    # ---- breakpoints and steering ------------------------------------------------------
    def set_breakpoint(self, layer, phase="decode", steps=None) -> dict:
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            bp = Breakpoint(V.layer(layer, self.loaded.num_layers), V.choice(phase, "phase", V.PHASES),
                            V.steps(steps, self.limits))
            if bp not in self.interventions.breakpoints:
                self.interventions.breakpoints.append(bp)
            self._refresh()
            return bp.describe()

    def clear_breakpoints(self, layer=None) -> int:
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if layer is not None:
                V.layer(layer, self.loaded.num_layers)
            before = len(self.interventions.breakpoints)
            self.interventions.breakpoints = [b for b in self.interventions.breakpoints
                                              if layer is not None and b.layer != layer]
            self._refresh()
            return before - len(self.interventions.breakpoints)

    def steer(self, layer, phase="both", steps=None, **args) -> dict:
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            rule = SteeringRule(
                layer=V.layer(layer, self.loaded.num_layers),
                op=V.edit_op(args, self.loaded.hidden_size, self.loaded.device, self.loaded.dtype,
                             standing=True),
                phase=V.choice(phase, "phase", V.PHASES), steps=V.steps(steps, self.limits),
                id=next(self._rule_ids))
            self.interventions.rules.append(rule)
            self._refresh()
            return rule.describe()

    def clear_steering(self, rule_id=None) -> int:
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if rule_id is not None:
                V.integer(rule_id, "rule_id", 0)
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
    """All sessions of a server, each owned by the connection that opened it."""

    def __init__(self, limits: V.Limits):
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

    def close_all(self) -> int:
        with self._lock:
            everyone = list(self._sessions.values())
            self._sessions.clear()
        for s in everyone:
            s.close()
        return len(everyone)

    def count(self) -> int:
        return len(self._sessions)
