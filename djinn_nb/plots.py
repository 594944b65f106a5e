"""Plotly figures of generations, divergence and latency, without widgets.

For papers and static notebooks: every function returns a ``plotly.graph_objects.Figure``
(plotly is imported inside the functions, so ``import djinn_nb`` stays light). The
dashboard (``dj.Dashboard``) draws the same figures and copies their data into live
``FigureWidget``s, so each figure always has the same traces, empty when there is no data.

>>> fig = dj.plots.divergence(base, steered)     # Finished / GenerationResult / Divergence
>>> fig = dj.plots.latency(steered, rtt_ms=client.stats()["rtt_ms"])
>>> html = dj.plots.token_table(base, steered)   # an HTML string: tokens aligned, divergent marked
"""
from __future__ import annotations

import html as _html
from typing import Optional, Sequence

import numpy as np

#: colours shared by the figures and the token table
BASE_COLOUR = "#4c78a8"
STEER_COLOUR = "#e45756"
AGREE_COLOUR = "#54a24b"
DIVERGENT_BG = "#ffd6d6"


def _go():
    import plotly.graph_objects as go
    return go


def _result(x):
    return getattr(x, "result", x)


def _layout(fig, title: str, height: int = 280):
    # the legend goes under the plot: long titles and subplot titles stay readable
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=height + 40,
                      margin=dict(l=50, r=50, t=50, b=40), template="plotly_white",
                      legend=dict(orientation="h", yanchor="top", y=-0.25, x=0, xanchor="left"))
    return fig


def divergence(base=None, steered=None, *, div=None, title: Optional[str] = None):
    """Per generated step: KL(baseline || steered) (left axis, nats) and top-1 agreement
    (right axis, 1 = same argmax), of two results of the same prompt generated with
    ``return_logits=True``. Pass ``div=`` a ``dj.Divergence`` to skip computing it.
    Traces (always two): ``KL``, ``top-1 agree``."""
    go = _go()
    if div is None and base is not None and steered is not None:
        from .divergence import divergence as compute
        div = compute(base, steered)
    steps = list(range(div.steps)) if div is not None else []
    kl = [float(v) for v in div.kl] if div is not None else []
    agree = [int(bool(v)) for v in div.top1_agree] if div is not None else []
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=kl, name="KL", mode="lines+markers",
                             line=dict(color=STEER_COLOUR)))
    fig.add_trace(go.Scatter(x=steps, y=agree, name="top-1 agree", mode="markers",
                             marker=dict(color=AGREE_COLOUR, symbol="square", size=8), yaxis="y2"))
    if title is None:
        title = "divergence per step (steered vs baseline)"
        if div is not None:
            s = div.summary()
            title += (f": mean KL {s['mean_kl']:.3g}, top-1 agree {s['top1_agreement']:.0%}, "
                      f"first divergent step {s['first_divergent_step']}")
    fig.update_layout(xaxis=dict(title="step"), yaxis=dict(title="KL (nats)", rangemode="tozero"),
                      yaxis2=dict(title="top-1 agree", overlaying="y", side="right",
                                  range=[-0.1, 1.1], tickvals=[0, 1]))
    return _layout(fig, title)


def latency(result_or_steps=None, *, baseline=None, rtt_ms: Optional[Sequence[float]] = None,
            checkpoints: Optional[Sequence[dict]] = None, title: str = "latency"):
    """Three panels: per-step ``forward_ms`` and ``paused_ms`` of a run (and the baseline's
    ``forward_ms`` when given); client round trips per call (``client.stats()["rtt_ms"]``);
    checkpoint timings, one group per checkpoint, from dicts with ``label`` and any of
    ``dispatch_ms`` (server-side ``checkpoint()`` dispatch), ``ready_ms`` (client wall time
    from the ``checkpoint()`` call until ``wait()`` returned: dispatch + copy + round trips)
    and ``restore_ms`` (client wall time of ``restore()``).
    Traces (always seven): forward, paused, baseline forward, round trip, dispatch,
    ready, restore."""
    go = _go()
    from plotly.subplots import make_subplots
    steps = _result(result_or_steps).steps if hasattr(_result(result_or_steps), "steps") \
        else list(result_or_steps or [])
    bsteps = _result(baseline).steps if baseline is not None else []
    rtt = list(rtt_ms or [])
    cks = list(checkpoints or [])
    fig = make_subplots(rows=1, cols=3, column_widths=[0.45, 0.3, 0.25], horizontal_spacing=0.08,
                        subplot_titles=("per step (ms)", "client round trips (ms)",
                                        "checkpoints (ms)"))
    fig.add_trace(go.Bar(x=[r.step for r in steps], y=[r.forward_ms for r in steps],
                         name="forward", marker_color=STEER_COLOUR), row=1, col=1)
    fig.add_trace(go.Bar(x=[r.step for r in steps], y=[r.paused_ms for r in steps],
                         name="paused", marker_color="#f2cf5b"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[r.step for r in bsteps], y=[r.forward_ms for r in bsteps],
                             name="baseline forward", mode="lines",
                             line=dict(color=BASE_COLOUR)), row=1, col=1)
    fig.add_trace(go.Scatter(x=list(range(len(rtt))), y=rtt, name="round trip", mode="lines",
                             line=dict(color="#72b7b2")), row=1, col=2)
    labels = [c.get("label", str(i)) for i, c in enumerate(cks)]
    for key, name, colour in (("dispatch_ms", "dispatch", "#b279a2"),
                              ("ready_ms", "ready (client)", "#ff9da6"),
                              ("restore_ms", "restore (client)", "#9d755d")):
        fig.add_trace(go.Bar(x=labels, y=[c.get(key) for c in cks], name=name,
                             marker_color=colour), row=1, col=3)
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="call", row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=2)
    return _layout(fig, title, height=300)


