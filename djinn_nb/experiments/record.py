"""The run record: ``record.json`` (validated against ``record.schema.json``), its headline
table, and the summary files (``summary.md``, ``summary.html``) made from it alone."""
from __future__ import annotations

import functools
import html
import statistics
import json
from pathlib import Path
from typing import Optional, Union

from djinn_protocol.errors import InvalidArgumentError

SCHEMA_FILE = Path(__file__).with_name("record.schema.json")
RECORD_NAME = "record.json"


class RecordError(InvalidArgumentError):
    """A record.json that is missing, unreadable or does not match the record schema."""


@functools.lru_cache(maxsize=None)
def schema() -> dict:
    """The record JSON schema shipped with the package."""
    return json.loads(SCHEMA_FILE.read_text())


def validate_record(data: dict) -> None:
    """Raise :class:`RecordError` naming every place where ``data`` breaks the record schema."""
    import jsonschema
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message[:200]}"
                 for e in errors[:20]]
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        raise RecordError("the record does not match record.schema.json: "
                          + "; ".join(lines) + more)


# ---- the headline table --------------------------------------------------------------------
_LATENCY = ("resume_client_ms", "resume_compute_ms", "server_overhead_ms", "network_rtt_ms",
            "pause_overhead_vs_uninterrupted_ms")
_KV = ("wire_bytes_per_resume", "kv_bytes_at_pause", "wire_over_kv")
_STEER = ("mismatch_rate", "first_divergent_step", "kl", "tf_kl", "tv", "tf_tv", "top1_agreement",
          "tf_top1_agreement", "rel_logit_change", "tf_rel_logit_change", "tf_delta_logprob")
_CHECKPOINT = ("checkpoint_dispatch_client_ms", "checkpoint_dispatch_server_ms",
               "checkpoint_copy_wait_ms", "checkpoint_restore_ms",
               "checkpoint_generation_overhead_ms", "checkpoint_restore_exact")


def _center(m: dict):
    """The median a table shows. A step is a whole number: with an even number of runs the
    plain median can fall between two steps (14.5), so steps show the lower median, a step
    at which some run really diverged."""
    samples = [v for v in m.get("samples") or [] if v is not None]
    if m.get("unit") == "step" and samples:
        return statistics.median_low(samples)
    return m["median"]


def _row(model: str, group: str, key: str, m: dict) -> dict:
    how = m["how_measured"]
    if m.get("unit") == "step" and m.get("samples"):
        how += " Shown: the lower median (a step some run diverged at), not a midpoint."
    return {"model": model, "group": group, "key": key, "metric": m["name"], "unit": m["unit"],
            "median": _center(m), "p10": m["p10"], "p90": m["p90"], "n": m["n"],
            "how_measured": how}


def headline_rows(data: dict) -> list[dict]:
    """The headline table of a record: one row per (model, metric)."""
    rows = []
    for entry in data["models"]:
        model, m = entry["model"], entry["metrics"]
        if m.get("resume"):
            for key in ("token_identity", "logits_identity"):
                rows.append(_row(model, "resume", key, m["resume"][key]))
        for var in (m.get("steering") or {}).get("variants", []):
            if not var["in_ops"]:
                continue
            group = f"steering: {var['label']} @ layer {m['steering']['layer']}"
            for key in _STEER:
                if key in var["metrics"]:
                    rows.append(_row(model, group, key, var["metrics"][key]))
        if m.get("latency"):
            for key in _LATENCY:
                rows.append(_row(model, "resume latency", key, m["latency"][key]))
        if m.get("kv"):
            for key in _KV:
                rows.append(_row(model, "KV residency", key, m["kv"][key]))
        if m.get("checkpoint"):
            for key in _CHECKPOINT:
                rows.append(_row(model, "checkpoint cost", key, m["checkpoint"][key]))
    return rows


