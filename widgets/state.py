"""The dashboard's state: the one record that status, errors, results and plots render from.

Only the worker writes it (``widgets.jobs`` through the methods below, one job at a
time); each method names the aspects it changed and the views subscribed to them
re-render. Nothing here calls the server. Comparisons are made only between runs of the
same prompt: a baseline of a new prompt drops the steered run of the old one, so no
stale "divergence needs two generations of the same prompt" can appear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import djinn_nb as dj

#: the aspects views subscribe to
ASPECTS = ("status", "results", "latency", "pause", "checkpoints", "session")


@dataclass(frozen=True)
class Settings:
    """What the controls said when an action was asked for. Jobs read this snapshot,
    never a widget, so a control moved during a run changes only the next run."""
    prompt: str
    max_new_tokens: int
    layers: tuple = ()
    bp_site: str = "resid"
    bp_phase: str = "decode"
    bp_steps: str = ""
    steer_layer: int = 0
    steer_site: str = "resid"
    op: str = "scale"
    scale: float = 1.0
    alpha: float = 0.5
    vector_seed: int = 0

    @property
    def key(self) -> tuple:
        """(prompt, max_new_tokens): which generation a result or checkpoint belongs to."""
        return (self.prompt, self.max_new_tokens)

    def steps(self) -> Optional[list]:
        """The breakpoint steps typed in the "steps" box (None: all steps)."""
        text = self.bp_steps.strip()
        if not text:
            return None
        try:
            return [int(x) for x in text.replace(" ", ",").split(",") if x]
        except ValueError:
            raise dj.InvalidArgumentError(
                f"breakpoint steps must be integers like 3,5; got {text!r}") from None

    def rule_text(self) -> str:
        where = f"layer {self.steer_layer}" + (
            "" if self.steer_site == "resid" else f" ({self.steer_site})")
        if self.op == "scale":
            return f"scale {self.scale:.2f} at {where}"
        return f"add {self.alpha:.2f} * v(seed {self.vector_seed}) at {where}"


@dataclass
class CheckpointEntry:
    """A checkpoint the dashboard knows, with the generation it came from and timings."""
    checkpoint: dj.Checkpoint
    key: Optional[tuple] = None       # (prompt, max_new_tokens); None: taken elsewhere
    rule: Optional[str] = None        # the steering rule of that generation
    dispatch_ms: Optional[float] = None
    ready_ms: Optional[float] = None
    restore_ms: Optional[float] = None

    @property
    def label(self) -> str:
        return f"{self.checkpoint.id[:6]}@{self.checkpoint.step}"

    def __getitem__(self, name: str):
        # dict-style reads (``dash.checkpoints[0]["label"]``), as notebooks wrote them
        return getattr(self, name)

    def timings(self) -> dict:
        return {"label": self.label, "dispatch_ms": self.dispatch_ms,
                "ready_ms": self.ready_ms, "restore_ms": self.restore_ms}


class DashboardState:
    """Results, pause, checkpoints, timings and status of one dashboard."""

    def __init__(self, max_new_tokens: int):
        self._listeners: dict = {a: [] for a in ASPECTS}
        self.token_texts: dict = {}      # token id -> text, for the token view's hover
        self.reset(max_new_tokens)

    def reset(self, max_new_tokens: int, session: Optional[dict] = None) -> None:
        """Empty results for a new session (at start, or after switching server);
        ``session``: the facts the info line shows (model, layers, device, ...)."""
        self.session = session or {}
        self.baseline = self.steered = self.divergence = None
        self.baseline_key: Optional[tuple] = None   # None also for a stopped (short) baseline
        self.steered_label = "steered"
        self.prompt: Optional[str] = None           # of the runs shown
        self.paused = self.last_pause = None        # dj.Paused
        self.sae_features = None                    # SAEFeatures at the last pause
        self.pause_norms, self.lens = None, None
        self.ready, self.restored = False, None     # after restore(): the entry
        self.norms: dict = {}                       # (layer, step) -> norm
        self.heat_steps = max_new_tokens
        self.checkpoints: list = []                 # CheckpointEntry
        self.server_checkpoints: list = []          # client.checkpoints() infos
        self.selected: Optional[str] = None         # checkpoint id to select in the list
        self.pings: list = []                       # client.ping() after each job, ms
        self.devices = None                         # client.stats()["devices"]
        self.job, self.activity, self.outcome = None, "", ""
        self.progress = (0, max_new_tokens)
        self.error: Optional[BaseException] = None
        self.unexpected = False                     # the error is not a djinn_nb error
        self.errors: list = []                      # (job, error) of every failed job, newest last
        self.pending: Optional[Settings] = None     # a steering change queued behind a pause

    # ---- subscriptions -------------------------------------------------------------
    def subscribe(self, aspect: str, render: Callable[["DashboardState"], None]) -> None:
        self._listeners[aspect].append(render)

    def emit(self, *aspects: str) -> None:
        for aspect in aspects:
            for render in self._listeners[aspect]:
                render(self)

    # ---- jobs and status -------------------------------------------------------------
    def begin(self, job: str) -> None:
        self.job, self.outcome = job, ""
        self.emit("status")

    def end(self, error: Optional[BaseException] = None, unexpected: bool = False) -> None:
        """A job ended: an error is shown until the next job that succeeds."""
        if error is not None:
            self.error, self.unexpected, self.outcome = error, unexpected, "error"
            self.errors = (self.errors + [(self.job, error)])[-20:]
            self.activity = f"{self.job} failed: {type(error).__name__}"
            self.progress = (0, self.progress[1])
        elif self.outcome != "stopped":
            self.error, self.outcome = None, ""
        else:
            self.error = None
        self.job = None
        self.emit("status")

    def say(self, text: str) -> None:
        self.activity = text
        self.emit("status")

    def stopped(self, text: str) -> None:
        self.activity, self.outcome = text, "stopped"
        self.emit("status")

    def set_progress(self, value: int, maximum: Optional[int] = None) -> None:
        self.progress = (value, self.progress[1] if maximum is None else maximum)
        self.emit("status")

    def queue_behind_pause(self, settings: Optional[Settings]) -> None:
        self.pending = settings
        self.emit("status")

    # ---- results ------------------------------------------------------------------
    def set_baseline(self, result, key: Optional[tuple], prompt: str) -> None:
        self.baseline, self.baseline_key, self.prompt = result, key, prompt
        if self.steered is not None and self.steered.prompt_tokens != result.prompt_tokens:
            self.steered = None          # a run of another prompt: nothing to compare with
        self._compare()

    def set_steered(self, result, label: str, prompt: Optional[str]) -> None:
        self.steered, self.steered_label = result, label
        if self.baseline is not None and self.baseline.prompt_tokens != result.prompt_tokens:
            self.baseline, self.baseline_key = None, None
        self.prompt = prompt if prompt is not None else self.prompt
        self._compare()

    def _compare(self) -> None:
        b, s = self.baseline, self.steered
        both = b is not None and s is not None and b.logits is not None and s.logits is not None
        self.divergence = dj.divergence(b, s) if both else None
        self.emit("results", "latency", "checkpoints")

    # ---- pauses -------------------------------------------------------------------
    def set_pause(self, ev, norms, lens: Optional[dict], sae_features=None) -> None:
        self.paused = self.last_pause = ev
        self.pause_norms, self.lens, self.restored = norms, lens, None
        self.sae_features = sae_features          # dj SAEFeatures at this pause, or None
        self.norms[(ev.layer, ev.step)] = float(norms[-1])
        self.progress = (ev.step, self.progress[1])
        self.emit("pause", "status")

    def end_pause(self, ready: bool = False, restored: Optional[CheckpointEntry] = None) -> None:
        self.paused, self.ready, self.restored = None, ready, restored
        self.emit("pause")

    def start_run(self, max_new_tokens: int, start: int = 0, new_pauses: bool = False) -> None:
        self.progress = (start, max_new_tokens)
        if new_pauses:
            self.norms, self.heat_steps = {}, max_new_tokens
            self.last_pause = None
        self.emit("status", "pause")

    # ---- checkpoints and timings ------------------------------------------------------
    def add_checkpoint(self, entry: CheckpointEntry, select: bool = True) -> None:
        self.checkpoints.append(entry)
        if select:
            self.selected = entry.checkpoint.id
        self.emit("checkpoints", "latency")

    def refreshed(self, ping_ms: Optional[float], devices, server_checkpoints) -> None:
        if ping_ms is not None:
            self.pings = (self.pings + [ping_ms])[-100:]
        self.devices, self.server_checkpoints = devices, server_checkpoints
        self.emit("latency", "checkpoints", "session")
