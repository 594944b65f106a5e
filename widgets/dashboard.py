"""The steering dashboard: one ipywidgets panel over a ``djinn_nb.Session``.

Pick breakpoint layers, slide a steering scale, run baseline and steered generations,
step through paused layers, take / restore / fork checkpoints, and watch token
divergence and latency in live plotly ``FigureWidget``s.

Built as state, worker and views: ``DashboardState`` (widgets.state) is the one record
of results, pause, checkpoints and status; a ``Worker`` (widgets.worker) runs every
server call, one job at a time, with slider moves coalesced; ``SessionDriver``
(widgets.jobs) is what the jobs do; the views (widgets.views) only render the state;
``Controls`` (widgets.controls) are the inputs, read into a ``Settings`` snapshot when
an action is asked for. This module wires them and keeps the public API.
"""
from __future__ import annotations

from typing import Optional

import ipywidgets as W

import djinn_nb as dj

from .checkpoint_jobs import CheckpointJobs
from .controls import Controls
from .jobs import SessionDriver
from .state import ASPECTS, DashboardState
from .views import CheckpointView, PauseView, ResultsView, SessionView, StatusView
from .worker import Worker

#: widgets reachable as dashboard attributes (notebooks and tests set and click them)
CONTROL_NAMES = ("prompt", "max_new_tokens", "layer_picker", "bp_site", "bp_phase", "bp_steps",
                 "steer_layer", "steer_site", "steer_op", "scale", "alpha", "vector_seed", "auto")
VIEW_NAMES = ("progress", "status", "message", "token_view", "div_fig", "lat_fig", "paused_info",
              "lens_view", "sae_view", "norm_fig", "heat_fig", "checkpoint_list", "info", "memory_view",
              "server_picker")


def _open_session(source, model: Optional[str], server):
    """(pool, session, opened_here) for a Session, a Client, a Pool or a ClusterClient
    (the "pool" then: sessions are placed by the cluster's directory)."""
    pool = source if isinstance(source, (dj.Pool, dj.ClusterClient)) else None
    if isinstance(source, dj.ClusterClient):
        return pool, source.session(model=model), True
    if pool is not None:
        source = pool.client(server)
    if isinstance(source, dj.Session):
        return pool, source, False
    if isinstance(source, dj.Client):
        return pool, source.session(model=model), True
    raise TypeError("Dashboard needs a djinn_nb Session, Client or Pool, got "
                    f"{type(source).__name__}")