def sweep_rows(data: dict) -> list[dict]:
    """Per model and sweep value: medians of the steering metrics."""
    rows = []
    for entry in data["models"]:
        st = entry["metrics"].get("steering")
        if not st:
            continue
        for var in sorted((v for v in st["variants"] if v["in_sweep"]), key=lambda v: v["value"]):
            row = {"model": entry["model"], "layer": st["layer"], "op": var["op"],
                   "value": var["value"]}
            for key in _STEER:
                met = var["metrics"].get(key)
                row[key] = None if met is None else _center(met)
                row[key + "_p10"] = None if met is None else met["p10"]
                row[key + "_p90"] = None if met is None else met["p90"]
            rows.append(row)
    return rows


def fmt(value, unit: str = "") -> str:
    """A number for a table: bytes as KiB/MiB, fractions and ms to 3 significant digits."""
    if value is None:
        return "–"
    if unit == "bytes":
        v = float(value)
        for suffix, scale in (("MiB", 2**20), ("KiB", 2**10)):
            if abs(v) >= scale:
                return f"{v / scale:.3g} {suffix}"
        return f"{v:.0f} B"
    if unit == "step":
        return f"{value:.3g}"
    v = float(value)
    if v == 0:
        return "0"
    if abs(v) < 1e-3 or abs(v) >= 1e5:
        return f"{v:.3g}"
    return f"{v:.4g}" if unit in ("fraction", "ratio", "nats", "") else f"{v:.3g}"


def _spread(row) -> str:
    if row["p10"] is None:
        return "–"
    return f"{fmt(row['p10'], row['unit'])} – {fmt(row['p90'], row['unit'])}"


def _unit(u: str) -> str:
    return {"bytes": "", "fraction": "", "": ""}.get(u, u)


def markdown_table(rows: list[dict]) -> str:
    out = ["| model | group | metric | median | p10 – p90 | n | unit |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['group']} | {r['metric']} (`{r['key']}`) | "
                   f"{fmt(r['median'], r['unit'])} | {_spread(r)} | {r['n']} | {_unit(r['unit'])} |")
    return "\n".join(out)


def html_table(rows: list[dict], how: bool = True) -> str:
    head = ("<tr><th>model</th><th>group</th><th>metric</th><th>median</th><th>p10 – p90</th>"
            "<th>n</th><th>unit</th>" + ("<th>how measured</th>" if how else "") + "</tr>")
    body = []
    for r in rows:
        e = html.escape
        body.append(
            f"<tr><td>{e(r['model'])}</td><td>{e(r['group'])}</td>"
            f"<td title=\"{e(r['how_measured'])}\">{e(r['metric'])}</td>"
            f"<td style=\"text-align:right\">{e(fmt(r['median'], r['unit']))}</td>"
            f"<td style=\"text-align:right\">{e(_spread(r))}</td><td>{r['n']}</td>"
            f"<td>{e(_unit(r['unit']))}</td>"
            + (f"<td style=\"font-size:85%;color:#555\">{e(r['how_measured'])}</td>" if how else "")
            + "</tr>")
    return ("<table class=\"dj-study\" style=\"border-collapse:collapse\">" + head
            + "".join(body) + "</table>")


def sweep_markdown(rows: list[dict]) -> str:
    cols = ("mismatch_rate", "first_divergent_step", "kl", "tf_kl", "top1_agreement",
            "tf_top1_agreement", "rel_logit_change", "tf_rel_logit_change")
    heads = [c + " (lower median)" if c == "first_divergent_step" else c for c in cols]
    out = ["| model | layer | op | value | " + " | ".join(heads) + " |",
           "| --- | --- | --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['layer']} | {r['op']} | {r['value']:g} | "
                   + " | ".join(fmt(r[c], "step" if c == "first_divergent_step" else "")
                                for c in cols) + " |")
    return "\n".join(out)


