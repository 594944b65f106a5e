"""Unit tests of the experiment record accessors, on the committed GPU study record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from djinn_nb.experiments.record import ExperimentRecord, headline_rows

RECORD = Path(__file__).resolve().parents[2] / "docs" / "results" / "study_gpu" / "record.json"


@pytest.fixture(scope="module")
def rec() -> ExperimentRecord:
    return ExperimentRecord(json.loads(RECORD.read_text()))


def test_metric_reaches_a_steering_metric_of_the_headline_op(rec):
    m = rec.metric("smollm2-135m", "steering", "tf_kl")
    steering = rec.metrics("smollm2-135m")["steering"]
    headline = next(v for v in steering["variants"] if v["in_ops"])
    assert m is headline["metrics"]["tf_kl"]
    assert m["unit"] == "nats" and m["p10"] <= m["median"] <= m["p90"]
    # another variant by label or by value
    by_label = rec.metric("smollm2-135m", "steering", "tf_kl", variant="scale 1")
    assert by_label is rec.metric("smollm2-135m", "steering", "tf_kl", variant=1.0)
    assert by_label["max"] == 0.0                      # scale 1.0 changes nothing


def test_metric_reaches_the_other_groups(rec):
    assert rec.metric("smollm2-135m", "resume", "token_identity")["value"] == 1.0
    lat = rec.metric("gpt2-124m-random", "latency", "resume_client_ms")
    assert lat is rec.metrics("gpt2-124m-random")["latency"]["resume_client_ms"]


@pytest.mark.parametrize("args, named", [
    (("nope", "steering", "tf_kl"), "smollm2-135m"),
    (("smollm2-135m", "steer", "tf_kl"), "checkpoint"),
    (("smollm2-135m", "steering", "tf_k"), "tf_kl"),
    (("smollm2-135m", "latency", "tf_kl"), "resume_client_ms"),
    (("smollm2-135m", "steering", "tf_kl", "scale 7"), "scale 0.9"),
    (("smollm2-135m", "latency", "resume_client_ms", 0.9), "steering"),
])
def test_metric_names_the_choices_when_a_name_is_wrong(rec, args, named):
    with pytest.raises(KeyError, match=named):
        rec.metric(*args)


def test_first_divergent_step_shows_a_step_some_run_diverged_at(rec):
    m = rec.metric("smollm2-135m", "steering", "first_divergent_step")
    assert m["median"] == 14.5                     # 12 runs: the midpoint of 13 and 16
    row = next(r for r in rec.sweep() if r["model"] == "smollm2-135m" and r["value"] == 0.9)
    assert row["first_divergent_step"] == 13 and 13 in m["samples"]
    head = next(r for r in headline_rows(rec.data) if r["model"] == "smollm2-135m"
                and r["key"] == "first_divergent_step")
    assert head["median"] == 13 and "lower median" in head["how_measured"]
