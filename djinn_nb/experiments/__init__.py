"""Experiments from config files: run a study against a kernel server, keep a record.

>>> import djinn_nb.experiments as djx
>>> rec = djx.run("notebooks/configs/breakpoint_study_ci.yaml", out="runs/ci")
>>> rec                              # the headline table (medians, p10 - p90)
>>> djx.report("runs/ci")            # figures + summary again, from record.json alone

The same from a shell::

    python -m djinn_nb.experiments run CONFIG.yaml --out DIR [--server HOST:PORT] [--token T]
    python -m djinn_nb.experiments report DIR

A config (YAML, validated against ``config.schema.json``) names the models, prompts,
breakpoint layers, steering ops and a sweep, a checkpoint schedule, seeds, repetitions and
``max_new_tokens``; layers are clipped to each model's depth. The record directory gets
``record.json`` (validated against ``record.schema.json``), ``summary.md``, ``summary.html``
and one ``.html`` (plotly) and ``.png`` (matplotlib) file per figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .config import ConfigError, clip_layer, clip_layers, load_config, validate
from .record import ExperimentRecord, RecordError, headline_rows, validate_record

__all__ = ["run", "report", "load_config", "load_record", "validate", "validate_record",
           "ExperimentRecord", "ConfigError", "RecordError", "clip_layer", "clip_layers"]


def run(config: Union[str, Path, dict], out: Optional[Union[str, Path]] = None, *,
        server: Optional[str] = None, token: Optional[str] = None, client=None,
        device: Optional[str] = None, dtype: Optional[str] = None,
        progress: bool = True) -> ExperimentRecord:
    """Run a study and return its record (written to ``out`` when given).

    ``config``: a YAML path, YAML text or a dict (validated; defaults filled in).
    The server: ``client`` (an open ``dj.Client``, left open), else ``server`` ("host:port",
    with ``token`` if it needs one), else ``$DJINN_SERVER``, else a local server launched on
    the config's first model (``device`` / ``dtype`` for it) and stopped afterwards."""
    from .study import StudyRunner, connect_for
    cfg = load_config(config)
    own = client is None
    if own:
        client = connect_for(cfg, server=server, token=token, device=device, dtype=dtype,
                             progress=progress)
    try:
        data = StudyRunner(cfg, client, progress=progress).run()
    finally:
        if own:
            client.close()
    data["headline"] = headline_rows(data)
    validate_record(data)
    record = ExperimentRecord(data)
    if out is not None:
        record.write(out)
        _render(record, cfg.get("figures", True))
    return record


def _render(record: ExperimentRecord, figures: bool = True) -> None:
    from .figures import write_figures
    directory = record.directory
    record.figures = write_figures(record.data, directory) if figures else {}
    (directory / "summary.md").write_text(record.summary_markdown())
    (directory / "summary.html").write_text(record.summary_html())


def load_record(directory: Union[str, Path]) -> ExperimentRecord:
    """The record in ``directory`` (validated against the record schema)."""
    return ExperimentRecord.load(directory)


def report(directory: Union[str, Path], figures: bool = True) -> ExperimentRecord:
    """Re-render the figures and the summary (markdown + HTML) of a record directory from
    its record.json alone; no server is needed."""
    record = ExperimentRecord.load(directory)
    _render(record, figures)
    return record
