"""Figures of a run record, from the record alone: plotly (HTML) and matplotlib (PNG).

Each figure has one data function (record -> plain series) drawn by both backends, so
the HTML and the PNG always show the same numbers. Matplotlib is used through its
object API (``matplotlib.figure.Figure``), never pyplot: no backend is switched.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = ["#4c78a8", "#e45756", "#54a24b", "#f58518", "#b279a2", "#72b7b2", "#9d755d"]


def _err(m: dict):
    """(median, minus, plus) of a metric for an error bar from p10 to p90."""
    if m is None or m.get("median") is None:
        return None, 0.0, 0.0
    return m["median"], m["median"] - m["p10"], m["p90"] - m["median"]


# ---- data ---------------------------------------------------------------------------------
SWEEP_PANELS = (("tf_kl", "KL, teacher-forced (nats)"), ("kl", "KL, free-running (nats)"),
                ("mismatch_rate", "token mismatch"), ("top1_agreement", "top-1 agreement"))


def sweep_data(data: dict) -> dict:
    series = []
    xlabel = "scale"
    for entry in data["models"]:
        st = entry["metrics"].get("steering")
        if not st:
            continue
        vs = sorted((v for v in st["variants"] if v["in_sweep"]), key=lambda v: v["value"])
        if not vs:
            continue
        xlabel = "scale" if vs[0]["op"] == "scale" else "alpha"
        panels = {}
        for key, _ in SWEEP_PANELS:
            panels[key] = [_err(v["metrics"].get(key)) for v in vs]
        tf_top1 = [_err(v["metrics"].get("tf_top1_agreement")) for v in vs]
        series.append({"label": f"{entry['model']} (layer {st['layer']})",
                       "x": [v["value"] for v in vs], "panels": panels, "tf_top1": tf_top1})
    return {"series": series, "xlabel": xlabel}


def steps_data(data: dict) -> dict:
    """Per-step KL of each headline op, median over the runs at each step."""
    series = []
    for entry in data["models"]:
        variants = [v for v in entry.get("steering_variants", []) if v.get("in_ops")]
        for var in variants:
            free, tf = [], []
            for case in entry["cases"]:
                for e in case.get("steering") or []:
                    if e["key"] == var["key"]:
                        free.append(e["free"]["kl"])
                        if e.get("teacher_forced"):
                            tf.append(e["teacher_forced"]["kl"])
            label = f"{entry['model']}: {var['label']}"
            for name, runs in (("free-running", free), ("teacher-forced", tf)):
                if not runs:
                    continue
                n = min(len(r) for r in runs)
                arr = np.asarray([[np.nan if v is None else v for v in r[:n]] for r in runs], float)
                series.append({"label": f"{label}, {name}", "x": list(range(n)),
                               "y": np.nanmedian(arr, axis=0).tolist() if n else [],
                               "dash": name == "teacher-forced"})
    return {"series": series}


def latency_data(data: dict) -> dict:
    models, parts, total = [], {"compute": [], "server overhead": [], "network": []}, []
    for entry in data["models"]:
        lat = entry["metrics"].get("latency")
        if not lat:
            continue
        models.append(entry["model"])
        parts["compute"].append(lat["resume_compute_ms"]["median"])
        parts["server overhead"].append(lat["server_overhead_ms"]["median"])
        parts["network"].append(lat["network_rtt_ms"]["median"])
        total.append(_err(lat["resume_client_ms"]))
    return {"models": models, "parts": parts, "total": total}


def kv_data(data: dict) -> dict:
    series = []
    for entry in data["models"]:
        steps, wire, kv = [], [], []
        for case in entry["cases"]:
            for c in (case.get("resume") or {}).get("calls", [])[1:]:
                if c["ends"] == "paused" and c.get("kv_bytes"):
                    steps.append(c["step"])
                    wire.append(c["wire_bytes"])
                    kv.append(c["kv_bytes"])
        if steps:
            series.append({"model": entry["model"], "step": steps, "wire": wire, "kv": kv})
    return {"series": series}


CHECKPOINT_BARS = (("checkpoint_dispatch_client_ms", "dispatch (client)"),
                   ("checkpoint_dispatch_server_ms", "dispatch (server)"),
                   ("checkpoint_copy_wait_ms", "copy wait (client)"),
                   ("checkpoint_restore_ms", "restore (client)"))
#: a difference of two runs' forward times, so it can be negative: drawn as its samples
OVERHEAD_KEY = "checkpoint_generation_overhead_ms"
OVERHEAD_TITLE = "forward time while the copy runs, minus a run without it"
OVERHEAD_AXIS = "difference, ms (< 0: the run with the copy was faster)"


def checkpoint_data(data: dict) -> dict:
    """Costs (medians with p10 - p90) per model, and the generation overhead while a copy
    runs as all its samples: a difference that noise makes negative about as often as
    positive, so a lone median would mislead."""
    models, bars, overhead = [], {label: [] for _, label in CHECKPOINT_BARS}, []
    for entry in data["models"]:
        ck = entry["metrics"].get("checkpoint")
        if not ck:
            continue
        models.append(entry["model"])
        for key, label in CHECKPOINT_BARS:
            bars[label].append(_err(ck.get(key)))
        m = ck.get(OVERHEAD_KEY) or {}
        overhead.append({"samples": [v for v in m.get("samples") or [] if v is not None],
                         "median": m.get("median"), "p10": m.get("p10"), "p90": m.get("p90")})
    return {"models": models, "bars": bars, "overhead": overhead}


def _jitter(n: int, width: float = 0.25) -> np.ndarray:
    """Fixed horizontal offsets for n dots (no randomness: the figure is reproducible)."""
    return np.linspace(-width, width, n) if n > 1 else np.zeros(n)


# ---- plotly -------------------------------------------------------------------------------
MARKERS = ["circle", "square", "diamond", "triangle-up", "x", "star"]
MPL_MARKERS = ["o", "s", "D", "^", "x", "*"]


def _dodge(i: int, n: int, xs) -> list:
    """x values of series i of n, nudged apart so equal values do not hide each other."""
    span = (max(xs) - min(xs)) if len(xs) > 1 else 1.0
    return [x + (i - (n - 1) / 2) * 0.012 * span for x in xs]


def _layout(fig, title, height=360):
    # legends under the plot area, never over the data
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=height,
                      template="plotly_white", margin=dict(l=55, r=30, t=60, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
    return fig


def _ebar(points):
    return dict(type="data", symmetric=False, array=[p[2] for p in points],
                arrayminus=[p[1] for p in points], visible=True)


def plotly_figures(data: dict) -> dict:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    figs = {}
    sw = sweep_data(data)
    if sw["series"]:
        fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in SWEEP_PANELS],
                            horizontal_spacing=0.1, vertical_spacing=0.16)
        n = len(sw["series"])
        for i, s in enumerate(sw["series"]):
            c = COLOURS[i % len(COLOURS)]
            for j, (key, _) in enumerate(SWEEP_PANELS):
                pts = s["panels"][key]
                fig.add_trace(go.Scatter(x=_dodge(i, n, s["x"]), y=[p[0] for p in pts],
                                         error_y=_ebar(pts), mode="lines+markers", name=s["label"],
                                         legendgroup=s["label"], showlegend=j == 0,
                                         line=dict(color=c),
                                         marker=dict(symbol=MARKERS[i % len(MARKERS)] + "-open",
                                                     size=9)),
                              row=j // 2 + 1, col=j % 2 + 1)
        fig.update_xaxes(title_text=sw["xlabel"])
        figs["steering_sweep"] = _layout(fig, "steering sweep: medians, bars p10 – p90", 600)
    st = steps_data(data)
    if st["series"]:
        fig = go.Figure()
        for i, s in enumerate(st["series"]):
            fig.add_trace(go.Scatter(x=s["x"], y=s["y"], name=s["label"], mode="lines+markers",
                                     line=dict(color=COLOURS[(i // 2) % len(COLOURS)],
                                               dash="dash" if s["dash"] else "solid"),
                                     marker=dict(symbol="circle-open" if s["dash"] else "circle",
                                                 size=9 if s["dash"] else 6)))
        fig.update_layout(xaxis_title="step", yaxis_title="KL (nats), median over runs")
        figs["steering_steps"] = _layout(fig, "per-step KL of the headline steering ops", 420)
    la = latency_data(data)
    if la["models"]:
        fig = go.Figure()
        for i, (name, ys) in enumerate(la["parts"].items()):
            fig.add_trace(go.Bar(x=la["models"], y=ys, name=name, marker_color=COLOURS[i]))
        fig.add_trace(go.Scatter(x=la["models"], y=[t[0] for t in la["total"]],
                                 error_y=_ebar(la["total"]), mode="markers", name="client-observed",
                                 marker=dict(color="black", symbol="diamond", size=10)))
        fig.update_layout(barmode="relative", yaxis_title="ms per resume (median)")
        figs["resume_latency"] = _layout(fig, "pause -> resume -> next pause, and its parts")
    kv = kv_data(data)
    if kv["series"]:
        fig = go.Figure()
        for i, s in enumerate(kv["series"]):
            c = COLOURS[i % len(COLOURS)]
            fig.add_trace(go.Scatter(x=s["step"], y=s["kv"], mode="markers", name=f"{s['model']}: KV cache",
                                     marker=dict(color=c, symbol="square-open")))
            fig.add_trace(go.Scatter(x=s["step"], y=s["wire"], mode="markers",
                                     name=f"{s['model']}: bytes on the wire per resume",
                                     marker=dict(color=c, symbol="circle")))
        fig.update_layout(xaxis_title="step of the pause", yaxis_title="bytes", yaxis_type="log")
        figs["kv_residency"] = _layout(fig, "KV residency: bytes per resume vs the KV cache")
    ck = checkpoint_data(data)
    if ck["models"]:
        fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.12,
                            subplot_titles=["cost: median, bars p10 – p90", OVERHEAD_TITLE])
        for i, (label, pts) in enumerate(ck["bars"].items()):
            fig.add_trace(go.Bar(x=ck["models"], y=[p[0] for p in pts], error_y=_ebar(pts),
                                 name=label, marker_color=COLOURS[i % len(COLOURS)]), row=1, col=1)
        for i, (model, o) in enumerate(zip(ck["models"], ck["overhead"])):
            fig.add_trace(go.Scatter(x=(i + _jitter(len(o["samples"]))).tolist(), y=o["samples"],
                                     mode="markers", name="overhead: one run",
                                     legendgroup="overhead", showlegend=i == 0,
                                     marker=dict(color="#777", size=6, opacity=0.7)), row=1, col=2)
            if o["median"] is not None:
                fig.add_trace(go.Scatter(x=[i - 0.35, i + 0.35], y=[o["median"]] * 2, mode="lines",
                                         name="overhead: median", legendgroup="median",
                                         showlegend=i == 0, line=dict(color="black", width=3)),
                              row=1, col=2)
        fig.add_hline(y=0, line=dict(color="#888", width=1), row=1, col=2)
        fig.update_xaxes(tickvals=list(range(len(ck["models"]))), ticktext=ck["models"],
                         range=[-0.6, len(ck["models"]) - 0.4], row=1, col=2)
        fig.update_yaxes(title_text="ms", rangemode="tozero", row=1, col=1)
        fig.update_yaxes(title_text=OVERHEAD_AXIS, row=1, col=2)
        fig.update_layout(barmode="group")
        figs["checkpoint_cost"] = _layout(fig, "checkpoint cost, and generation while a copy runs",
                                          420)
    return figs


# ---- matplotlib ---------------------------------------------------------------------------
def _mpl_errorbar(ax, x, pts, **kw):
    ys = [np.nan if p[0] is None else p[0] for p in pts]
    if "fmt" not in kw:
        kw["marker"] = "o"
    ax.errorbar(x, ys, yerr=[[p[1] for p in pts], [p[2] for p in pts]], capsize=3, **kw)


def matplotlib_figures(data: dict) -> dict:
    from matplotlib.figure import Figure
    figs = {}
    sw = sweep_data(data)
    if sw["series"]:
        fig = Figure(figsize=(10, 7), layout="constrained")
        axes = fig.subplots(2, 2)
        for j, (key, title) in enumerate(SWEEP_PANELS):
            ax = axes[j // 2][j % 2]
            n = len(sw["series"])
            for i, s in enumerate(sw["series"]):
                # open markers of different shapes, nudged apart: equal values stay visible
                _mpl_errorbar(ax, _dodge(i, n, s["x"]), s["panels"][key],
                              color=COLOURS[i % len(COLOURS)], label=s["label"],
                              fmt=MPL_MARKERS[i % len(MPL_MARKERS)] + "-", markerfacecolor="none",
                              markersize=7)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(sw["xlabel"])
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)),
                   fontsize=8)
        fig.suptitle("steering sweep: medians, bars p10 – p90", fontsize=11)
        figs["steering_sweep"] = fig
    st = steps_data(data)
    if st["series"]:
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.subplots()
        for i, s in enumerate(st["series"]):
            c = COLOURS[(i // 2) % len(COLOURS)]
            ax.plot(s["x"], s["y"], marker="o", linestyle="--" if s["dash"] else "-", color=c,
                    markersize=9 if s["dash"] else 5, markerfacecolor="none" if s["dash"] else c,
                    label=s["label"])
        ax.set_xlabel("step")
        ax.set_ylabel("KL (nats), median over runs")
        ax.set_title("per-step KL of the headline steering ops", fontsize=11)
        ax.grid(alpha=0.3)
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
        figs["steering_steps"] = fig
    la = latency_data(data)
    if la["models"]:
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        x = np.arange(len(la["models"]))
        pos_bottom = np.zeros(len(x))
        neg_bottom = np.zeros(len(x))
        for i, (name, ys) in enumerate(la["parts"].items()):
            vals = np.asarray([0.0 if v is None else v for v in ys])
            bottom = np.where(vals >= 0, pos_bottom, neg_bottom)
            ax.bar(x, vals, 0.5, bottom=bottom, label=name, color=COLOURS[i])
            pos_bottom += np.where(vals >= 0, vals, 0)
            neg_bottom += np.where(vals < 0, vals, 0)
        _mpl_errorbar(ax, x, la["total"], color="black", linestyle="none", label="client-observed")
        ax.set_xticks(x, la["models"])
        ax.set_ylabel("ms per resume (median)")
        ax.set_title("pause -> resume -> next pause, and its parts", fontsize=11)
        fig.legend(loc="outside right upper", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        figs["resume_latency"] = fig
    kv = kv_data(data)
    if kv["series"]:
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.subplots()
        for i, s in enumerate(kv["series"]):
            c = COLOURS[i % len(COLOURS)]
            ax.scatter(s["step"], s["kv"], marker="s", facecolors="none", edgecolors=c,
                       label=f"{s['model']}: KV cache")
            ax.scatter(s["step"], s["wire"], marker="o", color=c,
                       label=f"{s['model']}: bytes on the wire per resume")
        ax.set_yscale("log")
        ax.set_xlabel("step of the pause")
        ax.set_ylabel("bytes")
        ax.set_title("KV residency: bytes per resume vs the KV cache", fontsize=11)
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
        ax.grid(alpha=0.3)
        figs["kv_residency"] = fig
    ck = checkpoint_data(data)
    if ck["models"]:
        fig = Figure(figsize=(10, 4.4), layout="constrained")
        ax, ax2 = fig.subplots(1, 2, width_ratios=[3, 2])
        x = np.arange(len(ck["models"]))
        n = len(ck["bars"])
        width = 0.8 / n
        for i, (label, pts) in enumerate(ck["bars"].items()):
            ys = [np.nan if p[0] is None else p[0] for p in pts]
            ax.bar(x + (i - (n - 1) / 2) * width, ys, width, label=label,
                   color=COLOURS[i % len(COLOURS)],
                   yerr=[[p[1] for p in pts], [p[2] for p in pts]], capsize=2)
        ax.set_xticks(x, ck["models"])
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.set_title("cost: median, bars p10 – p90", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.12), ncols=2, frameon=False)
        ax.grid(axis="y", alpha=0.3)
        for i, o in enumerate(ck["overhead"]):
            ax2.scatter(i + _jitter(len(o["samples"])), o["samples"], s=14, color="#777",
                        alpha=0.7, label="one run" if i == 0 else None)
            if o["median"] is not None:
                ax2.hlines(o["median"], i - 0.35, i + 0.35, color="black", linewidth=2.5,
                           label="median" if i == 0 else None)
        ax2.axhline(0, color="#888", linewidth=0.8)
        ax2.set_xticks(x, ck["models"])
        ax2.set_xlim(-0.6, len(x) - 0.4)
        ax2.set_ylabel(OVERHEAD_AXIS, fontsize=8)
        ax2.set_title(OVERHEAD_TITLE, fontsize=9)
        ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.12), ncols=2, frameon=False)
        ax2.grid(axis="y", alpha=0.3)
        fig.suptitle("checkpoint cost, and generation while a copy runs", fontsize=11)
        figs["checkpoint_cost"] = fig
    return figs


def write_figures(data: dict, directory) -> dict:
    """Write every figure of the record as ``NAME.html`` (plotly) and ``NAME.png``
    (matplotlib) under ``directory``; returns {name: {"html": path, "png": path}}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    for name, fig in plotly_figures(data).items():
        path = directory / f"{name}.html"
        fig.write_html(str(path), include_plotlyjs="directory", full_html=True)
        out.setdefault(name, {})["html"] = str(path)
    for name, fig in matplotlib_figures(data).items():
        path = directory / f"{name}.png"
        fig.savefig(str(path), dpi=110)
        out.setdefault(name, {})["png"] = str(path)
    return out
