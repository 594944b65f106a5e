"""What the dashboard's buttons do on the server: every session call of a dashboard.

``SessionDriver`` owns the sessions (the main one, the baseline's, forks) and runs on
the worker thread only; it reads a ``Settings`` snapshot, never a widget, and writes
results into the ``DashboardState``. Generations without user breakpoints pause after
the last block on every decode step (an internal "progress" breakpoint; resuming with
no edit is exact), so the progress bar moves and Stop takes effect between steps.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

import djinn_nb as dj

from .state import CheckpointEntry, DashboardState, Settings

#: decode calls made per result to name the top-k tokens in the token view's hover
HOVER_NAMES_PER_RESULT = 200


class SessionDriver:
    """The dashboard's sessions and the jobs that drive them (see the module docstring)."""

    def __init__(self, state: DashboardState, worker, session, pool=None, model=None,
                 own_session: bool = False):
        self.state, self.worker = state, worker
        self.pool, self.model = pool, model
        self.cluster = isinstance(pool, dj.ClusterClient)
        if self.cluster and model is None:        # the cluster's name of the session's model
            self.model = pool.server_info.get("default_model")
        self.session, self.own_session = session, own_session
        self.client = session.client
        self.base_session = None
        self.forks: list = []
        self.session_key: Optional[tuple] = None     # (prompt, n) of the main session's run
        self.session_rule: Optional[str] = None

    def session_facts(self) -> dict:
        s = self.session
        return {"model": s.model, "layers": s.layers, "hidden": s.hidden_size, "dtype": s.dtype,
                "where": s.device if len(s.devices) < 2 else " + ".join(s.devices),
                "architecture": s.architecture, "id": s.id, "address": self.client.address,
                "server": self.client.address if self.pool is not None else None,
                # the picker's value: the server of a pool, the model of a cluster
                "pick": self.model if self.cluster else self.client.address}

    def choices(self) -> tuple:
        """(options, label) of the dashboard's picker: a pool's servers, a cluster's models;
        (None, None) without either."""
        if self.cluster:
            return list(self.pool.models()), "model"
        if self.pool is not None:
            return list(self.pool.addresses), "server"
        return None, None

    # ---- generation jobs ---------------------------------------------------------------
    def baseline(self, st: Settings) -> None:
        """Generate the baseline (no rules, no breakpoints) of the prompt."""
        if self.base_session is None:
            self.base_session = self.client.session(model=self.session.model)
        base = self.base_session
        self.state.start_run(st.max_new_tokens)
        self.state.say("baseline: generating")
        self.progress_breakpoint(base)
        ev = self.drive(base, self._generate(base, st), interactive=False)
        stopped = self.worker.stop_requested
        self._learn_names(ev.result)
        # a stopped (short) baseline is shown but made again before the next comparison
        self.state.set_baseline(ev.result, None if stopped else st.key, st.prompt)
        if not stopped:
            self.state.say(f"baseline: {len(ev.result.tokens)} tokens")

    def steered(self, st: Settings, interactive: bool) -> None:
        """The steered run: from the prompt with the picked breakpoints (``interactive``),
        or, for a slider move, from the latest usable checkpoint without breakpoints."""
        layers = sorted(st.layers) if interactive else []
        steps = st.steps() if layers else None    # rejected input: before any call
        self.ensure_baseline(st)
        if self.worker.stop_requested:
            return
        self.state.queue_behind_pause(None)       # this run uses the latest settings
        ck = None if interactive else self._usable_checkpoint(st)
        self.state.end_pause()
        if ck is not None:
            ev, label = self._from_checkpoint(ck, st), f"steered from {ck.label}"
        else:
            ev, label = self._from_prompt(st, layers, steps), "steered"
        if ev.finished:
            self.show_steered(ev.result, label, st.prompt)

    def regenerate(self, st: Settings) -> None:
        """A slider move: the steered run again, or, while paused, queued until the pause
        ends (Resume / Step / Scan to the end, or Stop, which drops it)."""
        if self.state.paused is not None:
            self.state.queue_behind_pause(st)
            self.state.say(f"steering changed to {st.rule_text()} while paused: it runs when "
                           "the pause ends (Resume, Step or Scan to the end; Stop drops it)")
            return
        self.steered(st, interactive=False)

    def _from_prompt(self, st: Settings, layers: list, steps):
        s = self.session
        if s.last_event is not None and s.last_event.paused:
            s.stop()    # an explicit Run steered abandons a paused generation
        self.apply_steering(s, st)
        s.clear_breakpoints()
        for layer in layers:
            s.breakpoint(layer, phase=st.bp_phase, steps=steps, site=st.bp_site)
        if not layers:
            s.breakpoint(s.layers - 1, phase="decode")
        self.session_key = st.key
        self.state.start_run(st.max_new_tokens, new_pauses=True)
        self.state.say(f"steered ({st.rule_text()}): generating")
        return self.drive(s, self._generate(s, st), interactive=bool(layers))

    def _from_checkpoint(self, ck: CheckpointEntry, st: Settings):
        s = self.session
        t0 = time.perf_counter()
        s.restore(ck.checkpoint)
        ck.restore_ms = (time.perf_counter() - t0) * 1e3
        self.apply_steering(s, st)
        self.progress_breakpoint(s)
        self.session_key = st.key
        self.state.start_run(st.max_new_tokens, start=ck.checkpoint.step)
        self.state.say(f"steered ({st.rule_text()}) from checkpoint {ck.label}")
        return self.drive(s, s.resume(), interactive=False)

    def step_or_resume(self, how: str) -> None:
        """From a pause (or a restored checkpoint): ``how`` is "step" or "resume"."""
        s = self.session
        if self.state.paused is None and not self.state.ready:
            self.state.say(f"nothing to {how}: Run steered with breakpoint layers picked, "
                           "or restore a checkpoint")
            return
        self.state.end_pause()
        ev = self.drive(s, s.step() if how == "step" else s.resume(), interactive=True)
        if ev.finished:
            self._pause_ended(ev.result, "steered")

    def scan(self) -> None:
        """Step through the remaining layers of the paused token, recording each norm."""
        s, ev = self.session, self.state.paused
        if ev is None:
            self.state.say("nothing paused: Run steered with breakpoint layers picked first")
            return
        while ev.paused and ev.layer < s.layers - 1 and not self.worker.stop_requested:
            ev = s.step()
            if ev.paused:
                self._show_pause(s, ev)
        if ev.finished:
            self.state.end_pause()
            self._pause_ended(ev.result, "steered")

    def stop(self) -> None:
        """Abandon a paused generation (its tokens so far become the steered result)."""
        dropped = self.state.pending is not None
        self.state.queue_behind_pause(None)
        note = " (the queued steering change was dropped)" if dropped else ""
        if self.state.paused is not None:
            ev = self.session.stop()
            self.state.end_pause()
            self.show_steered(ev.result, "steered (stopped)", None)
            n = len(ev.result.tokens)
            self.state.stopped(f"stopped: {n} token{'' if n == 1 else 's'} kept{note}")
        elif not self.state.activity.startswith("stopped") or note:
            self.state.stopped("stopped" + note)
        else:
            self.state.stopped(self.state.activity)

    def interrupt(self) -> None:
        """From the UI thread: end whichever of the dashboard's generations is running at its
        next step boundary (``Session.interrupt``, beside the worker's waiting call); the job
        then sees a finished (interrupted) run and ``stop()`` reports it."""
        for sess in (self.session, self.base_session, *self.forks):
            if sess is not None and not self.client.closed:
                _quietly(sess.interrupt)

    def _pause_ended(self, result, label: str) -> None:
        self.show_steered(result, label, None)
        pending = self.state.pending
        if pending is not None:     # a slider moved during the pause: run it now
            self.state.queue_behind_pause(None)
            self.steered(pending, interactive=False)

    # ---- helpers -------------------------------------------------------------------------
    def _generate(self, sess, st: Settings):
        return sess.generate(st.prompt, max_new_tokens=st.max_new_tokens, return_logits=True,
                             stop_at_eos=False)

    def ensure_baseline(self, st: Settings) -> None:
        if self.state.baseline is None or self.state.baseline_key != st.key:
            self.baseline(st)

    def apply_steering(self, sess, st: Settings) -> None:
        sess.clear_steering()
        if st.op == "scale":
            sess.steer(st.steer_layer, scale=float(st.scale), site=st.steer_site)
        else:
            v = np.random.default_rng(int(st.vector_seed)).standard_normal(
                sess.hidden_size).astype(np.float32)
            sess.steer(st.steer_layer, add=v / np.linalg.norm(v), alpha=float(st.alpha),
                       site=st.steer_site)
        if sess is self.session:
            self.session_rule = st.rule_text()

    def progress_breakpoint(self, sess) -> None:
        sess.clear_breakpoints()
        sess.breakpoint(sess.layers - 1, phase="decode")

    def drive(self, sess, ev, interactive: bool):
        """Follow ``ev`` to the end. Pauses are the user's when ``interactive`` (the session
        is left paused and shown), else the internal progress breakpoint: check Stop, move
        the progress bar, resume."""
        try:
            while ev.paused:
                if interactive:
                    self._show_pause(sess, ev)
                    return ev
                self.state.set_progress(ev.step)
                if self.worker.stop_requested:
                    ev = sess.stop()
                    steps = ev.result.steps
                    self.state.stopped(f"stopped at step {steps[-1].step if steps else 0}")
                    break
                ev = sess.resume()
        except BaseException:
            if not interactive and sess.last_event is not None and sess.last_event.paused:
                _quietly(sess.stop)
            raise
        finally:
            if not interactive:
                _quietly(sess.clear_breakpoints)
        self.state.set_progress(self.state.progress[1])
        return ev

    def _show_pause(self, sess, ev) -> None:
        norms = np.atleast_1d(sess.activation(reduce="norm"))
        if norms.ndim == 2:              # heads: [positions, heads] -> the whole row's norm
            norms = np.linalg.norm(norms, axis=-1)
        lens = sess.logit_lens(k=5) if ev.site in ("resid", "attn", "mlp") else None
        # an SAE the session loaded that reads this layer and site: its top features here
        sae = next((name for name, info in getattr(sess, "saes", {}).items()
                    if (info["layer"], info["site"]) == (ev.layer, ev.site)), None)
        feats = None if sae is None else sess.sae_features(sae=sae, k=5)
        self.state.set_pause(ev, norms, lens, feats)
        self.state.say(f"paused at layer {ev.layer}, step {ev.step}: "
                       "Step / Resume / Stop / Scan layers")

    def show_steered(self, result, label: str, prompt: Optional[str]) -> None:
        self._learn_names(result)
        if prompt is None and self.session_key is not None:
            prompt = self.session_key[0]
        self.state.set_steered(result, label, prompt)
        div = self.state.divergence
        self.state.say(f"{label}: {len(result.tokens)} tokens"
                       + (f", mismatch {div.mismatch_rate:.0%}" if div is not None else ""))

    def _learn_names(self, result) -> None:
        """Texts of the top-k ids of ``result`` for the hover (one decode call each, cached)."""
        names = self.state.token_texts
        for r in result.steps:
            names.setdefault(r.token_id, r.text)
        new = {int(i) for r in result.steps for i in r.top_ids} - names.keys()
        for i in sorted(new)[:HOVER_NAMES_PER_RESULT]:
            names[i] = self.session.decode([i])

    def _usable_checkpoint(self, st: Settings) -> Optional[CheckpointEntry]:
        """The latest checkpoint of this prompt that still has tokens to generate."""
        for e in reversed(self.state.checkpoints):
            if e.key == st.key and e.checkpoint.step < st.max_new_tokens:
                return e
        return None

    # ---- server and sessions -----------------------------------------------------------
    def refresh(self) -> None:
        """One round trip with no compute (the latency figure's round trip), the server's
        memory and its checkpoint list."""
        if self.client.closed:
            return
        try:
            ping = self.client.ping()
            devices = self.client.stats().get("devices")
            infos = self.client.checkpoints()
        except dj.DjinnError:
            return
        self.state.refreshed(ping, devices, infos)

    def switch(self, server, max_new_tokens: int) -> None:
        """Move to another server of the pool (another model of a cluster): a new session
        there, results start empty."""
        if self.pool is None:
            raise dj.InvalidArgumentError("this dashboard was not made from a pool (dj.connect([...]))")
        if self.cluster:                    # another model: placed by the directory
            if server == self.model:
                return
            session = self.pool.session(model=server)   # first: a failure changes nothing
            client, self.model = session.client, server
        else:
            client = self.pool.client(server)
            if client is self.client:
                return
            session = client.session(model=self.model)  # first: a failure changes nothing
        self.release()
        self.client, self.session, self.own_session = client, session, True
        self.session_key = self.session_rule = None
        self.state.reset(max_new_tokens, self.session_facts())
        self.state.emit(*("session", "results", "latency", "pause", "checkpoints", "status"))
        self.state.say(f"server {client.address}: session {session.id} on {session.model}")

    def release(self) -> None:
        """Close the sessions the dashboard opened."""
        owned = [self.base_session, *self.forks] + ([self.session] if self.own_session else [])
        for sess in owned:
            if sess is not None and not self.client.closed:
                _quietly(sess.close)
        self.base_session, self.forks = None, []


def _quietly(call) -> None:
    try:
        call()
    except dj.DjinnError:
        pass
