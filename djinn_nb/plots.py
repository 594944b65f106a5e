"""Plotly figures and HTML views of generations, divergence and latency, without widgets.

For papers and static notebooks: every figure function returns a
``plotly.graph_objects.Figure`` (plotly is imported inside the functions, so
``import djinn_nb`` stays light); ``token_table`` returns an HTML string. The dashboard
(``dj.Dashboard``) draws the same figures and copies them into live ``FigureWidget`` objects,
so each figure always has the same traces, empty when there is no data.

>>> fig = dj.plots.divergence(base, steered)     # Finished / GenerationResult / Divergence
>>> fig = dj.plots.latency(steered, baseline=base, rtt_ms=[client.ping() for _ in range(5)])
>>> html = dj.plots.token_table(base, steered)   # tokens aligned, divergence coloured, top-k on hover
"""
from __future__ import annotations

import html as _html
from typing import Callable, Optional, Sequence

import numpy as np

#: colours shared by the figures and the token table
BASE_COLOUR = "#4c78a8"
STEER_COLOUR = "#e45756"
AGREE_COLOUR = "#54a24b"
DIVERGENT_BG = "#ffd6d6"
#: whitespace drawn visibly in token labels (a bare " " or "\n" cell reads as empty)
_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def _go():
    import plotly.graph_objects as go
    return go


def _result(x):
    return getattr(x, "result", x)


def _layout(fig, title: str, height: int = 280):
    # the legend goes under the plot: long titles and subplot titles stay readable
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=height + 40,
                      margin=dict(l=60, r=60, t=60, b=40), template="plotly_white",
                      legend=dict(orientation="h", yanchor="top", y=-0.25, x=0, xanchor="left"))
    return fig


def token_label(text: str) -> str:
    """``text`` with whitespace made visible: ␣ for a space, ↵ newline, ⇥ tab; ∅ for ''."""
    return "".join(_VISIBLE.get(c, c) for c in text) or "\u2205"


def format_probability(p: float) -> str:
    """A probability with enough digits to tell small ones apart: 0.412, 0.0371, 3.2e-05."""
    p = float(p)
    if p >= 0.01 or p == 0.0:
        return f"{p:.3f}"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def divergence(base=None, steered=None, *, div=None, title: Optional[str] = None):
    """Per generated token: KL(baseline || steered) of the next-token distributions (left
    axis, nats) and top-1 agreement (right axis, 1 = same argmax), of two results of the
    same prompt generated with ``return_logits=True``. Pass ``div=`` a ``dj.Divergence``
    to skip computing it. Traces (always two): ``KL``, ``top-1 agree``."""
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
    fig.update_layout(xaxis=dict(title="generated token (step)"),
                      yaxis=dict(title="KL(baseline || steered), nats", rangemode="tozero"),
                      yaxis2=dict(title="top-1 agree", overlaying="y", side="right",
                                  range=[-0.1, 1.1], tickvals=[0, 1]))
    return _layout(fig, title if title is not None else _divergence_title(div))


def _divergence_title(div) -> str:
    title = "Next-token divergence per generated token, steered vs baseline"
    if div is None:
        return title
    s = div.summary()
    first = s["first_divergent_step"]
    where = ("no generated token differs" if first is None
             else f"first differing token at step {first}")
    return (f"{title}<br><sub>mean KL {s['mean_kl']:.3g} nats, top-1 agreement "
            f"{s['top1_agreement']:.0%}, {where} ({s['steps']} steps)</sub>")


def _steps_of(x) -> list:
    r = _result(x)
    return list(r.steps) if hasattr(r, "steps") else list(x or [])


