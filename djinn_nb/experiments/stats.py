"""Summary statistics of repeated measurements: a median and its spread, never one run."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np


def clean(x):
    """``x`` as JSON-safe builtins: numpy scalars and arrays unpacked, NaN/inf as None."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    return x


def summarize(samples: Iterable[Optional[float]]) -> dict:
    """n, median, p10/p90, quartiles, min/max and mean of the finite samples (None when none)."""
    vals = np.asarray([float(v) for v in samples if v is not None and math.isfinite(float(v))],
                      dtype=np.float64)
    if vals.size == 0:
        return {"n": 0, "median": None, "p10": None, "p90": None, "q1": None, "q3": None,
                "min": None, "max": None, "mean": None}
    p10, q1, med, q3, p90 = np.percentile(vals, [10, 25, 50, 75, 90])
    return clean({"n": int(vals.size), "median": med, "p10": p10, "p90": p90, "q1": q1, "q3": q3,
                  "min": vals.min(), "max": vals.max(), "mean": vals.mean()})


def metric(name: str, unit: str, how: str, samples, *, keep_samples: bool = True, **extra) -> dict:
    """A metric entry of the record: summary statistics, how it was measured, the samples."""
    samples = [None if v is None else float(v) for v in samples]
    out = {"name": name, "unit": unit, "how_measured": how, **summarize(samples)}
    if keep_samples:
        out["samples"] = clean(samples)
    out.update(clean(extra))
    return out
