"""The dashboard's outputs: widgets that render from a ``DashboardState`` and nothing else.

Each view subscribes to the state aspects it shows (``subscribe(state)``) and redraws
them whole, so what is on screen is always what the state says: status, error and
plots cannot disagree, and nothing here calls the server.
"""
from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

from djinn_nb import plots

from .state import DashboardState

NOT_PAUSED = "<i>not paused: pick breakpoint layers and Run steered</i>"
NO_LENS = "<i>logit lens: reads the residual stream (sites resid, attn, mlp)</i>"
#: an HTML widget's content box is a flex item that grows with what it holds; without
#: min-width 0 the token table's own scroll box would widen with a long run
TOKEN_VIEW_CSS = ("<style>.dj-token-view > .widget-html-content"
                  "{min-width:0;overflow:hidden}</style>")


def copy_figure(target: go.FigureWidget, source: go.Figure) -> None:
    """Copy ``source``'s traces (same kinds, same order) and layout into ``target``,
    leaving the target's own size and theme."""
    layout = source.layout.to_plotly_json()
    for key in ("template", "width", "height"):
        layout.pop(key, None)
    with target.batch_update():
        for tw, t in zip(target.data, source.data):
            props = t.to_plotly_json()
            props.pop("type", None)
            props.pop("uid", None)
            tw.update(props)
        target.update_layout(layout)


class StatusView:
    """Progress bar (job name, tokens), one status line and the error box."""

    def __init__(self, max_new_tokens: int):
        self.progress = W.IntProgress(value=0, min=0, max=max_new_tokens, description="idle",
                                      layout=W.Layout(width="320px"))
        self.status = W.HTML("")
        self.message = W.HTML("")

    def subscribe(self, state: DashboardState) -> None:
        state.subscribe("status", self.render)

    def render(self, state: DashboardState) -> None:
        value, maximum = state.progress
        self.progress.max = max(int(maximum), 1)
        self.progress.value = min(int(value), self.progress.max)
        self.progress.description = state.job or "idle"
        self.progress.bar_style = ("info" if state.job else
                                   {"error": "danger", "stopped": "warning"}.get(state.outcome, ""))
        text = html.escape(state.activity)
        if state.pending is not None and "while paused" not in state.activity:
            text += f" &middot; queued after the pause: {html.escape(state.pending.rule_text())}"
        self.status.value = text
        self.message.value = _error_html(state.error, state.unexpected) if state.error else ""


def _error_html(exc: BaseException, unexpected: bool) -> str:
    kind = ("unexpected " if unexpected else "") + type(exc).__name__
    return ('<div class="dj-error" style="color:#a00;background:#fee;border:1px solid #e99;'
            f'padding:4px">{html.escape(kind)}: {html.escape(str(exc))}</div>')


class ResultsView:
    """Token view, divergence plot and latency plot."""

    def __init__(self):
        self.token_view = W.HTML(TOKEN_VIEW_CSS + plots.token_table(),
                                 layout=W.Layout(width="100%"))
        self.token_view.add_class("dj-token-view")
        self.div_fig = go.FigureWidget(plots.divergence())
        self.lat_fig = go.FigureWidget(plots.latency())

    def subscribe(self, state: DashboardState) -> None:
        state.subscribe("results", self.render_results)
        state.subscribe("latency", self.render_latency)

    def render_results(self, state: DashboardState) -> None:
        self.token_view.value = TOKEN_VIEW_CSS + plots.token_table(
            state.baseline, state.steered, div=state.divergence,
            labels=("baseline", state.steered_label), token_text=state.token_texts.get)
        copy_figure(self.div_fig, plots.divergence(div=state.divergence))

    def render_latency(self, state: DashboardState) -> None:
        copy_figure(self.lat_fig, plots.latency(
            state.steered, baseline=state.baseline, rtt_ms=state.pings,
            checkpoints=[e.timings() for e in state.checkpoints]))


class PauseView:
    """Where the forward pass is paused: text, logit lens, norms and the layer heatmap."""

    def __init__(self, layers: int, max_new_tokens: int):
        self.paused_info = W.HTML(NOT_PAUSED)
        self.lens_view = W.HTML("")
        self.sae_view = W.HTML("")      # SAE features, when one of the session's SAEs reads here
        self.norm_fig = go.FigureWidget(plots.activation_norms())
        self.heat_fig = go.FigureWidget(plots.layer_heatmap(layers=layers, steps=max_new_tokens))
        for f in (self.norm_fig, self.heat_fig):
            f.update_layout(width=520)

    def subscribe(self, state: DashboardState) -> None:
        state.subscribe("pause", self.render)

    def render(self, state: DashboardState) -> None:
        ev = state.last_pause
        self.paused_info.value = _pause_html(state)
        self.lens_view.value = "" if ev is None else (
            _lens_html(state.lens) if state.lens is not None else NO_LENS)
        self.sae_view.value = "" if ev is None or state.sae_features is None else \
            _sae_html(state.sae_features)
        norms = state.pause_norms if ev is not None else None
        copy_figure(self.norm_fig, plots.activation_norms(
            norms, start=ev.start if ev else 0, layer=ev.layer if ev else None,
            step=ev.step if ev else None, site=ev.site if ev else "resid"))
        copy_figure(self.heat_fig, plots.layer_heatmap(
            state.norms, layers=state.session.get("layers", 0), steps=state.heat_steps))