def latency(result_or_steps=None, *, baseline=None, rtt_ms: Optional[Sequence[float]] = None,
            checkpoints: Optional[Sequence[dict]] = None,
            title: str = "Where the time goes (milliseconds)"):
    """Four panels, all in milliseconds. *Prefill*: the forward time of step 0 (the whole
    prompt) of the run and of ``baseline``. *Decode*: per generated token after the first,
    ``forward_ms`` (compute, excluding pauses) and ``paused_ms`` of the run, and the
    baseline's ``forward_ms``. *Round trip*: ``rtt_ms``, samples of calls that do no model
    compute (``client.ping()``), so the network is not confused with generation time.
    *Checkpoints*: one group per dict with ``label`` and any of ``dispatch_ms`` (server
    side), ``ready_ms`` (client: ``checkpoint()`` until ``wait()`` returned) and
    ``restore_ms`` (client: ``restore()``).
    Traces (always eight): forward, paused, baseline forward, prefill, round trip,
    dispatch, ready (client), restore (client)."""
    from plotly.subplots import make_subplots
    steps, bsteps = _steps_of(result_or_steps), _steps_of(baseline)
    fig = make_subplots(rows=1, cols=4, column_widths=[0.12, 0.43, 0.2, 0.25],
                        horizontal_spacing=0.07,
                        subplot_titles=("prefill", "decode, per token", "round trip (no compute)",
                                        "checkpoints"))
    _step_traces(fig, steps, bsteps, _go())
    rtt = [float(v) for v in (rtt_ms or [])]
    fig.add_trace(_go().Scatter(x=list(range(1, len(rtt) + 1)), y=rtt, name="round trip",
                                mode="lines+markers", line=dict(color="#72b7b2")), row=1, col=3)
    _checkpoint_bars(fig, list(checkpoints or []), _go())
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="step", row=1, col=2)
    fig.update_xaxes(title_text="sample", row=1, col=3)
    fig.update_yaxes(rangemode="tozero")
    for col, unit in ((1, "ms"), (2, "ms per token"), (3, "ms"), (4, "ms")):
        fig.update_yaxes(title_text=unit, row=1, col=col)
    return _layout(fig, title, height=300)


def _step_traces(fig, steps: list, bsteps: list, go) -> None:
    """Decode steps (after the first token) in column 2, the prefill (step 0) in column 1."""
    decode, bdecode = [r for r in steps if r.step > 0], [r for r in bsteps if r.step > 0]
    fig.add_trace(go.Bar(x=[r.step for r in decode], y=[r.forward_ms for r in decode],
                         name="forward", marker_color=STEER_COLOUR), row=1, col=2)
    fig.add_trace(go.Bar(x=[r.step for r in decode], y=[r.paused_ms for r in decode],
                         name="paused", marker_color="#f2cf5b"), row=1, col=2)
    fig.add_trace(go.Scatter(x=[r.step for r in bdecode], y=[r.forward_ms for r in bdecode],
                             name="baseline forward", mode="lines",
                             line=dict(color=BASE_COLOUR)), row=1, col=2)
    runs = [(name, s[0].forward_ms, c) for name, s, c in
            (("baseline", bsteps, BASE_COLOUR), ("run", steps, STEER_COLOUR)) if s and s[0].step == 0]
    fig.add_trace(go.Bar(x=[r[0] for r in runs], y=[r[1] for r in runs], name="prefill",
                         marker_color=[r[2] for r in runs]), row=1, col=1)


def _checkpoint_bars(fig, cks: list, go) -> None:
    labels = [c.get("label", str(i)) for i, c in enumerate(cks)]
    for key, name, colour in (("dispatch_ms", "dispatch", "#b279a2"),
                              ("ready_ms", "ready (client)", "#ff9da6"),
                              ("restore_ms", "restore (client)", "#9d755d")):
        fig.add_trace(go.Bar(x=labels, y=[c.get(key) for c in cks], name=name,
                             marker_color=colour), row=1, col=4)


def activation_norms(norms=None, *, start: int = 0, layer: Optional[int] = None,
                     step: Optional[int] = None, site: str = "resid"):
    """Bars of the L2 norm of the paused hidden state per position
    (``session.activation(reduce="norm")``), positions numbered from ``start``
    (``Paused.start``) and drawn as categories: a decode pause (one position) is one
    narrow bar, not a bar across a fractional axis. Traces (always one): ``norm``."""
    go = _go()
    norms = [] if norms is None else [float(v) for v in np.atleast_1d(norms)]
    x = [str(start + i) for i in range(len(norms))]
    fig = go.Figure(go.Bar(x=x, y=norms, name="norm", marker_color=BASE_COLOUR,
                           width=[0.4 if len(norms) == 1 else 0.8] * len(norms)))
    title = "L2 norm of the hidden state per position"
    if layer is not None:
        where = "" if site == "resid" else f" ({site})"
        what = "1 position: this step's token" if len(norms) == 1 else f"{len(norms)} positions"
        title += f"<br><sub>after block {layer}{where}, step {step}; {what}</sub>"
    fig.update_layout(xaxis=dict(title="position", type="category"),
                      yaxis=dict(title="||h|| (L2)", rangemode="tozero"))
    return _layout(fig, title, height=250)


