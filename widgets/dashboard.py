"""The steering dashboard: one ipywidgets panel over a ``djinn_nb.Session``.

Pick breakpoint layers, slide a steering scale, run baseline and steered generations,
step through paused layers, take / restore / fork checkpoints, and watch token
divergence and latency in live plotly ``FigureWidget``s.

All server work runs on one background worker thread, one job at a time, so the
notebook never freezes; generations without user breakpoints pause after the last
block on every decode step (an internal "progress" breakpoint; resuming with no edit
is exact) so that the progress bar moves and Stop takes effect between steps.
Slider moves coalesce: only the latest value is generated. Every error is caught and
shown in the dashboard's message area.
"""
from __future__ import annotations

import html
import threading
import time
from typing import Callable, Optional

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

import djinn_nb as dj
from djinn_nb import plots


#: sites the pickers offer (see kernel_server.sites; module paths through the API)
SITES = ("resid", "attn", "mlp", "heads")


def _copy_figure(target: go.FigureWidget, source: go.Figure) -> None:
    """Copy the data of ``source``'s traces into ``target``'s (same traces, same order)."""
    with target.batch_update():
        for tw, t in zip(target.data, source.data):
            for key in ("x", "y", "z"):
                if key in t:
                    tw[key] = t[key]
        target.layout.title.text = source.layout.title.text