def _pause_html(state: DashboardState) -> str:
    if state.restored is not None:
        e = state.restored
        return (f"restored to checkpoint {html.escape(e.label)} (step {e.checkpoint.step}): "
                "Resume or Step continues with the checkpoint's rules and breakpoints")
    ev = state.last_pause
    if ev is None:
        return NOT_PAUSED
    where = "" if ev.site == "resid" else f" ({html.escape(ev.site)})"
    head = "<b>paused</b>" if state.paused is not None else "last pause:"
    return (f"{head} after block {ev.layer}{where} on step {ev.step} ({html.escape(ev.phase)}), "
            f"positions {ev.start}..{ev.position}; last-position norm "
            f"{float(state.pause_norms[-1]):.4g}")


def _lens_html(lens: dict) -> str:
    """The paused state's logit lens: top-5 tokens (whitespace visible) and probabilities
    with enough digits that a tiny model's do not all read 0.000."""
    cells = "".join(
        f"<td style='padding:0 8px'><code>{html.escape(plots.token_label(t))}</code> "
        f"{plots.format_probability(p)}</td>"
        for t, p in zip(lens["top_tokens"][0], lens["top_probs"][0]))
    return (f"<table><tr><td><b>logit lens</b> (position {lens['positions'][0]}, "
            f"probabilities):</td>{cells}</tr></table>")


def _sae_html(feats) -> str:
    """The paused state's SAE features at the last position: the top ones and their
    activations (``Session.sae_features``), with the position's L0 and reconstruction error."""
    top = feats.top(-1)
    cells = "".join(f"<td style='padding:0 8px'><code>#{i}</code> {v:.3g}</td>" for i, v in top) \
        or "<td style='padding:0 8px'><i>no active feature</i></td>"
    return (f"<table><tr><td><b>SAE {html.escape(str(feats.sae))}</b> (position "
            f"{feats.positions[-1]}, L0 {int(feats.l0[-1])}, error {float(feats.recon_error[-1]):.2f}):"
            f"</td>{cells}</tr></table>")


class CheckpointView:
    """The checkpoint list: step, rule and prompt of each; other prompts' are marked."""

    def __init__(self):
        self.checkpoint_list = W.Select(options=[], rows=5, description="checkpoints",
                                        layout=W.Layout(width="100%"))
        self._selected = None

    def subscribe(self, state: DashboardState) -> None:
        state.subscribe("checkpoints", self.render)

    def render(self, state: DashboardState) -> None:
        keep = self.checkpoint_list.value
        options = _checkpoint_options(state)
        ids = [cid for _, cid in options]
        self.checkpoint_list.options = options
        if state.selected != self._selected and state.selected in ids:
            self._selected = keep = state.selected
        self.checkpoint_list.value = keep if keep in ids else None


def _checkpoint_options(state: DashboardState) -> list:
    known = {e.checkpoint.id: e for e in state.checkpoints}
    infos = {i["id"]: i for i in state.server_checkpoints}
    order = list(infos) + [cid for cid in known if cid not in infos]
    return [(_checkpoint_label(known.get(cid), infos.get(cid), state.prompt), cid)
            for cid in order]


def _checkpoint_label(entry, info, prompt) -> str:
    ck = entry.checkpoint if entry is not None else None
    cid, step = (ck.id, ck.step) if ck is not None else (info["id"], info["step"])
    parts = [f"{cid[:6]} step {step}"]
    if entry is not None and entry.key is not None:
        text = entry.key[0] if len(entry.key[0]) <= 28 else entry.key[0][:27] + "\u2026"
        parts += [entry.rule or "no rule", f"\u201c{text}\u201d"]
        if prompt is not None and entry.key[0] != prompt:
            parts.append("old prompt")
    else:
        parts.append("taken outside the dashboard")
    if info is not None:
        parts.append(f"{info['nbytes'] / 2**20:.2f} MiB" + ("" if info["ready"] else " (copying)"))
    return " \u00b7 ".join(parts)


class SessionView:
    """The info line (model, layers, device, session), the server's memory and, for a
    pool, the server picker (its changes are the dashboard's to handle)."""

    def __init__(self, options=None, label: str | None = "server"):
        self.info = W.HTML("")
        self.memory_view = W.HTML("")
        self.server_picker = None if options is None else W.Dropdown(
            options=list(options), description=label or "server", layout=W.Layout(width="320px"))

    def subscribe(self, state: DashboardState) -> None:
        state.subscribe("session", self.render)

    def render(self, state: DashboardState) -> None:
        self.info.value = _info_html(state.session)
        self.memory_view.value = _memory_html(state.devices)
        pick = state.session.get("pick")
        if self.server_picker is not None and self.server_picker.value != pick:
            self.server_picker.value = pick


def _info_html(f: dict) -> str:
    if not f:
        return ""
    e = lambda v: html.escape(str(v))  # noqa: E731
    return (f"<b>{e(f['model'])}</b> &middot; {f['layers']} layers &middot; hidden {f['hidden']}"
            f" &middot; {e(f['where'])} &middot; {e(f['dtype'])} &middot; {e(f['architecture'])}"
            f" &middot; session {e(f['id'])}"
            + (f" &middot; server {e(f['server'])}" if f.get("server") else ""))


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