def layer_heatmap(norms: Optional[dict] = None, *, layers: int = 0, steps: int = 0,
                  title: str = "L2 norm of each step's token after each block (pauses seen)"):
    """Heatmap of activation norms: ``norms`` maps ``(layer, step)`` to the norm of that
    step's token after block ``layer``; cells never paused at stay empty (no data is
    invented). The colour scale starts at 0 (norms are never negative) and every row is
    inside the axis. Traces (always one heatmap)."""
    go = _go()
    norms = norms or {}
    n_steps = max([steps] + [s + 1 for (_, s) in norms])
    n_layers = max([layers] + [l + 1 for (l, _) in norms])
    z = [[norms.get((l, s)) for s in range(n_steps)] for l in range(n_layers)]
    top = max([v for v in norms.values() if v is not None], default=1.0)
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n_steps)), y=list(range(n_layers)),
                               colorscale="Viridis", hoverongaps=False, name="norm",
                               zmin=0.0, zmax=top if top > 0 else 1.0,
                               colorbar=dict(title="||h||")))
    fig.update_layout(xaxis=dict(title="step", range=[-0.5, max(n_steps, 1) - 0.5]),
                      yaxis=dict(title="block (layer)", range=[-0.5, max(n_layers, 1) - 0.5]))
    return _layout(fig, title, height=max(260, 12 * n_layers + 120))


def _comparable_divergence(base, steered):
    """``dj.divergence`` of the two runs, or None when they cannot be compared (another
    prompt, no logits): the table then only marks differing tokens."""
    if base is None or steered is None:
        return None
    a, b = _result(base), _result(steered)
    if a.prompt_tokens != b.prompt_tokens or a.logits is None or b.logits is None:
        return None
    from .divergence import divergence as compute
    return compute(a, b)


def _hover(rec, names: Callable[[int], str], note: str) -> str:
    lines = [f"step {rec.step}: {token_label(rec.text)}" + note, "top-k next-token probabilities:"]
    lines += [f"  {names(int(i))}  {format_probability(p)}"
              for i, p in zip(rec.top_ids, rec.top_probs)]
    return _html.escape("\n".join(lines), quote=True).replace("\n", "&#10;")


def _cell(rec, names, style: str = "", cls: str = "", note: str = "") -> str:
    base = "padding:2px 4px;border:1px solid #ddd;white-space:pre;"
    if rec is None:
        return f'<td style="{base}">&nbsp;</td>'
    klass = f' class="{cls}"' if cls else ""
    return (f'<td{klass} title="{_hover(rec, names, note)}" style="{base}{style}">'
            f'{_html.escape(token_label(rec.text))}</td>')


def _namer(runs, token_text) -> Callable[[int], str]:
    known = {r.token_id: r.text for steps in runs for r in steps}

    def name(i: int) -> str:
        text = known.get(i)
        if text is None and token_text is not None:
            text = token_text(i)
        return f"#{i}" if text is None else token_label(text)
    return name


