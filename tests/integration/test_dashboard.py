"""The dashboard without a browser: built against a real kernel server on tiny-gpt2,
driven through its widgets (values set, buttons clicked), checked on figure data."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest

import djinn_nb as dj

PROMPT = "The capital of France is"
N = 8


@pytest.fixture
def dash(client):
    s = client.session(model="tiny-gpt2")
    d = dj.Dashboard(s, prompt=PROMPT, max_new_tokens=N, steer_layer=4, scale=1.0)
    yield d
    d.close_sessions()


def reference(client, **steer):
    """The same generation made directly through the session API."""
    with client.session(model="tiny-gpt2") as s:
        if steer:
            s.steer(4, **steer)
        return s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False).result


def trace(fig, name):
    return next(t for t in fig.data if t.name == name)


def divergent_cells(dash):
    return len(re.findall(r'class="dj-div"', dash.token_view.value))


def test_session_info_and_controls(dash):
    info = dash.info.value
    assert "tiny-gpt2" in info and "8 layers" in info and "hidden 64" in info and "cpu" in info
    assert "float32" in info
    assert dash.layer_picker.options == tuple(range(8))
    assert (dash.scale.min, dash.scale.max) == (0.0, 2.0)
    assert dash.steer_op.options == ("scale", "add")
    assert [t.name for t in dash.div_fig.data] == ["KL", "top-1 agree"]
    assert len(dash.div_fig.data[0].y or ()) == 0


def test_scale_one_matches_baseline_then_slider_regenerates(client, dash):
    dash.run_steered_button.click()
    dash.wait()
    assert dash.last_error is None, dash.message.value
    assert len(dash.baseline.tokens) == len(dash.steered.tokens) == N
    assert dash.steered.tokens == dash.baseline.tokens      # scale 1.0 is no change
    kl = np.array(trace(dash.div_fig, "KL").y)
    assert kl.shape == (N,) and np.all(kl == 0)
    assert list(trace(dash.div_fig, "top-1 agree").y) == [1] * N
    assert divergent_cells(dash) == 0
    assert dash.token_view.value.count("<td") == 2 * N

    dash.scale.value = 0.5          # the slider re-generates the steered run
    dash.wait()
    assert dash.last_error is None, dash.message.value
    ref = dj.divergence(reference(client), reference(client, scale=0.5))
    np.testing.assert_allclose(trace(dash.div_fig, "KL").y, ref.kl, rtol=1e-6, atol=1e-12)
    assert list(trace(dash.div_fig, "top-1 agree").y) == [int(v) for v in ref.top1_agree]
    assert divergent_cells(dash) == round(ref.mismatch_rate * N) > 0
    # the latency plot: prefill apart from the decode steps of both runs; round trips
    # are pings (no compute), one after each job, on a linear axis
    assert len(trace(dash.lat_fig, "forward").y) == N - 1
    assert len(trace(dash.lat_fig, "baseline forward").y) == N - 1
    assert all(v > 0 for v in trace(dash.lat_fig, "forward").y)
    prefill = trace(dash.lat_fig, "prefill")
    assert list(prefill.x) == ["baseline", "run"]
    assert list(prefill.y) == [dash.baseline.steps[0].forward_ms, dash.steered.steps[0].forward_ms]
    rtt = trace(dash.lat_fig, "round trip").y
    assert len(rtt) >= 2 and all(v > 0 for v in rtt)
    assert dash.lat_fig.layout.yaxis3.type != "log"


def test_add_vector_op(client, dash):
    dash.steer_op.value = "add"      # with auto on this re-runs too
    dash.alpha.value = 0.25
    dash.wait()
    assert dash.last_error is None, dash.message.value
    v = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    ref = reference(client, add=v / np.linalg.norm(v), alpha=0.25)
    assert dash.steered.tokens == ref.tokens
    assert np.array(trace(dash.div_fig, "KL").y).max() > 0


def test_breakpoints_pause_step_scan_resume(client, dash):
    dash.scale.value = 0.8
    dash.wait()
    unpaused = dash.steered
    dash.layer_picker.value = (2, 4)
    dash.bp_steps.value = "3"
    dash.run_steered_button.click()
    dash.wait()
    assert dash.paused is not None and (dash.paused.layer, dash.paused.step) == (2, 3)
    assert "paused" in dash.paused_info.value and "block 2" in dash.paused_info.value
    assert len(dash.norm_fig.data[0].y) == 1 and dash.norm_fig.data[0].y[0] > 0
    dash.step_button.click()
    dash.wait()
    assert (dash.paused.layer, dash.paused.step) == (3, 3)
    dash.scan_button.click()
    dash.wait()
    assert (dash.paused.layer, dash.paused.step) == (7, 3)
    z = np.array(dash.heat_fig.data[0].z, dtype=float)     # None -> nan
    assert z.shape == (8, N)
    seen = {(int(l), int(c)) for l, c in zip(*np.nonzero(~np.isnan(z)))}
    assert seen == {(layer, 3) for layer in range(2, 8)}   # only the pauses we made
    dash.resume_button.click()
    dash.wait()
    assert dash.paused is None and dash.last_error is None, dash.message.value
    assert dash.steered.tokens == unpaused.tokens           # pausing changes nothing
    np.testing.assert_array_equal(dash.steered.logits, unpaused.logits)


def test_checkpoint_take_restore_fork_and_slider_from_checkpoint(client, dash):
    dash.scale.value = 0.5
    dash.wait()
    dash.layer_picker.value = (4,)
    dash.bp_steps.value = "5"
    dash.run_steered()
    dash.wait()
    assert dash.paused.step == 5
    dash.take_button.click()
    dash.resume_button.click()
    dash.wait()
    original = dash.steered
    assert len(dash.checkpoints) == 1 and dash.checkpoints[0]["checkpoint"].step == 5
    assert len(dash.checkpoint_list.options) == 1 and "step 5" in dash.checkpoint_list.options[0][0]
    assert trace(dash.lat_fig, "dispatch").y[0] > 0

    dash.layer_picker.value = ()
    dash.scale.value = 1.5           # from the checkpoint: the first 5 tokens are kept
    dash.wait()
    assert dash.last_error is None, dash.message.value
    assert dash.steered_label.startswith("steered from")
    assert dash.steered.tokens[:5] == original.tokens[:5]
    assert dash.steered.tokens != original.tokens
    from_checkpoint = dash.steered

    dash.restore_button.click()      # restore + resume: exactly the original continuation
    dash.wait()
    assert dash.ready and trace(dash.lat_fig, "restore (client)").y[0] > 0
    dash.resume()
    dash.wait()     # the checkpoint's breakpoint (layer 4, step 5) pauses first
    assert dash.paused is not None and dash.paused.step == 5
    dash.resume()
    dash.wait()
    assert dash.steered.tokens == original.tokens

    assert dash.scale.value == 1.5 and dash.steer_op.value == "scale"
    dash.fork_button.click()        # a new session from the checkpoint, panel's rule (1.5)
    dash.wait()
    assert dash.last_error is None, dash.message.value
    assert dash.steered_label.startswith("fork of") and len(dash.forks) == 1
    assert dash.forks[0].id != dash.session.id
    # the fork ran the panel's rule from the checkpoint: the same tokens as the slider's run
    assert dash.steered.tokens == from_checkpoint.tokens
    assert dash.steered.tokens[:5] == original.tokens[:5]


def test_stop_works_between_steps(dash):
    dash.max_new_tokens.value = 400
    dash.run_baseline_button.click()
    deadline = time.time() + 120
    while dash.progress.value < 3:      # a few tokens into the generation
        assert time.time() < deadline and dash.last_error is None
        time.sleep(0.005)
    dash.stop_button.click()
    dash.wait()
    assert dash.last_error is None, dash.message.value
    assert 3 <= len(dash.baseline.tokens) < 400
    assert "stopped" in dash.status.value
    dash.max_new_tokens.value = 8        # still usable; the short baseline is made again
    dash.run_steered()
    dash.wait()
    assert len(dash.baseline.tokens) == len(dash.steered.tokens) == 8
    assert len(dash.div_fig.data[0].y) == 8


def test_errors_show_as_a_message_and_the_dashboard_stays_usable(dash):
    dash.layer_picker.value = (3,)
    dash.bp_steps.value = "three"
    dash.run_steered()
    dash.wait()
    assert "InvalidArgumentError" in dash.message.value and "dj-error" in dash.message.value
    dash.bp_steps.value = ""
    dash.layer_picker.value = ()
    dash.max_new_tokens.value = 10**5    # over the server's limit
    dash.run_baseline_button.click()
    dash.wait()
    assert "LimitExceededError" in dash.message.value
    dash.step_button.click()             # nothing paused: a hint, not an error
    dash.wait()
    assert "nothing to step" in dash.status.value
    dash.max_new_tokens.value = N
    dash.run_steered()
    dash.wait()
    assert dash.message.value == "" and len(dash.steered.tokens) == N


def test_background_false_runs_in_the_calling_thread(client):
    s = client.session(model="tiny-gpt2")
    d = dj.Dashboard(s, max_new_tokens=4, background=False, scale=0.5)
    d.run_steered_button.click()
    assert not d.busy and len(d.steered.tokens) == 4 and len(d.div_fig.data[0].y) == 4
    d.close_sessions()


def test_plots_without_widgets(client):
    import plotly.graph_objects as go
    base, steered = reference(client), reference(client, scale=0.5)
    fig = dj.plots.divergence(base, steered)
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    np.testing.assert_allclose(fig.data[0].y, dj.divergence(base, steered).kl)
    lat = dj.plots.latency(steered, baseline=base, rtt_ms=[1.0, 2.0],
                           checkpoints=[{"label": "a", "dispatch_ms": 0.3}])
    assert [t.name for t in lat.data] == ["forward", "paused", "baseline forward", "prefill",
                                          "round trip", "dispatch", "ready (client)",
                                          "restore (client)"]
    assert len(lat.data[0].y) == N - 1 and list(lat.data[4].y) == [1.0, 2.0]
    assert dj.plots.activation_norms([1.0, 2.0], start=3).data[0].x == ("3", "4")
    heat = dj.plots.layer_heatmap({(1, 2): 0.5}, layers=3, steps=4)
    assert heat.data[0].z[1][2] == 0.5 and heat.data[0].z[0][0] is None
    table = dj.plots.token_table(base, steered)
    assert table.count('class="dj-div"') == sum(a != b for a, b in zip(base.tokens, steered.tokens))


def test_import_stays_light_and_names_resolve_lazily():
    code = ("import sys, djinn_nb as dj; light = not any(m in sys.modules for m in "
            "('plotly', 'ipywidgets', 'torch')); dj.plots.divergence; D = dj.Dashboard; "
            "print(light, 'ipywidgets' in sys.modules, D.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "widgets.dashboard"]


def test_site_pickers_and_logit_lens_in_the_paused_panel(client, dash):
    dash.layer_picker.value = (7,)
    dash.bp_site.value = "attn"
    dash.bp_steps.value = "2"
    dash.run_steered_button.click()
    dash.wait()
    assert dash.last_error is None, dash.message.value
    assert dash.paused is not None and dash.paused.site == "attn" and dash.paused.layer == 7
    assert "(attn)" in dash.paused_info.value and "logit lens" in dash.lens_view.value
    # the lens of the last block's output is the model's own next-token distribution
    dash.bp_site.value = "resid"
    dash.run_steered_button.click()
    dash.wait()
    top = dash.session.logit_lens(k=1)["top_tokens"][0][0]
    dash.resume_button.click()
    dash.wait()
    assert dash.steered.steps[2].text == top
    # a head pause shows norms (per position) and no lens
    dash.bp_site.value = "heads"
    dash.run_steered_button.click()
    dash.wait()
    assert dash.paused.site == "heads" and dash.norm_fig.data[0].y[0] > 0
    assert "reads the residual stream" in dash.lens_view.value
    dash.resume_button.click()
    dash.wait()
    # steering at the mlp site with scale 1.0 changes nothing
    dash.layer_picker.value = ()
    dash.steer_site.value = "mlp"
    dash.wait()
    assert dash.last_error is None, dash.message.value
    assert dash.steered.tokens == reference(client).tokens


# ---- issue 18: a dashboard whose state is always true ----------------------------------------
def test_prompt_change_then_slider_move_leaves_no_stale_error(client, dash):
    dash.scale.value = 0.5
    dash.wait()
    assert dash.last_error is None and dash.divergence.steps == N
    dash.prompt.value = "A completely different prompt about"
    dash.run_baseline()              # the steered run of the old prompt is not compared
    dash.wait()
    assert dash.last_error is None and dash.message.value == "", dash.message.value
    assert dash.steered is None and dash.divergence is None
    dash.prompt.value = "The capital of Italy is"
    dash.scale.value = 0.6           # a new baseline, then the steered run, of this prompt
    dash.wait()
    assert dash.last_error is None and dash.message.value == "", dash.message.value
    assert dash.baseline.prompt_tokens == dash.steered.prompt_tokens
    assert dash.divergence is not None and dash.divergence.steps == N
    assert "mismatch" in dash.status.value and "failed" not in dash.status.value


@pytest.mark.parametrize("bad", ["new_tokens", "empty_prompt", "steps"])
def test_rejected_input_never_leaves_a_generating_status(dash, bad):
    if bad == "new_tokens":
        dash.max_new_tokens.value = 10**5       # over the server's limit
        dash.run_baseline()
    elif bad == "empty_prompt":
        dash.prompt.value = ""
        dash.run_baseline()
    else:
        dash.layer_picker.value = (3,)
        dash.bp_steps.value = "abc"
        dash.run_steered()
    dash.wait()
    assert dash.last_error is not None and "dj-error" in dash.message.value
    assert "generating" not in dash.status.value and "failed" in dash.status.value
    assert dash.progress.description == "idle" and dash.progress.bar_style == "danger"
    dash.max_new_tokens.value, dash.prompt.value, dash.bp_steps.value = N, PROMPT, ""
    dash.layer_picker.value = ()
    dash.run_steered()                          # the next success clears the error
    dash.wait()
    assert dash.last_error is None and dash.message.value == ""
    assert dash.progress.bar_style == "" and len(dash.steered.tokens) == N


def test_slider_move_while_paused_is_queued_until_the_pause_ends(client, dash):
    dash.layer_picker.value = (4,)
    dash.bp_steps.value = "3"
    dash.run_steered()
    dash.wait()
    assert (dash.paused.layer, dash.paused.step) == (4, 3)
    dash.scale.value = 0.5           # queued: the pause stays
    dash.wait()
    assert dash.paused is not None and (dash.paused.layer, dash.paused.step) == (4, 3)
    assert "while paused" in dash.status.value and dash.last_error is None
    dash.step()                      # the pause goes on, the change still waits
    dash.wait()
    assert (dash.paused.layer, dash.paused.step) == (5, 3)
    assert "queued after the pause: scale 0.50" in dash.status.value
    dash.resume()                    # the paused run ends, then the queued change runs
    dash.wait()
    assert dash.paused is None and dash.last_error is None, dash.message.value
    assert dash.steered_label == "steered"
    assert dash.steered.tokens == reference(client, scale=0.5).tokens
    assert "queued" not in dash.status.value


def test_stop_drops_a_steering_change_queued_behind_a_pause(client, dash):
    dash.layer_picker.value = (2,)
    dash.bp_steps.value = "1"
    dash.run_steered()
    dash.wait()
    dash.scale.value = 0.5
    dash.wait()
    assert dash.paused is not None
    dash.stop()
    dash.wait()
    assert dash.paused is None and dash.steered_label == "steered (stopped)"
    assert "dropped" in dash.status.value and "kept" in dash.status.value
    assert dash.steered.tokens == reference(client).tokens[:len(dash.steered.tokens)]


# ---- issue 18: figures, token view and widget polish --------------------------------------------
def fake_run(texts, prompt=(1, 2), probs=0.5):
    steps = [dj.StepRecord(step=i, token_id=100 + i, text=t, top_ids=[100 + i, 7],
                           top_probs=[probs, 3.2e-5], forward_ms=500.0 if i == 0 else 2.0,
                           paused_ms=0.0) for i, t in enumerate(texts)]
    return dj.GenerationResult(tokens=[r.token_id for r in steps], text="".join(texts),
                               prompt_tokens=list(prompt), steps=steps, stop_reason="length",
                               seed=0, model="fake")


def test_figures_say_what_they_measure(client):
    base, steered = reference(client), reference(client, scale=0.5)
    same = dj.plots.divergence(base, base).layout.title.text
    assert "None" not in same and "no generated token differs" in same and "nats" in same
    first = dj.divergence(base, steered).first_divergent_step
    assert f"first differing token at step {first}" in dj.plots.divergence(base, steered).layout.title.text
    lat = dj.plots.latency(fake_run(["a", "b", "c"]), rtt_ms=[0.4, 0.5])
    assert list(trace(lat, "prefill").y) == [500.0]         # the prefill has its own panel
    assert list(trace(lat, "forward").y) == [2.0, 2.0]      # decode steps only
    assert lat.layout.yaxis3.type != "log" and lat.layout.yaxis2.title.text == "ms per token"
    one = dj.plots.activation_norms([7.0], start=12, layer=4, step=5)
    assert one.data[0].x == ("12",) and one.layout.xaxis.type == "category"
    assert one.data[0].width[0] < 0.5 and one.layout.yaxis.rangemode == "tozero"
    assert "1 position" in one.layout.title.text and "L2" in one.layout.yaxis.title.text
    heat = dj.plots.layer_heatmap({(0, 1): 3.0, (7, 2): 9.0}, layers=8, steps=4)
    assert heat.data[0].zmin == 0 and tuple(heat.layout.yaxis.range) == (-0.5, 7.5)
    assert dj.plots.format_probability(3.2e-5) == "3.2e-05"
    assert dj.plots.format_probability(0.4123) == "0.412"


def test_token_table_scrolls_hovers_colours_and_shows_whitespace(client):
    base, steered = reference(client), reference(client, scale=0.5)
    table = dj.plots.token_table(base, steered)
    assert 'class="dj-token-scroll"' in table and "overflow:auto" in table and "max-height" in table
    div = dj.divergence(base, steered)
    assert table.count("rgba(228,87,86") == int(np.count_nonzero(div.kl > 0))
    assert table.count("top-k next-token probabilities") == 2 * N
    plain = dj.plots.token_table(fake_run([" Paris", "\n", "x"]), fake_run([" Paris", "\n", "y"]))
    assert "\u2423Paris" in plain and "\u21b5" in plain and plain.count('class="dj-div"') == 1
    assert "3.2e-05" in plain and "#7" in plain              # top-k of hover; unknown id by number
    named = dj.plots.token_table(fake_run(["a"]), token_text={7: " the"}.get)
    assert "\u2423the" in named
    long = dj.plots.token_table(fake_run(["t"] * 100), fake_run(["t"] * 100), per_row=24)
    rows = re.findall(r"<tr>(.*?)</tr>", long)
    assert max(r.count("<td") for r in rows) <= 24          # no 100-column-wide row


def test_layers_in_sight_wide_slider_and_checkpoint_labels(client, dash):
    grid = dash.layer_picker.children[1]
    assert len(grid.children) == 8                            # every layer has a toggle
    grid.children[6].value = True
    assert dash.layer_picker.value == (6,)
    dash.layer_picker.value = (2, 7)
    assert [b.value for b in grid.children] == [i in (2, 7) for i in range(8)]
    dash.layer_picker.value = ()
    assert dash.scale.layout.width == "100%" and dash.scale.step == 0.05
    dash.scale.value = 0.5
    dash.wait()
    dash.take_checkpoint()
    dash.wait()
    label = dash.checkpoint_list.options[0][0]
    assert "scale 0.50" in label and PROMPT[:20] in label and "old prompt" not in label
    dash.prompt.value = "Another prompt"
    dash.scale.value = 0.6            # not from the old prompt's checkpoint
    dash.wait()
    assert dash.last_error is None and dash.steered_label == "steered"
    assert "old prompt" in dash.checkpoint_list.options[0][0]


def test_logit_lens_probabilities_are_readable_on_a_tiny_model(dash):
    dash.layer_picker.value = (3,)
    dash.bp_steps.value = "1"
    dash.run_steered()
    dash.wait()
    lens = dash.lens_view.value
    assert "logit lens" in lens and "0.000<" not in lens and "0.000 " not in lens
    shown = re.findall(r"</code> ([0-9.e+-]+)</td>", lens)
    assert len(shown) == 5 and all(float(p) > 0 for p in shown)