# ---- the record object ---------------------------------------------------------------------
class ExperimentRecord:
    """A run record: ``data`` is record.json as a dict; ``directory`` where it lives.

    In a notebook it shows its headline table. ``headline()`` gives the rows,
    ``figures`` the files written (name -> {"html": path, "png": path})."""

    def __init__(self, data: dict, directory: Optional[Union[str, Path]] = None):
        self.data = data
        self.directory = Path(directory) if directory is not None else None
        self.figures: dict = {}

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ExperimentRecord":
        """The record in directory ``path`` (or the record.json file ``path``), validated."""
        path = Path(path)
        file = path / RECORD_NAME if path.is_dir() else path
        if not file.is_file():
            raise RecordError(f"no {RECORD_NAME} in {str(path)!r}")
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RecordError(f"cannot read {file}: {exc}") from None
        validate_record(data)
        return cls(data, file.parent)

    @property
    def path(self) -> Optional[Path]:
        return None if self.directory is None else self.directory / RECORD_NAME

    @property
    def models(self) -> list[str]:
        return [m["model"] for m in self.data["models"]]

    def model(self, name: str) -> dict:
        for m in self.data["models"]:
            if m["model"] == name:
                return m
        raise KeyError(f"no model {name!r} in this record (models: {', '.join(self.models)})")

    def metrics(self, model: str) -> dict:
        return self.model(model)["metrics"]

    def metric(self, model: str, group: str, key: str, variant=None) -> dict:
        """One metric of one model: ``rec.metric("smollm2-135m", "steering", "tf_kl")["median"]``.

        ``group`` is a key of the model's metrics (``resume``, ``latency``, ``kv``,
        ``steering``, ``checkpoint``, ...). A steering metric comes from the headline op
        (the one variant run as an op) unless ``variant`` names another by label
        (``"scale 0.5"``) or value (``0.5``). The dict holds ``median``, ``p10``, ``p90``,
        ``n``, ``unit``, ``how_measured`` and, where kept, ``samples``. Unknown names raise
        a ``KeyError`` that lists the choices."""
        metrics = self.metrics(model)
        if group not in metrics:
            raise KeyError(f"no metric group {group!r} for {model} (groups: {', '.join(metrics)})")
        found = metrics[group]
        if group == "steering":
            found = self._variant(found["variants"], variant)["metrics"]
        elif variant is not None:
            raise KeyError(f"variant= is for the steering group, not {group!r}")
        if key not in found or not isinstance(found[key], dict):
            names = [k for k, v in found.items() if isinstance(v, dict)]
            raise KeyError(f"no metric {key!r} in {model}'s {group} (metrics: {', '.join(names)})")
        return found[key]

    @staticmethod
    def _variant(variants: list, variant) -> dict:
        if variant is None:
            ops = [v for v in variants if v["in_ops"]]
            if len(ops) == 1:
                return ops[0]
            raise KeyError("name the steering variant (variant=): "
                           + ", ".join(repr(v["label"]) for v in ops or variants))
        for v in variants:
            if v["label"] == variant or (not isinstance(variant, str) and v["value"] == variant):
                return v
        raise KeyError(f"no steering variant {variant!r} (variants: "
                       + ", ".join(repr(v["label"]) for v in variants) + ")")

    def tokens(self, model: str) -> dict:
        """{(rep, prompt_index, seed): baseline tokens} of a model (to compare runs)."""
        return {(c["rep"], c["prompt_index"], c["seed"]): c["baseline"]["tokens"]
                for c in self.model(model)["cases"]}

    def headline(self) -> list[dict]:
        return self.data.get("headline") or headline_rows(self.data)

    def sweep(self) -> list[dict]:
        return sweep_rows(self.data)

    def validate(self) -> None:
        validate_record(self.data)

    def write(self, directory: Union[str, Path]) -> Path:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (RECORD_NAME + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, allow_nan=False))
        tmp.replace(self.directory / RECORD_NAME)
        return self.directory / RECORD_NAME

    def summary_markdown(self) -> str:
        d = self.data
        lines = [f"# {d['name']}", ""]
        if d.get("description"):
            lines += [d["description"].strip(), ""]
        lines += [f"Run {d['created']} – {d['finished']} ({d['duration_s']:.1f} s) against "
                  f"{d['environment']['server']['address']}; config sha256 "
                  f"`{d['config_sha256'][:12]}`. Medians with p10 – p90 over "
                  f"{d['config']['repetitions']} repetitions x {len(d['config']['prompts'])} prompts "
                  f"x {len(d['config']['seeds'])} seeds.", ""]
        for m in d["models"]:
            f = m["facts"]
            lines.append(f"- **{m['model']}**: {f['architecture']}, {f['layers']} layers, hidden "
                         f"{f['hidden_size']}, {f['device']}/{f['dtype']}; layers used "
                         f"{json.dumps({k: v for k, v in m['layers'].items() if k != 'model_layers'})}; "
                         f"model hash ({m['model_hash']['kind']}) `{m['model_hash']['value'][:16]}`; "
                         f"server versions {json.dumps(m.get('server_versions'))}")
        lines += ["", "## Headline", "", markdown_table(self.headline()), ""]
        sweep = self.sweep()
        if sweep:
            lines += ["## Steering sweep (medians)", "", sweep_markdown(sweep), ""]
        notes = list(d.get("notes", [])) + [f"{m['model']}: {n}" for m in d["models"]
                                           for n in m.get("notes", [])]
        if notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        lines += ["## How each number was measured", ""]
        lines += [f"- `{k}`: {v}" for k, v in d["how_measured"].items()]
        if self.figures:
            lines += ["", "## Figures", ""]
            lines += [f"- {name}: " + ", ".join(f"[{kind}]({Path(p).name})" for kind, p in files.items())
                      for name, files in self.figures.items()]
        return "\n".join(lines) + "\n"

    def summary_html(self) -> str:
        d = self.data
        e = html.escape
        parts = [f"<h1>{e(d['name'])}</h1>",
                 f"<p>{e(d.get('description') or '')}</p>",
                 f"<p>Run {e(d['created'])} against {e(d['environment']['server']['address'])}, "
                 f"{d['duration_s']:.1f} s. Medians with p10 – p90; hover a metric for how it "
                 "was measured.</p>",
                 html_table(self.headline())]
        sweep = self.sweep()
        if sweep:
            rows = "".join(
                f"<tr><td>{e(r['model'])}</td><td>{r['layer']}</td><td>{e(r['op'])}</td>"
                f"<td>{r['value']:g}</td><td>{fmt(r['mismatch_rate'])}</td><td>{fmt(r['kl'])}</td>"
                f"<td>{fmt(r['tf_kl'])}</td><td>{fmt(r['top1_agreement'])}</td>"
                f"<td>{fmt(r['tf_top1_agreement'])}</td><td>{fmt(r['rel_logit_change'])}</td></tr>"
                for r in sweep)
            parts.append("<h2>Steering sweep (medians)</h2><table><tr><th>model</th><th>layer</th>"
                         "<th>op</th><th>value</th><th>mismatch</th><th>KL</th><th>KL (TF)</th>"
                         "<th>top-1</th><th>top-1 (TF)</th><th>rel. logit change</th></tr>"
                         + rows + "</table>")
        for name, files in self.figures.items():
            if "png" in files:
                parts.append(f"<h3>{e(name)}</h3><p><img src=\"{e(Path(files['png']).name)}\" "
                             f"style=\"max-width:100%\"> <a href=\"{e(Path(files['html']).name)}\">"
                             "interactive</a></p>")
        return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>"
                + e(d["name"]) + "</title><style>td,th{border:1px solid #ddd;padding:2px 6px}"
                "</style></head><body>" + "".join(parts) + "</body></html>")

    def _repr_html_(self) -> str:
        return html_table(self.headline(), how=False)

    def __repr__(self):
        where = f" in {self.directory}" if self.directory else ""
        return f"<djinn_nb ExperimentRecord {self.data['name']!r}: {', '.join(self.models)}{where}>"