def token_table(base=None, steered=None, *, labels: Sequence[str] = ("baseline", "steered"),
                div=None, token_text: Optional[Callable[[int], Optional[str]]] = None,
                per_row: int = 24, max_height: str = "15em") -> str:
    """An HTML view aligning two generations token by token, ``per_row`` steps per block,
    inside a box of at most ``max_height`` that scrolls on its own (a long run never
    widens the page). Whitespace is drawn visibly (␣, ↵). Steered tokens that differ from
    ``base`` are bold and underlined (class ``dj-div``); with the logits of both runs of
    the same prompt (or ``div=``, a ``dj.Divergence``) each steered cell is shaded by that
    step's KL(baseline || steered). Hovering a cell shows its step and the top-k
    next-token probabilities; ``token_text(id)`` names top-k ids that neither run chose
    (else they show as ``#id``)."""
    a = _steps_of(base) if base is not None else []
    b = _steps_of(steered) if steered is not None else []
    if div is None:
        div = _comparable_divergence(base, steered)
    names = _namer((a, b), token_text)
    kl = [float(v) for v in div.kl] if div is not None else []
    top = max(kl, default=0.0)
    rows = []
    for lo in range(0, max(len(a), len(b)), per_row):
        idx = range(lo, min(lo + per_row, max(len(a), len(b))))
        rows.append('<tr><th></th>' + "".join(
            f'<th style="padding:2px 4px;color:#888;font-weight:normal">{i}</th>' for i in idx)
            + "</tr>")
        rows.append(_row(labels[0], BASE_COLOUR,
                         [_cell(a[i] if i < len(a) else None, names) for i in idx]))
        rows.append(_row(labels[1], STEER_COLOUR,
                         [_steered_cell(a, b, i, kl, top, names) for i in idx]))
    legend = ("<div style='color:#777;font-size:11px'>shade: KL(baseline || steered) of the "
              "step (darker = larger); <b><u>bold</u></b>: the token differs; hover a token "
              "for the top-k probabilities</div>" if b else "")
    return (f'<div class="dj-token-scroll" style="width:100%;max-width:100%;max-height:{max_height};'
            'overflow:auto;box-sizing:border-box"><table class="dj-tokens" '
            'style="border-collapse:collapse;font-family:monospace;font-size:12px">'
            + "".join(rows) + f"</table></div>{legend}")


def _row(label: str, colour: str, cells: list) -> str:
    return (f'<tr><th style="text-align:left;color:{colour};padding-right:6px">'
            f'{_html.escape(label)}</th>{"".join(cells)}</tr>')


def _steered_cell(a: list, b: list, i: int, kl: list, top: float, names) -> str:
    if i >= len(b):
        return _cell(None, names)
    differs = i < len(a) and a[i].text != b[i].text
    style, note = "", ""
    if i < len(kl):
        note = f" (KL {kl[i]:.3g} nats)"
        if top > 0 and kl[i] > 0:
            style = f"background:rgba(228,87,86,{0.08 + 0.6 * kl[i] / top:.2f});"
    elif differs:
        style = f"background:{DIVERGENT_BG};"
    if differs:
        style += "font-weight:bold;text-decoration:underline;"
    return _cell(b[i], names, style, "dj-div" if differs else "", note)