class Dashboard(W.VBox):
    """``dj.Dashboard(session_or_client)``: the dashboard widget (display it in a cell).

    With a ``Client`` a session on ``model`` (default: the server's default) is opened;
    with a ``Pool`` one on ``server`` (default the first), and a "server" dropdown; with a
    ``ClusterClient`` (``dj.connect("cluster://...")``) one on ``model`` (default the
    cluster's first), placed by the directory, and a "model" dropdown of the cluster's models.
    The baseline runs in a second session on the same model, with no rules or breakpoints.
    The buttons, and the methods of the same names (``run_baseline()``, ``run_steered()``,
    ``step()``, ``resume()``, ``stop()``, ``scan_layers()``, ``take_checkpoint()``,
    ``restore_checkpoint()``, ``fork_checkpoint()``), queue work on the worker thread;
    ``wait()`` blocks until it is done. Results: ``baseline``, ``steered`` (both
    ``GenerationResult``), ``divergence`` (``dj.Divergence``), ``paused`` (``dj.Paused``).
    A slider move while paused is queued until the pause ends (Stop drops it).
    """

    def __init__(self, session_or_client, *, model: Optional[str] = None,
                 prompt: str = "The capital of France is", max_new_tokens: int = 16,
                 breakpoint_layers=(), steer_layer: Optional[int] = None, op: str = "scale",
                 scale: float = 1.0, alpha: float = 0.5, vector_seed: int = 0,
                 background: bool = True, server=None):
        self.pool, session, own = _open_session(session_or_client, model, server)
        self.controls = Controls(session.layers, prompt=prompt, max_new_tokens=max_new_tokens,
                                 breakpoint_layers=breakpoint_layers, steer_layer=steer_layer,
                                 op=op, scale=scale, alpha=alpha, vector_seed=vector_seed)
        self.state = DashboardState(max_new_tokens)
        self._worker = Worker(self.state.begin, self._job_ended, background)
        self._driver = SessionDriver(self.state, self._worker, session, self.pool, model, own)
        self._checkpoints = CheckpointJobs(self._driver)
        self.state.reset(max_new_tokens, self._driver.session_facts())
        self._views = (StatusView(max_new_tokens), ResultsView(),
                       PauseView(session.layers, max_new_tokens), CheckpointView(),
                       SessionView(*self._driver.choices()))
        for view in self._views:
            view.subscribe(self.state)
        self.state.subscribe("session", self.controls.render_session)
        self._expose()
        super().__init__(self._layout(), layout=W.Layout(width="100%"))
        self.add_class("djinn-dashboard")
        self._driver.refresh()
        self.state.emit(*ASPECTS)
        for w in self.controls.steering_widgets():
            w.observe(self._on_steering_change, names="value")
        if self.server_picker is not None:
            self.server_picker.observe(self._on_server_pick, names="value")

    # ---- public actions (queue work on the worker) ------------------------------------
    def run_baseline(self):
        """Generate the baseline (no rules, no breakpoints) of the prompt."""
        st = self.controls.settings()
        self._worker.submit("baseline", lambda: self._driver.baseline(st))

    def run_steered(self):
        """Generate with the panel's steering rule from the prompt; with breakpoint layers
        picked it pauses at the first one (then Step / Resume / Stop / Scan layers)."""
        st = self.controls.settings()
        self._worker.submit("steered", lambda: self._driver.steered(st, interactive=True))

    def regenerate(self):
        """What a slider move does: the steered run again, from the latest usable
        checkpoint when there is one, else from the prompt; breakpoints are not used.
        While paused it is queued until the pause ends."""
        st = self.controls.settings()
        self._worker.submit("regenerate", lambda: self._driver.regenerate(st), coalesce=True)

    def step(self):
        """From a pause (or a restored checkpoint): pause again after the next layer."""
        self._worker.submit("step", lambda: self._driver.step_or_resume("step"))

    def resume(self):
        """From a pause (or a restored checkpoint): run to the next pause or the end."""
        self._worker.submit("resume", lambda: self._driver.step_or_resume("resume"))

    def scan_layers(self):
        """Step through the remaining layers of the paused token, recording each norm."""
        self._worker.submit("scan", self._driver.scan)

    def stop(self):
        """Drop queued work (and a steering change queued behind a pause), stop the running
        generation at its next step, and abandon a paused one (its tokens so far become
        the steered result)."""
        self._worker.cancel()
        self._driver.interrupt()      # a run in flight ends at its next step, not at its end
        self._worker.submit("stop", self._driver.stop)

    def take_checkpoint(self):
        """Checkpoint the main session now (paused, finished or restored)."""
        self._worker.submit("checkpoint", self._checkpoints.take)

    def restore_checkpoint(self, checkpoint=None):
        """Rewind the main session to the selected (or given) checkpoint."""
        cid = self._checkpoint_id(checkpoint)
        self._worker.submit("restore", lambda: self._checkpoints.restore(cid))

    def fork_checkpoint(self, checkpoint=None):
        """Fork the selected (or given) checkpoint into a new session, apply the panel's
        steering rule there and run it to the end; its result is shown as "steered"."""
        cid, st = self._checkpoint_id(checkpoint), self.controls.settings()
        self._worker.submit("fork", lambda: self._checkpoints.fork(cid, st))

    def wait(self, timeout: float = 120.0) -> "Dashboard":
        """Block until the queued work is done."""
        self._worker.wait(timeout)
        return self

    @property
    def busy(self) -> bool:
        return self._worker.busy

    def switch_server(self, server) -> None:
        """(Given a Pool) move the dashboard to another server of the pool (given a
        ClusterClient: to another model of the cluster): the sessions it opened on the
        current one are closed, a new session opens there; results and the checkpoint list
        start empty."""
        n = int(self.controls.max_new_tokens.value)
        self._worker.submit("server", lambda: self._driver.switch(server, n))

    def close_sessions(self) -> None:
        """Close the sessions the dashboard opened (baseline, forks, and the main session
        when it was opened from a client). The widget stays displayed."""
        self.wait()
        self._driver.release()

    # ---- state, read-only views of it --------------------------------------------------
    baseline = property(lambda self: self.state.baseline, doc="GenerationResult of the baseline")
    steered = property(lambda self: self.state.steered, doc="GenerationResult shown as steered")
    steered_label = property(lambda self: self.state.steered_label)
    divergence = property(lambda self: self.state.divergence, doc="dj.Divergence of the two")
    paused = property(lambda self: self.state.paused, doc="dj.Paused while paused for the user")
    ready = property(lambda self: self.state.ready, doc="restored: Resume / Step continue")
    last_error = property(lambda self: self.state.error, doc="the error shown, until a success")
    checkpoints = property(lambda self: self.state.checkpoints, doc="CheckpointEntry list")
    norms = property(lambda self: self.state.norms, doc="(layer, step) -> activation norm")
    forks = property(lambda self: self._driver.forks, doc="sessions made by fork_checkpoint()")
    session = property(lambda self: self._driver.session, doc="the main session")
    client = property(lambda self: self._driver.client)
    background = property(lambda self: self._worker.background)

    # ---- wiring ------------------------------------------------------------------------
    def _job_ended(self, error, unexpected: bool) -> None:
        self._driver.refresh()
        self.state.end(error, unexpected)

    def _on_steering_change(self, change) -> None:
        if self.controls.moves_the_rule(change["owner"]):
            self.regenerate()

    def _on_server_pick(self, change) -> None:
        if change["new"] != self.state.session.get("pick"):
            self.switch_server(change["new"])

    def _checkpoint_id(self, checkpoint) -> Optional[str]:
        if checkpoint is None:
            return self.checkpoint_list.value
        return checkpoint.id if hasattr(checkpoint, "id") else str(checkpoint)

    def _expose(self) -> None:
        for name in CONTROL_NAMES:
            setattr(self, name, getattr(self.controls, name))
        for name in VIEW_NAMES:
            setattr(self, name, next(getattr(v, name) for v in self._views if hasattr(v, name)))
        for attr, text, icon, action, style in (
                ("run_baseline_button", "Run baseline", "play", self.run_baseline, ""),
                ("run_steered_button", "Run steered", "play", self.run_steered, "primary"),
                ("step_button", "Step", "step-forward", self.step, ""),
                ("resume_button", "Resume", "forward", self.resume, ""),
                ("stop_button", "Stop", "stop", self.stop, "danger"),
                ("scan_button", "Scan layers", "list", self.scan_layers, ""),
                ("take_button", "Take checkpoint", "camera", self.take_checkpoint, ""),
                ("restore_button", "Restore", "undo", self.restore_checkpoint, ""),
                ("fork_button", "Fork + run", "code-branch", self.fork_checkpoint, "")):
            b = W.Button(description=text, icon=icon, button_style=style,
                         layout=W.Layout(width="auto"))
            b.on_click(lambda _, act=action: act())
            setattr(self, attr, b)

    def _layout(self) -> list:
        def box(title, *children):
            return W.VBox([W.HTML(f"<b>{title}</b>"), *children],
                          layout=W.Layout(border="1px solid #ddd", padding="4px", margin="2px"))
        checkpoints = box("checkpoints", self.checkpoint_list,
                          W.HBox([self.take_button, self.restore_button, self.fork_button]))
        checkpoints.layout.flex = "1 1 380px"
        head = self.info if self.server_picker is None else W.HBox([self.server_picker, self.info])
        return [
            head,
            W.HBox([self.prompt, self.max_new_tokens]),
            W.HBox([*self.controls.boxes(box), checkpoints], layout=W.Layout(width="100%")),
            W.HBox([self.run_baseline_button, self.run_steered_button, self.step_button,
                    self.resume_button, self.stop_button, self.scan_button]),
            W.HBox([self.progress, self.status]),
            self.memory_view,
            self.message,
            self.token_view,
            self.div_fig,
            self.lat_fig,
            box("paused state", self.paused_info, self.lens_view, self.sae_view,
                W.HBox([self.norm_fig, self.heat_fig])),
        ]
