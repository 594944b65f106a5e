"""Experiments from config (djinn_nb.experiments): config validation, the CI study end to end
against a real server, the record and its schema, same seed -> same tokens, report from the
record alone, and the command line in a subprocess."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

import djinn_nb as dj
import djinn_nb.experiments as djx
from djinn_nb.experiments import ConfigError, RecordError

ROOT = Path(__file__).resolve().parents[2]
CI_CONFIG = ROOT / "notebooks" / "configs" / "breakpoint_study_ci.yaml"
STUDY_CONFIG = ROOT / "notebooks" / "configs" / "breakpoint_study.yaml"
RECORD_SCHEMA = ROOT / "djinn_nb" / "experiments" / "record.schema.json"
FIGURES = ("steering_sweep", "steering_steps", "resume_latency", "kv_residency", "checkpoint_cost")


def ci_config(**changes) -> dict:
    cfg = yaml.safe_load(CI_CONFIG.read_text())
    cfg.update(changes)
    return cfg


def small_config(**changes) -> dict:
    """The CI config cut down to one repetition of the first prompt (both seeds)."""
    cfg = ci_config(prompts=ci_config()["prompts"][:1], repetitions=1)
    cfg.update(changes)
    return cfg


# ---- config validation ------------------------------------------------------------------
def _set(path, value):
    def mutate(cfg):
        obj = cfg
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value
    return mutate


def _delete(key):
    def mutate(cfg):
        del cfg[key]
    return mutate


BAD = [
    (_delete("name"), ["missing required field `name`"]),
    (_delete("prompts"), ["missing required field `prompts`"]),
    (_set(["models"], 3), ["`models`"]),
    (_set(["models"], []), ["`models`"]),
    (_set(["max_new_tokens"], "many"), ["`max_new_tokens`", "'many'"]),
    (_set(["max_new_tokens"], 2), ["`max_new_tokens`", "minimum of 3"]),
    (_set(["repetitions"], 0), ["`repetitions`"]),
    (_set(["seeds"], [0, 0]), ["`seeds`"]),
    (_set(["sampling", "temperature"], -1), ["`sampling.temperature`"]),
    (_set(["breakpoints", "layers"], [3, -1]), ["`breakpoints.layers[1]`"]),
    (_set(["breakpoints", "phase"], "sometimes"), ["`breakpoints.phase`"]),
    (_set(["steering", "sweep", "values"], [0.5, "x"]), ["`steering.sweep.values[1]`"]),
    (_set(["steering", "ops"], [{"op": "scale"}]), ["`steering.ops[0].scale`"]),
    (_set(["steering", "ops"], [{"op": "rotate", "scale": 2}]), ["`steering.ops[0].op`"]),
    (_set(["steering", "ops"], [{"op": "scale", "scael": 0.9}]),
     ["unknown field `steering.ops[0].scael`", "did you mean `scale`"]),
    (_set(["steering", "sweep"], {"op": "add", "values": [1.0]}), ["`steering.sweep.vector`"]),
    (_set(["checkpoints", "at_steps"], [0]), ["`checkpoints.at_steps[0]`"]),
    (_set(["stering"], {"layer": 6}), ["unknown field `stering`", "did you mean `steering`"]),
]


@pytest.mark.parametrize("mutate, expected", BAD, ids=[" ".join(e) for _, e in BAD])
def test_config_errors_name_the_bad_field(mutate, expected):
    cfg = ci_config()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        djx.load_config(cfg)
    for text in expected:
        assert text in str(err.value)
    assert isinstance(err.value, dj.InvalidArgumentError)


def test_config_lists_every_problem_at_once():
    cfg = ci_config(repetitions=0, max_new_tokens="x")
    with pytest.raises(ConfigError) as err:
        djx.load_config(cfg)
    assert len(err.value.problems) == 2
    assert "`repetitions`" in str(err.value) and "`max_new_tokens`" in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        djx.load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        djx.load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        djx.load_config(bad)


def test_shipped_configs_are_valid_and_name_the_study():
    study = djx.load_config(STUDY_CONFIG)
    assert study["models"] == ["tiny-gpt2", "smollm2-135m"]
    assert study["breakpoints"]["layers"] == [3, 6, 9]
    assert study["steering"]["layer"] == 6
    assert {"op": "scale", "scale": 0.9} in study["steering"]["ops"]
    assert 0.9 in study["steering"]["sweep"]["values"] and len(study["steering"]["sweep"]["values"]) >= 5
    ci = djx.load_config(CI_CONFIG)
    assert ci["models"] == ["tiny-gpt2"]          # a single name becomes a list
    assert ci["latency"]["pings"] == 10 and ci["checkpoints"]["restore"] is True   # defaults
    # a loaded config can be changed and loaded again (as the notebook does)
    again = djx.load_config(dict(ci, models=["tiny-gpt2", "smollm2-135m"]))
    assert again["models"] == ["tiny-gpt2", "smollm2-135m"] and again["_source"] == ci["_source"]


def test_layers_are_clipped_to_the_model():
    assert djx.clip_layers([3, 6, 9], 8) == [3, 6, 7]
    assert djx.clip_layers([3, 6, 9], 30) == [3, 6, 9]
    assert djx.clip_layers([3, 6, 9], 4) == [3]
    assert djx.clip_layer(6, 4) == 3


# ---- the CI study end to end ------------------------------------------------------------
@pytest.fixture(scope="module")
def ci_run(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("ci-study")
    record = djx.run(CI_CONFIG, out=out, server=server.address, progress=False)
    return record, out


def test_record_validates_against_the_shipped_schema(ci_run):
    record, out = ci_run
    data = json.loads((out / "record.json").read_text())
    jsonschema.validate(data, json.loads(RECORD_SCHEMA.read_text()))
    assert data == record.data
    assert data["config"]["name"] == "breakpoint_study_ci"
    env = data["environment"]
    assert env["client"]["djinn_nb"] == dj.__version__ and env["client"]["numpy"]
    assert env["server"]["address"] == record.data["environment"]["server"]["address"]
    (m,) = data["models"]
    assert m["facts"]["layers"] == 8 and m["facts"]["device"] and m["facts"]["dtype"] == "float32"
    assert len(m["model_hash"]["value"]) == 64 and m["model_hash"]["how"]
    assert m["server_versions"]["torch"] and m["kv_layout"]["kv_layers"] == 8
    # tiny-gpt2: 8 layers x keys+values x 64 wide x float32 per position
    assert m["kv_bytes_per_position"] == m["kv_layout"]["bytes_per_position"] == 8 * 2 * 64 * 4
    cfg = data["config"]
    assert len(m["cases"]) == len(cfg["prompts"]) * len(cfg["seeds"]) * cfg["repetitions"]
    # a damaged record is refused, naming the field
    broken = copy.deepcopy(data)
    del broken["models"][0]["metrics"]["determinism"]
    with pytest.raises(RecordError, match="determinism"):
        djx.validate_record(broken)


def test_layers_clipped_in_the_record(ci_run):
    (m,) = ci_run[0].data["models"]
    assert m["layers"]["breakpoints_requested"] == [3, 6, 9]
    assert m["layers"]["breakpoints"] == [3, 6, 7]
    assert m["layers"]["steering"] == 6
    # every resume run paused at the three layers on every decode step
    n = ci_run[0].data["config"]["max_new_tokens"]
    for case in m["cases"]:
        layers = [c["layer"] for c in case["resume"]["calls"] if c["ends"] == "paused"]
        assert layers == [3, 6, 7] * (n - 1)


def test_resume_accuracy_is_100_percent(ci_run):
    (m,) = ci_run[0].data["models"]
    for case in m["cases"]:
        assert case["resume"]["tokens_identical"] is True
        assert case["resume"]["tokens"] == case["baseline"]["tokens"]
        assert case["resume"]["logits_identical"] is True
    tid = m["metrics"]["resume"]["token_identity"]
    assert tid["value"] == 1.0 and tid["median"] == 1.0 and tid["min"] == 1.0
    assert tid["n"] == len(m["cases"])
    assert m["metrics"]["determinism"]["baseline_identical_across_repetitions"] is True


def test_steering_metrics(ci_run):
    (m,) = ci_run[0].data["models"]
    variants = {v["value"]: v for v in m["metrics"]["steering"]["variants"]}
    assert set(variants) == {0.5, 0.9, 1.0}
    assert variants[0.9]["in_ops"] and variants[0.9]["in_sweep"]
    one = variants[1.0]["metrics"]
    # scale 1.0 is bit-identical to no rule: nothing changes, teacher-forced or free-running
    assert one["mismatch_rate"]["max"] == 0 and one["kl"]["max"] == 0 and one["tf_kl"]["max"] == 0
    assert one["tf_top1_agreement"]["min"] == 1.0
    for scale in (0.5, 0.9):
        met = variants[scale]["metrics"]
        assert met["tf_kl"]["min"] > 0 and met["kl"]["min"] > 0
        assert met["rel_logit_change"]["min"] > 0 and met["tf_rel_logit_change"]["min"] > 0
    # a larger edit moves the distribution more (teacher-forced, same contexts)
    assert variants[0.5]["metrics"]["tf_kl"]["median"] > variants[0.9]["metrics"]["tf_kl"]["median"]
    # before the first divergent token, teacher-forced and free-running KL see the same context
    for case in m["cases"]:
        for e in case["steering"]:
            tf = e["teacher_forced"]
            assert tf["positions"] == len(case["baseline"]["tokens"])
            first = e["free"]["first_divergent_step"]
            same = e["free"]["kl"][:(len(e["free"]["kl"]) if first is None else first + 1)]
            # (a one-position shift of the scored positions would differ by ~30%)
            assert tf["kl_vs_free_max_abs_diff"] <= 1e-2 * max(same) + 1e-9


def test_latency_kv_and_checkpoint_metrics(ci_run):
    (m,) = ci_run[0].data["models"]
    lat, kv, ck = m["metrics"]["latency"], m["metrics"]["kv"], m["metrics"]["checkpoint"]
    for met in lat.values():
        assert met["how_measured"]
    assert lat["resume_client_ms"]["n"] == len(m["cases"])
    assert lat["resume_client_ms"]["median"] > 0 and lat["resume_compute_ms"]["median"] > 0
    assert lat["network_rtt_ms"]["median"] > 0
    # the KV cache stays on the server: each resume moves far fewer bytes than the cache holds
    assert kv["wire_bytes_per_resume"]["max"] < 0.1 * kv["kv_bytes_at_pause"]["min"]
    assert kv["wire_over_kv"]["max"] < 0.1
    assert ck["checkpoint_restore_exact"]["min"] == 1.0
    assert ck["checkpoint_dispatch_server_ms"]["n"] == 2 * len(m["cases"])
    assert ck["checkpoint_dispatch_client_ms"]["median"] > 0
    for case in m["cases"]:
        assert case["checkpoints"]["control_tokens_identical"]
        assert case["checkpoints"]["overlap_tokens_identical"]
        assert [e["step"] for e in case["checkpoints"]["events"]] == [2, 4]


def test_headline_and_how_measured(ci_run):
    record, out = ci_run
    rows = record.headline()
    groups = {r["group"] for r in rows}
    assert {"resume", "resume latency", "KV residency", "checkpoint cost",
            "steering: scale 0.9 @ layer 6"} <= groups
    assert all(len(r["how_measured"]) > 20 for r in rows)
    assert "resume accuracy" in record._repr_html_()
    for name in FIGURES:
        for ext in ("html", "png"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    assert "## Headline" in (out / "summary.md").read_text()


def test_same_seed_gives_identical_tokens(ci_run, server):
    first = ci_run[0]
    again = djx.run(small_config(), server=server.address, progress=False)
    a, b = first.tokens("tiny-gpt2"), again.tokens("tiny-gpt2")
    assert len(b) == 2
    for (rep, prompt, seed), tokens in b.items():
        assert tokens == a[(0, prompt, seed)]
    # and the seed matters: the two seeds sample different continuations
    assert b[(0, 0, 0)] != b[(0, 0, 1)]


def test_report_rerenders_from_the_record_alone(ci_run, tmp_path):
    shutil.copy(ci_run[1] / "record.json", tmp_path / "record.json")
    rec = djx.report(tmp_path)
    assert set(rec.figures) == set(FIGURES)
    for name in FIGURES:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "plotly" in (tmp_path / f"{name}.html").read_text()[:5000].lower()
    md = (tmp_path / "summary.md").read_text()
    assert "resume accuracy (tokens identical)" in md and "Steering sweep" in md
    assert "<table" in (tmp_path / "summary.html").read_text()
    # a directory without a record
    with pytest.raises(RecordError, match="record.json"):
        djx.report(tmp_path / "nothing-here")


def test_add_op_with_a_steering_vector(server):
    """An `add` op: a vector from contrastive prompts at the (clipped) steering layer."""
    cfg = small_config(seeds=[0], breakpoints=None, checkpoints=None, steering={
        "layer": 20, "ops": [{"op": "add", "alpha": 4.0, "label": "love - hate",
                              "vector": {"positive": ["I love this"], "negative": ["I hate this"]}}]})
    rec = djx.run(cfg, server=server.address, progress=False)
    (m,) = rec.data["models"]
    assert m["layers"]["steering_requested"] == 20 and m["layers"]["steering"] == 7
    (var,) = m["metrics"]["steering"]["variants"]
    assert (var["op"], var["value"], var["label"], var["in_ops"]) == ("add", 4.0, "love - hate", True)
    assert var["metrics"]["tf_kl"]["min"] > 0 and var["metrics"]["rel_logit_change"]["min"] > 0
    assert "resume" not in m["metrics"] and "checkpoint" not in m["metrics"]
    assert [r["group"] for r in rec.headline()][0] == "steering: love - hate @ layer 7"


def test_unknown_model_fails_with_the_servers_error(server):
    with pytest.raises(dj.UnknownModelError, match="no-such-model-xyz"):
        djx.run(small_config(models=["no-such-model-xyz"]), server=server.address, progress=False)


def _cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "djinn_nb.experiments", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_run_and_report_in_a_subprocess(server, tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(small_config(seeds=[0], checkpoints=None)))
    out = tmp_path / "run"
    proc = _cli("run", str(config), "--out", str(out), "--server", server.address, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "resume accuracy" in proc.stdout
    data = json.loads((out / "record.json").read_text())
    djx.validate_record(data)
    assert data["models"][0]["metrics"]["resume"]["token_identity"]["value"] == 1.0
    assert "checkpoint" not in data["models"][0]["metrics"]       # no schedule, no runs
    for f in out.iterdir():
        if f.suffix in (".png", ".html"):
            f.unlink()
    # report needs no server: point $DJINN_SERVER at nothing to be sure
    proc = _cli("report", str(out), env_extra={"DJINN_SERVER": "127.0.0.1:1"})
    assert proc.returncode == 0, proc.stderr
    assert (out / "resume_latency.png").stat().st_size > 0
    assert (out / "summary.md").stat().st_size > 0
    # a bad config: exit status 2 and the field named on stderr
    config.write_text(yaml.safe_dump(small_config(repetitions=0)))
    proc = _cli("run", str(config), "--out", str(out), "--server", server.address)
    assert proc.returncode == 2 and "`repetitions`" in proc.stderr