def patching_heatmap(result, labels: Optional[Sequence[str]] = None):
    """Heatmap of a patching sweep (``PatchingResult``): layers x positions, normalised so
    the corrupted run is 0 and the clean run 1."""
    go = _go()
    x = [f"{p}: {token_label(labels[p])}" if labels is not None and p < len(labels) else str(p)
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
    the target token's probability per layer when one was given. Labels show whitespace
    (␣, ↵) and small probabilities in scientific notation; the axis fits them."""
    go = _go()
    layers = lens["layers"]
    top_p = np.asarray(lens["top_probs"])[:, 0]
    text = [f"{token_label(row[0])} {format_probability(p)}"
            for row, p in zip(lens["top_tokens"], top_p)]
    fig = go.Figure(go.Bar(x=layers, y=top_p, name="top-1 probability", marker_color=BASE_COLOUR,
                           text=text, textposition="outside"))
    peak = float(top_p.max()) if top_p.size else 1.0
    if "target_probs" in lens:
        target = np.asarray(lens["target_probs"])
        peak = max(peak, float(target.max()) if target.size else 0.0)
        fig.add_trace(go.Scatter(x=layers, y=target, mode="lines+markers",
                                 name="target probability", line=dict(color=STEER_COLOUR)))
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="probability", range=[0, 1.1 if peak > 0.5 else peak * 1.3 or 1.0])
    return _layout(fig, title)


def _axis_labels(tokens: Optional[Sequence[str]], n: int) -> list:
    """Tick text per position: the token with whitespace made visible, else the position.
    Positions are the axis values, so repeated tokens stay separate cells."""
    if tokens is None:
        return [str(i) for i in range(n)]
    return [token_label(tokens[i]) if i < len(tokens) else str(i) for i in range(n)]


def attention_pattern(pattern, tokens: Optional[Sequence[str]] = None, *,
                      heads: Optional[Sequence[int]] = None, layer: Optional[int] = None,
                      cols: int = 3, panel_px: int = 230, title: Optional[str] = None):
    """Attention probabilities as query x key heatmaps, one panel per head.

    ``pattern``: ``[heads, query, key]`` (``session.cache(prompt, sites="attn_pattern",
    layers=[L])["attn_pattern", L]``); ``tokens``: the prompt's token texts, for both axes
    (whitespace drawn visibly: ␣, ↵). Rows are queries (top to bottom), columns the keys
    they attend to; every row sums to 1. Cells a causal mask hides (key after query, exact
    zeros) are left blank rather than drawn as a probability of 0. One colour scale, 0 to 1,
    for all panels; hovering a cell names the query and key tokens and the probability.
    ``heads`` picks the heads to draw (default all). Traces: one heatmap per drawn head."""
    from plotly.subplots import make_subplots
    go = _go()
    pat = np.asarray(pattern, dtype=np.float64)
    if pat.ndim == 2:
        pat = pat[None]
    if pat.ndim != 3 or pat.shape[1] > pat.shape[2]:
        raise ValueError(f"attention_pattern needs [heads, query, key], got shape {pat.shape}")
    n_heads, n_q, n_k = pat.shape
    chosen = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in chosen if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"heads {bad} out of range: the pattern has {n_heads} heads")
    cols = max(1, min(cols, len(chosen)))
    rows = -(-len(chosen) // cols)
    offset = n_k - n_q            # queries are the last n_q positions of the keys
    klabels = _axis_labels(tokens, n_k)
    qlabels = klabels[offset:]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in chosen],
                        horizontal_spacing=0.12 / cols + 0.04, vertical_spacing=0.2 / rows + 0.04)
    q_idx, k_idx = np.meshgrid(np.arange(n_q), np.arange(n_k), indexing="ij")
    future = k_idx > q_idx + offset
    hover_q = np.array(qlabels, dtype=object)[:, None].repeat(n_k, 1)
    hover_k = np.array(klabels, dtype=object)[None, :].repeat(n_q, 0)
    custom = np.dstack([hover_q, hover_k])
    for i, h in enumerate(chosen):
        z = np.where(future & (pat[h] == 0), np.nan, pat[h])
        fig.add_trace(go.Heatmap(
            z=z.tolist(), x=list(range(n_k)), y=list(range(n_q)), customdata=custom,
            zmin=0.0, zmax=1.0, colorscale="Blues", hoverongaps=False, name=f"head {h}",
            showscale=i == 0, colorbar=dict(title="p(attend)", len=0.9),
            hovertemplate=("head " + str(h) + "<br>query %{y}: %{customdata[0]}"
                           "<br>key %{x}: %{customdata[1]}<br>p = %{z:.3f}<extra></extra>")),
            row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(tickmode="array", tickvals=list(range(n_k)), ticktext=klabels,
                     tickangle=-60, tickfont=dict(family="monospace", size=10), showgrid=False,
                     zeroline=False)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_q)), ticktext=qlabels,
                     autorange="reversed", tickfont=dict(family="monospace", size=10),
                     showgrid=False, zeroline=False)
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text="query", row=r, col=1)
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text="key", row=rows, col=c)
    where = f" of block {layer}" if layer is not None else ""
    if title is None:
        title = (f"Attention pattern{where}: query (row) x key (column), per head"
                 f"<br><sub>probability that the query position attends to the key position; "
                 f"rows sum to 1; blank: masked (a later key)</sub>")
    fig = _layout(fig, title, height=rows * panel_px + 40)
    fig.update_layout(margin=dict(l=90, r=60, t=90, b=80))
    return fig