class Dashboard(W.VBox):
    """``dj.Dashboard(session_or_client)``: the dashboard widget (display it in a cell).

    With a ``Client`` a session on ``model`` (default: the server's default) is opened.
    The baseline runs in a second session on the same model, with no rules or breakpoints.
    The buttons, and the methods of the same names (``run_baseline()``, ``run_steered()``,
    ``step()``, ``resume()``, ``stop()``, ``scan_layers()``, ``take_checkpoint()``,
    ``restore_checkpoint()``, ``fork_checkpoint()``), queue work on the worker thread;
    ``wait()`` blocks until it is done. Results: ``baseline``, ``steered`` (both
    ``GenerationResult``), ``divergence`` (``dj.Divergence``), ``paused`` (``dj.Paused``).
    """

    def __init__(self, session_or_client, *, model: Optional[str] = None,
                 prompt: str = "The capital of France is", max_new_tokens: int = 16,
                 breakpoint_layers=(), steer_layer: Optional[int] = None, op: str = "scale",
                 scale: float = 1.0, alpha: float = 0.5, vector_seed: int = 0,
                 background: bool = True, server=None):
        # a Pool (dj.connect([...])): a session on ``server`` (default the first); the
        # "server" dropdown moves the dashboard to another server of the pool
        self.pool = session_or_client if isinstance(session_or_client, dj.Pool) else None
        self._model = model
        if self.pool is not None:
            session_or_client = self.pool.client(server)
        if isinstance(session_or_client, dj.Session):
            self.session, self._own_session = session_or_client, False
        elif isinstance(session_or_client, dj.Client):
            self.session, self._own_session = session_or_client.session(model=model), True
        else:
            raise TypeError("Dashboard needs a djinn_nb Session, Client or Pool, got "
                            f"{type(session_or_client).__name__}")
        self.client = self.session.client
        s = self.session
        L = s.layers
        self.background = background
        # results and state (written only by the worker)
        self.baseline = None            # GenerationResult of the baseline session
        self._baseline_key = None       # (prompt, max_new_tokens) it was made for
        self.steered = None             # GenerationResult shown as "steered"
        self.steered_label = "steered"
        self.divergence = None          # dj.Divergence(baseline, steered)
        self.paused = None              # dj.Paused while the main session is paused for the user
        self.ready = False              # after restore(): resume()/step() continue
        self.last_error: Optional[BaseException] = None
        self.checkpoints: list = []     # [{"checkpoint", "key", "label", "dispatch_ms", ...}]
        self.forks: list = []           # sessions made by fork_checkpoint()
        self.norms: dict = {}           # (layer, step) -> activation norm of that step's token
        self._base_session = None
        self._session_key = None        # (prompt, max_new_tokens) of the main session's generation
        # the worker
        self._jobs: list = []
        self._jobs_lock = threading.Lock()
        self._worker: Optional[threading.Thread] = None
        self._idle = threading.Event()
        self._idle.set()
        self._stop_requested = threading.Event()

        # ---- controls -------------------------------------------------------------------
        wide = W.Layout(width="auto")
        self.info = W.HTML(self._info_html())
        self.server_picker = None
        if self.pool is not None:
            self.server_picker = W.Dropdown(options=self.pool.addresses, value=self.client.address,
                                            description="server", layout=W.Layout(width="320px"))
            self.server_picker.observe(lambda ch: self.switch_server(ch["new"]), names="value")
        self.memory_view = W.HTML("")     # memory per device of the server (client.stats())
        self.prompt = W.Textarea(value=prompt, description="prompt", rows=2,
                                 layout=W.Layout(width="60%"))
        self.max_new_tokens = W.BoundedIntText(value=max_new_tokens, min=1, max=10**6,
                                               description="new tokens", layout=W.Layout(width="180px"))
        self.layer_picker = W.SelectMultiple(options=list(range(L)), value=tuple(breakpoint_layers),
                                             rows=min(L, 6), description="break at",
                                             layout=W.Layout(width="180px"))
        self.bp_site = W.Dropdown(options=list(SITES), value="resid", description="site",
                                  tooltip="where in the block to pause", layout=W.Layout(width="180px"))
        self.bp_phase = W.Dropdown(options=["decode", "prefill", "both"], value="decode",
                                   description="phase", layout=W.Layout(width="180px"))
        self.bp_steps = W.Text(value="", placeholder="all, or e.g. 3,5", description="steps",
                               layout=W.Layout(width="180px"))
        self.steer_layer = W.Dropdown(options=list(range(L)),
                                      value=L // 2 if steer_layer is None else steer_layer,
                                      description="steer layer", layout=W.Layout(width="180px"))
        self.steer_site = W.Dropdown(options=list(SITES), value="resid", description="steer site",
                                     layout=W.Layout(width="180px"))
        self.steer_op = W.ToggleButtons(options=["scale", "add"], value=op, description="op",
                                        tooltips=["h <- scale * h",
                                                  "h <- h + alpha * v (v: seeded random unit vector)"],
                                        style={"button_width": "60px"})
        self.scale = W.FloatSlider(value=scale, min=0.0, max=2.0, step=0.05, description="scale",
                                   continuous_update=False, readout_format=".2f")
        self.alpha = W.FloatSlider(value=alpha, min=-4.0, max=4.0, step=0.05, description="alpha",
                                   continuous_update=False, readout_format=".2f")
        self.vector_seed = W.BoundedIntText(value=vector_seed, min=0, max=2**31 - 1,
                                            description="vector seed", layout=W.Layout(width="180px"))
        self.auto = W.Checkbox(value=True, description="re-run steered when the slider moves",
                               indent=False)

        def button(text, icon, handler, style=""):
            b = W.Button(description=text, icon=icon, button_style=style,
                         layout=W.Layout(width="auto"))
            b.on_click(lambda _: handler())
            return b

        self.run_baseline_button = button("Run baseline", "play", self.run_baseline)
        self.run_steered_button = button("Run steered", "play", self.run_steered, "primary")
        self.step_button = button("Step", "step-forward", self.step)
        self.resume_button = button("Resume", "forward", self.resume)
        self.stop_button = button("Stop", "stop", self.stop, "danger")
        self.scan_button = button("Scan layers", "list", self.scan_layers)
        self.take_button = button("Take checkpoint", "camera", self.take_checkpoint)
        self.restore_button = button("Restore", "undo", self.restore_checkpoint)
        self.fork_button = button("Fork + run", "code-branch", self.fork_checkpoint)
        self.checkpoint_list = W.Select(options=[], rows=4, description="checkpoints",
                                        layout=W.Layout(width="420px"))
        self.progress = W.IntProgress(value=0, min=0, max=max_new_tokens, description="idle",
                                      layout=W.Layout(width="320px"))
        self.status = W.HTML("")
        self.message = W.HTML("")
        self.token_view = W.HTML(plots.token_table())
        self.paused_info = W.HTML("<i>not paused: pick breakpoint layers and Run steered</i>")
        self.lens_view = W.HTML("")       # logit lens of the paused hidden state

        self.div_fig = go.FigureWidget(plots.divergence())
        self.lat_fig = go.FigureWidget(plots.latency())
        self.norm_fig = go.FigureWidget(plots.activation_norms())
        self.heat_fig = go.FigureWidget(plots.layer_heatmap(layers=L, steps=max_new_tokens))
        for f in (self.norm_fig, self.heat_fig):
            f.update_layout(width=520)

        for w in (self.scale, self.alpha, self.steer_op, self.steer_layer, self.steer_site,
                  self.vector_seed):
            w.observe(self._on_steering_change, names="value")

        box = lambda title, *children: W.VBox(  # noqa: E731
            [W.HTML(f"<b>{title}</b>"), *children],
            layout=W.Layout(border="1px solid #ddd", padding="4px", margin="2px"))
        super().__init__([
            W.HBox([self.server_picker, self.info]) if self.server_picker is not None else self.info,
            W.HBox([self.prompt, self.max_new_tokens]),
            W.HBox([box("breakpoints", self.layer_picker, self.bp_site, self.bp_phase, self.bp_steps),
                    box("steering", self.steer_layer, self.steer_site, self.steer_op, self.scale, self.alpha,
                        self.vector_seed, self.auto),
                    box("checkpoints", self.checkpoint_list,
                        W.HBox([self.take_button, self.restore_button, self.fork_button]))]),
            W.HBox([self.run_baseline_button, self.run_steered_button, self.step_button,
                    self.resume_button, self.stop_button, self.scan_button]),
            W.HBox([self.progress, self.status]),
            self.memory_view,
            self.message,
            self.token_view,
            self.div_fig,
            self.lat_fig,
            box("paused state", self.paused_info, self.lens_view,
                W.HBox([self.norm_fig, self.heat_fig])),
        ], layout=W.Layout(width="100%"))
        self.add_class("djinn-dashboard")
        self.memory_view.value = _memory_html(self.client.stats().get("devices"))

    # ---- public actions (queue work on the worker) ------------------------------------
    def run_baseline(self):
        """Generate the baseline (no rules, no breakpoints) of the prompt."""
        self._submit("baseline", self._do_baseline)

    def run_steered(self):
        """Generate with the panel's steering rule from the prompt; with breakpoint layers
        picked it pauses at the first one (then Step / Resume / Stop / Scan layers)."""
        self._submit("steered", lambda: self._do_steered(interactive=True))

    def regenerate(self):
        """What a slider move does: the steered run again, from the latest usable
        checkpoint when there is one, else from the prompt; breakpoints are not used."""
        self._submit("regenerate", lambda: self._do_steered(interactive=False), coalesce=True)

    def step(self):
        """From a pause (or a restored checkpoint): pause again after the next layer."""
        self._submit("step", lambda: self._do_continue("step"))

    def resume(self):
        """From a pause (or a restored checkpoint): run to the next pause or the end."""
        self._submit("resume", lambda: self._do_continue("resume"))

    def scan_layers(self):
        """Step through the remaining layers of the paused token, recording each norm."""
        self._submit("scan", self._do_scan)

    def stop(self):
        """Drop queued work, stop the running generation at its next step, and abandon a
        paused one (its tokens so far become the steered result)."""
        self._stop_requested.set()
        with self._jobs_lock:
            self._jobs.clear()
        self._submit("stop", self._do_stop)

    def take_checkpoint(self):
        """Checkpoint the main session now (paused, finished or restored)."""
        self._submit("checkpoint", self._do_take)

    def restore_checkpoint(self, checkpoint=None):
        """Rewind the main session to the selected (or given) checkpoint."""
        self._submit("restore", lambda: self._do_restore(checkpoint))

    def fork_checkpoint(self, checkpoint=None):
        """Fork the selected (or given) checkpoint into a new session, apply the panel's
        steering rule there and run it to the end; its result is shown as "steered"."""
        self._submit("fork", lambda: self._do_fork(checkpoint))

    def wait(self, timeout: float = 120.0) -> "Dashboard":
        """Block until the queued work is done."""
        if not self._idle.wait(timeout):
            raise TimeoutError(f"the dashboard was still busy after {timeout} s")
        return self

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def switch_server(self, server) -> None:
        """(Given a Pool) move the dashboard to another server of the pool: the sessions it
        opened on the current one are closed, a new session opens there; results and the
        checkpoint list start empty."""
        self._submit("server", lambda: self._do_switch(server))

    def close_sessions(self) -> None:
        """Close the sessions the dashboard opened (baseline, forks, and the main session
        when it was opened from a client). The widget stays displayed."""
        self.wait()
        self._release_sessions()

    def _release_sessions(self) -> None:
        owned = [self._base_session, *self.forks] + ([self.session] if self._own_session else [])
        for sess in owned:
            if sess is not None and not self.client.closed:
                try:
                    sess.close()
                except dj.DjinnError:
                    pass
        self._base_session, self.forks = None, []

    # ---- the worker ---------------------------------------------------------------------
    def _submit(self, name: str, fn: Callable[[], None], coalesce: bool = False) -> None:
        if not self.background:
            self._run_job(name, fn)
            return
        with self._jobs_lock:
            if coalesce:
                self._jobs = [j for j in self._jobs if j[0] != name]
            self._jobs.append((name, fn))
            if self._worker is None:
                self._idle.clear()
                self._worker = threading.Thread(target=self._work, name="djinn-dashboard",
                                                daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            with self._jobs_lock:
                if not self._jobs:
                    self._worker = None
                    self._idle.set()
                    return
                name, fn = self._jobs.pop(0)
            self._run_job(name, fn)

    def _run_job(self, name: str, fn: Callable[[], None]) -> None:
        self.progress.description = name
        self.progress.bar_style = "info"
        self.message.value = ""
        try:
            fn()
        except dj.DjinnError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug of ours must not break the widget either
            self._fail(exc, unexpected=True)
        else:
            if not self.message.value:
                self.progress.bar_style = ""
        finally:
            self.progress.description = "idle"

    def _fail(self, exc: BaseException, unexpected: bool = False) -> None:
        self.last_error = exc
        kind = ("unexpected " if unexpected else "") + type(exc).__name__
        self.message.value = (
            '<div class="dj-error" style="color:#a00;background:#fee;border:1px solid #e99;'
            f'padding:4px">{html.escape(kind)}: {html.escape(str(exc))}</div>')
        self.progress.bar_style = "danger"

    def _say(self, text: str) -> None:
        self.status.value = html.escape(text)

    # ---- helpers ------------------------------------------------------------------------
    def _key(self):
        return (self.prompt.value, int(self.max_new_tokens.value))

    def _vector(self) -> np.ndarray:
        v = np.random.default_rng(int(self.vector_seed.value)).standard_normal(
            self.session.hidden_size).astype(np.float32)
        return v / np.linalg.norm(v)

    def _rule_text(self) -> str:
        where = f"layer {self.steer_layer.value}" + (
            "" if self.steer_site.value == "resid" else f" ({self.steer_site.value})")
        if self.steer_op.value == "scale":
            return f"scale {self.scale.value:.2f} at {where}"
        return f"add {self.alpha.value:.2f} * v(seed {self.vector_seed.value}) at {where}"

    def _apply_steering(self, sess) -> None:
        sess.clear_steering()
        site = self.steer_site.value
        if self.steer_op.value == "scale":
            sess.steer(self.steer_layer.value, scale=float(self.scale.value), site=site)
        else:
            sess.steer(self.steer_layer.value, add=self._vector(), alpha=float(self.alpha.value),
                       site=site)

    def _steps(self):
        text = self.bp_steps.value.strip()
        if not text:
            return None
        try:
            return [int(x) for x in text.replace(" ", ",").split(",") if x]
        except ValueError:
            raise dj.InvalidArgumentError(f"breakpoint steps must be integers like 3,5; got {text!r}") \
                from None

    def _generate(self, sess):
        return sess.generate(self.prompt.value, max_new_tokens=int(self.max_new_tokens.value),
                             return_logits=True, stop_at_eos=False)

    def _drive(self, sess, ev, interactive: bool):
        """Follow ``ev`` to the end. Pauses are the user's when ``interactive`` (the
        session is left paused and shown), else the internal progress breakpoint:
        check Stop, move the progress bar, resume."""
        try:
            while ev.paused:
                if interactive:
                    self._show_pause(sess, ev)
                    return ev
                self.progress.value = ev.step
                if self._stop_requested.is_set():
                    ev = sess.stop()
                    self._say(f"stopped at step {ev.result.steps[-1].step if ev.result.steps else 0}")
                    break
                ev = sess.resume()
        except BaseException:
            if sess.last_event is not None and sess.last_event.paused and not interactive:
                try:
                    sess.stop()
                except dj.DjinnError:
                    pass
            raise
        finally:
            if not interactive:
                try:
                    sess.clear_breakpoints()
                except dj.DjinnError:
                    pass
        self.progress.value = self.progress.max
        return ev

    def _with_progress_breakpoint(self, sess) -> None:
        sess.clear_breakpoints()
        sess.breakpoint(sess.layers - 1, phase="decode")

    def _ensure_baseline(self) -> None:
        if self.baseline is None or self._baseline_key != self._key():
            self._do_baseline()

    # ---- jobs ---------------------------------------------------------------------------
    def _do_baseline(self) -> None:
        self._stop_requested.clear()
        if self._base_session is None:
            self._base_session = self.client.session(model=self.session.model)
        base = self._base_session
        self.progress.max = int(self.max_new_tokens.value)
        self.progress.value = 0
        self._say("baseline: generating")
        self._with_progress_breakpoint(base)
        key = self._key()
        ev = self._drive(base, self._generate(base), interactive=False)
        stopped = self._stop_requested.is_set()
        # a stopped (short) baseline is shown but made again before the next comparison
        self.baseline, self._baseline_key = ev.result, None if stopped else key
        self._say(f"baseline: {len(ev.result.tokens)} tokens" + (" (stopped)" if stopped else ""))
        self._refresh_results()

    def _do_steered(self, interactive: bool) -> None:
        self._stop_requested.clear()
        self._ensure_baseline()
        if self._stop_requested.is_set():
            return
        s = self.session
        self.paused, self.ready = None, False
        self.progress.max = int(self.max_new_tokens.value)
        ck = None if interactive else self._usable_checkpoint()
        layers = sorted(self.layer_picker.value) if interactive else []
        if ck is not None:
            t0 = time.perf_counter()
            s.restore(ck["checkpoint"])
            ck["restore_ms"] = (time.perf_counter() - t0) * 1e3
            self._apply_steering(s)
            self._with_progress_breakpoint(s)
            self.progress.value = ck["checkpoint"].step
            self._say(f"steered ({self._rule_text()}) from checkpoint {ck['label']}")
            ev = self._drive(s, s.resume(), interactive=False)
            self.steered_label = f"steered from {ck['label']}"
        else:
            if s.last_event is not None and s.last_event.paused:
                s.stop()    # abandon a paused generation before starting anew
            self._apply_steering(s)
            s.clear_breakpoints()
            if layers:
                steps = self._steps()
                for layer in layers:
                    s.breakpoint(layer, phase=self.bp_phase.value, steps=steps,
                                 site=self.bp_site.value)
            else:
                s.breakpoint(s.layers - 1, phase="decode")
            self.norms = {}
            self._session_key = self._key()
            self.progress.value = 0
            self._say(f"steered ({self._rule_text()}): generating")
            ev = self._drive(s, self._generate(s), interactive=bool(layers))
            self.steered_label = "steered"
        if ev.finished:
            self._show_steered(ev.result)

    def _do_continue(self, how: str) -> None:
        self._stop_requested.clear()
        s = self.session
        if self.paused is None and not self.ready:
            self._say(f"nothing to {how}: Run steered with breakpoint layers picked, "
                      "or restore a checkpoint")
            return
        self.paused, self.ready = None, False
        ev = s.step() if how == "step" else s.resume()
        ev = self._drive(s, ev, interactive=True)
        if ev.finished:
            self.steered_label = "steered"
            self._show_steered(ev.result)

    def _do_scan(self) -> None:
        self._stop_requested.clear()
        s = self.session
        if self.paused is None:
            self._say("nothing paused: Run steered with breakpoint layers picked first")
            return
        ev = self.paused
        while ev.paused and ev.layer < s.layers - 1 and not self._stop_requested.is_set():
            ev = s.step()
            if ev.paused:
                self._show_pause(s, ev)
        if ev.finished:
            self.paused = None
            self._show_steered(ev.result)

    def _do_stop(self) -> None:
        s = self.session
        if self.paused is not None:
            ev = s.stop()
            self.paused = None
            self.steered_label = "steered (stopped)"
            self._show_steered(ev.result)
            self._say(f"stopped: {len(ev.result.tokens)} tokens kept")
        elif not self.status.value.startswith("stopped"):
            self._say("stopped")
        self.progress.bar_style = "warning"
        self._stop_requested.clear()

    def _do_take(self) -> None:
        s = self.session
        t0 = time.perf_counter()
        ck = s.checkpoint()
        ck.wait()
        ready_ms = (time.perf_counter() - t0) * 1e3
        entry = {"checkpoint": ck, "key": self._session_key, "label": f"{ck.id[:6]}@{ck.step}", "dispatch_ms": ck.dispatch_ms,
                 "ready_ms": ready_ms, "restore_ms": None}
        self.checkpoints.append(entry)
        self._refresh_checkpoint_list(select=ck.id)
        self._say(f"checkpoint {entry['label']}: step {ck.step}, {ck.nbytes / 2**20:.2f} MiB, "
                  f"dispatch {ck.dispatch_ms:.2f} ms")
        self._refresh_latency()

    def _selected(self, checkpoint):
        if checkpoint is not None:
            cid = checkpoint.id if hasattr(checkpoint, "id") else str(checkpoint)
        else:
            cid = self.checkpoint_list.value
        if cid is None:
            raise dj.InvalidArgumentError("no checkpoint selected: take one first")
        for e in self.checkpoints:
            if e["checkpoint"].id == cid:
                return e
        for info in self.client.checkpoints():   # taken outside the dashboard
            if info["id"] == cid:
                e = {"checkpoint": dj.Checkpoint(self.client, info), "key": None,
                     "label": f"{cid[:6]}@{info['step']}", "dispatch_ms": info.get("dispatch_ms"),
                     "ready_ms": None, "restore_ms": None}
                self.checkpoints.append(e)
                return e
        raise dj.InvalidArgumentError(f"checkpoint {cid} is not on the server any more")

    def _do_restore(self, checkpoint) -> None:
        e = self._selected(checkpoint)
        t0 = time.perf_counter()
        self.session.restore(e["checkpoint"])
        e["restore_ms"] = (time.perf_counter() - t0) * 1e3
        self.paused, self.ready = None, True
        self._session_key = e["key"]
        self.paused_info.value = (f"restored to checkpoint {html.escape(e['label'])} (step "
                                  f"{e['checkpoint'].step}): Resume or Step continues with the "
                                  "checkpoint's rules and breakpoints")
        self._say(f"restored {e['label']} in {e['restore_ms']:.1f} ms")
        self._refresh_latency()

    def _do_fork(self, checkpoint) -> None:
        self._stop_requested.clear()
        e = self._selected(checkpoint)
        self._ensure_baseline()
        f = self.session.fork(e["checkpoint"])
        self.forks.append(f)
        self._apply_steering(f)
        self._with_progress_breakpoint(f)
        self.progress.max = int(self.max_new_tokens.value)
        self.progress.value = e["checkpoint"].step
        self._say(f"fork {f.id} of {e['label']} ({self._rule_text()}): generating")
        ev = self._drive(f, f.resume(), interactive=False)
        self.steered_label = f"fork of {e['label']}"
        self._show_steered(ev.result)

    def _usable_checkpoint(self):
        """The latest checkpoint of this prompt that still has tokens to generate."""
        for e in reversed(self.checkpoints):
            if e["key"] == self._key() and e["checkpoint"].step < self._key()[1]:
                return e
        return None

    def _do_switch(self, server) -> None:
        if self.pool is None:
            raise dj.InvalidArgumentError("this dashboard was not made from a pool (dj.connect([...]))")
        client = self.pool.client(server)
        if client is self.client:
            return
        session = client.session(model=self._model)      # first: a failure changes nothing
        self._release_sessions()
        self.client, self.session, self._own_session = client, session, True
        self.baseline = self.steered = self.divergence = self.paused = None
        self._baseline_key = self._session_key = None
        self.ready, self.checkpoints, self.forks, self.norms = False, [], [], {}
        L = session.layers
        auto, self.auto.value = self.auto.value, False   # new options: no steered re-run
        try:
            self.layer_picker.value = ()
            self.layer_picker.options = list(range(L))
            self.steer_layer.options = list(range(L))
            self.steer_layer.value = L // 2
        finally:
            self.auto.value = auto
        self.info.value = self._info_html()
        if self.server_picker is not None and self.server_picker.value != client.address:
            self.server_picker.value = client.address
        self._refresh_checkpoint_list()
        self._refresh_results()
        self._say(f"server {client.address}: session {session.id} on {session.model}")

    # ---- views --------------------------------------------------------------------------
    def _info_html(self) -> str:
        s = self.session
        where = s.device if len(s.devices) < 2 else " + ".join(s.devices)
        return (f"<b>{html.escape(s.model)}</b> &middot; {s.layers} layers &middot; hidden "
                f"{s.hidden_size} &middot; {html.escape(where)} &middot; {html.escape(s.dtype)}"
                f" &middot; {html.escape(s.architecture)} &middot; session {html.escape(s.id)}"
                + (f" &middot; server {html.escape(self.client.address)}" if self.pool else ""))

    def _on_steering_change(self, change) -> None:
        if not self.auto.value:
            return
        if change["owner"] is self.scale and self.steer_op.value != "scale":
            return
        if change["owner"] in (self.alpha, self.vector_seed) and self.steer_op.value != "add":
            return
        self.regenerate()

    def _show_pause(self, sess, ev) -> None:
        self.paused = ev
        norms = np.atleast_1d(sess.activation(reduce="norm"))
        if norms.ndim == 2:              # heads: [positions, heads] -> the whole row's norm
            norms = np.linalg.norm(norms, axis=-1)
        self.norms[(ev.layer, ev.step)] = float(norms[-1])
        self.progress.value = ev.step
        where = "" if ev.site == "resid" else f" ({html.escape(ev.site)})"
        self.paused_info.value = (
            f"<b>paused</b> after block {ev.layer}{where} on step {ev.step} ({html.escape(ev.phase)}), "
            f"positions {ev.start}..{ev.position}; last-position norm {norms[-1]:.4g}")
        self.lens_view.value = _lens_html(sess.logit_lens(k=5)) if ev.site in ("resid", "attn", "mlp") \
            else "<i>logit lens: reads the residual stream (sites resid, attn, mlp)</i>"
        _copy_figure(self.norm_fig, plots.activation_norms(norms, start=ev.start, layer=ev.layer,
                                                           step=ev.step))
        _copy_figure(self.heat_fig, plots.layer_heatmap(self.norms, layers=sess.layers,
                                                        steps=int(self.max_new_tokens.value)))
        self._say(f"paused at layer {ev.layer}, step {ev.step}: Step / Resume / Stop / Scan layers")

    def _show_steered(self, result) -> None:
        self.steered = result
        if self.paused is None and self.paused_info.value.startswith("<b>paused</b>"):
            self.paused_info.value = self.paused_info.value.replace("<b>paused</b>", "last pause:", 1)
        self._refresh_results()
        self._say(f"{self.steered_label}: {len(result.tokens)} tokens"
                  + (f", mismatch {self.divergence.mismatch_rate:.0%}" if self.divergence else ""))

    def _refresh_results(self) -> None:
        self.divergence = None
        if self.baseline is not None and self.steered is not None:
            try:
                self.divergence = dj.divergence(self.baseline, self.steered)
            except dj.InvalidArgumentError as exc:   # e.g. the prompt changed since
                self._fail(exc)
        self.token_view.value = plots.token_table(self.baseline, self.steered,
                                                  labels=("baseline", self.steered_label))
        _copy_figure(self.div_fig, plots.divergence(div=self.divergence))
        self._refresh_latency()

    def _refresh_latency(self) -> None:
        stats = self.client.stats()
        self.memory_view.value = _memory_html(stats.get("devices"))
        _copy_figure(self.lat_fig, plots.latency(
            self.steered, baseline=self.baseline, rtt_ms=stats["rtt_ms"],
            checkpoints=[{k: e[k] for k in ("label", "dispatch_ms", "ready_ms", "restore_ms")}
                         for e in self.checkpoints]))

    def _refresh_checkpoint_list(self, select=None) -> None:
        options = []
        for info in self.client.checkpoints():
            options.append((f"{info['id'][:6]} step {info['step']} · {info['positions']} pos · "
                            f"{info['nbytes'] / 2**20:.2f} MiB"
                            + ("" if info["ready"] else " (copying)"), info["id"]))
        self.checkpoint_list.options = options
        if select is not None:
            self.checkpoint_list.value = select


def _memory_html(devices) -> str:
    """One line: memory per device of the server (``client.stats()["devices"]``)."""
    if not devices:
        return ""
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    parts = []
    for d in devices:
        if d.get("kind") == "cuda":
            text = (f"{d['device']} {gib(d['allocated_bytes'])} / {gib(d['total_bytes'])} GiB "
                    f"(reserved {gib(d['reserved_bytes'])})")
        else:
            total = d.get("total_bytes")
            text = f"cpu RSS {gib(d['allocated_bytes'])}" + (f" / {gib(total)}" if total else "") + " GiB"
        layers = d.get("layers") or {}
        if layers:
            text += " [" + ", ".join(f"{m}: {n} layers" for m, n in layers.items()) + "]"
        parts.append(html.escape(text))
    return '<span class="dj-memory"><small>memory: ' + " &middot; ".join(parts) + "</small></span>"


def _lens_html(lens: dict) -> str:
    """The paused state's logit lens as one line of top-5 tokens with probabilities."""
    cells = "".join(f"<td style='padding:0 8px'><code>{html.escape(repr(t))}</code> {p:.3f}</td>"
                    for t, p in zip(lens["top_tokens"][0], lens["top_probs"][0]))
    return (f"<table><tr><td><b>logit lens</b> (position {lens['positions'][0]}):</td>"
            f"{cells}</tr></table>")