def activation_norms(norms=None, *, start: int = 0, layer: Optional[int] = None,
                     step: Optional[int] = None):
    """Bars of the activation norm per position (``session.activation(reduce="norm")``),
    positions numbered from ``start`` (``Paused.start``). Traces (always one): ``norm``."""
    go = _go()
    norms = [] if norms is None else [float(v) for v in np.atleast_1d(norms)]
    fig = go.Figure(go.Bar(x=[start + i for i in range(len(norms))], y=norms, name="norm",
                           marker_color=BASE_COLOUR))
    where = "" if layer is None else f" after block {layer}, step {step}"
    fig.update_layout(xaxis=dict(title="position", type="category"), yaxis=dict(title="||h||"))
    return _layout(fig, "activation norm per position" + where, height=250)


def layer_heatmap(norms: Optional[dict] = None, *, layers: int = 0, steps: int = 0,
                  title: str = "activation norm of the current token, by layer (pauses seen)"):
    """Heatmap of activation norms: ``norms`` maps ``(layer, step)`` to the norm of that
    step's token after block ``layer``; cells never paused at stay empty (no data is
    invented). Traces (always one heatmap)."""
    go = _go()
    norms = norms or {}
    n_steps = max([steps] + [s + 1 for (_, s) in norms])
    n_layers = max([layers] + [l + 1 for (l, _) in norms])
    z = [[norms.get((l, s)) for s in range(n_steps)] for l in range(n_layers)]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n_steps)), y=list(range(n_layers)),
                               colorscale="Viridis", hoverongaps=False, name="norm",
                               colorbar=dict(title="||h||")))
    fig.update_layout(xaxis=dict(title="step"), yaxis=dict(title="layer"))
    return _layout(fig, title, height=280)


def _token_cell(text: str, style: str = "") -> str:
    shown = _html.escape(text.replace("\n", "\u21b5"), quote=True) or "&nbsp;"
    return f'<td style="padding:2px 4px;border:1px solid #ddd;white-space:pre;{style}">{shown}</td>'


def token_table(base=None, steered=None, *, labels: Sequence[str] = ("baseline", "steered")) -> str:
    """An HTML table aligning two generations token by token (one column per step);
    tokens of ``steered`` that differ from ``base`` are highlighted (class ``dj-div``)."""
    a = [r.text for r in _result(base).steps] if base is not None else []
    b = [r.text for r in _result(steered).steps] if steered is not None else []
    n = max(len(a), len(b))
    head = "".join(f'<th style="padding:2px 4px;color:#888;font-weight:normal">{i}</th>'
                   for i in range(n))
    row_a, row_b = [], []
    for i in range(n):
        ta = a[i] if i < len(a) else ""
        tb = b[i] if i < len(b) else ""
        differs = i < len(a) and i < len(b) and ta != tb
        row_a.append(_token_cell(ta))
        row_b.append(_token_cell(tb, f"background:{DIVERGENT_BG};font-weight:bold;")
                     .replace("<td ", '<td class="dj-div" ', 1) if differs else _token_cell(tb))
    return ('<div style="overflow-x:auto"><table class="dj-tokens" '
            'style="border-collapse:collapse;font-family:monospace;font-size:12px">'
            f'<tr><th></th>{head}</tr>'
            f'<tr><th style="text-align:left;color:{BASE_COLOUR}">{_html.escape(labels[0])}</th>'
            f'{"".join(row_a)}</tr>'
            f'<tr><th style="text-align:left;color:{STEER_COLOUR}">{_html.escape(labels[1])}</th>'
            f'{"".join(row_b)}</tr></table></div>')


def patching_heatmap(result, labels: Optional[Sequence[str]] = None):
    """Heatmap of a patching sweep (``PatchingResult``): layers x positions, normalised so
    the corrupted run is 0 and the clean run 1."""
    go = _go()
    x = [f"{p}: {labels[p]}" if labels is not None and p < len(labels) else str(p)
         for p in result.positions]
    fig = go.Figure(go.Heatmap(z=result.normalized, x=x, y=[str(layer) for layer in result.layers],
                               colorscale="RdBu", zmid=0, colorbar=dict(title="patched")))
    fig.update_xaxes(title_text="position")
    fig.update_yaxes(title_text=f"layer ({result.site})")
    return _layout(fig, f"Activation patching: logit difference recovered "
                        f"(clean {result.clean:.2f}, corrupted {result.corrupted:.2f})",
                   height=max(260, 18 * len(result.layers)))


def logit_lens(lens: dict, title: str = "Logit lens"):
    """The top-1 token and its probability after each layer (``Session.lens`` output), and
    the target token's probability per layer when one was given."""
    go = _go()
    layers = lens["layers"]
    top_p = np.asarray(lens["top_probs"])[:, 0]
    fig = go.Figure(go.Bar(x=layers, y=top_p, name="top-1 probability", marker_color=BASE_COLOUR,
                           text=[row[0] for row in lens["top_tokens"]], textposition="outside"))
    if "target_probs" in lens:
        fig.add_trace(go.Scatter(x=layers, y=np.asarray(lens["target_probs"]), mode="lines+markers",
                                 name="target probability", line=dict(color=STEER_COLOUR)))
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="probability", range=[0, 1.1])
    return _layout(fig, title)
