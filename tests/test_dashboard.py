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
    # the latency plot: per-step forward and pause times of both runs, client round trips
    assert len(trace(dash.lat_fig, "forward").y) == N
    assert len(trace(dash.lat_fig, "baseline forward").y) == N
    assert all(v > 0 for v in trace(dash.lat_fig, "forward").y)
    assert len(trace(dash.lat_fig, "round trip").y) > N


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

    dash.restore_button.click()      # restore + resume: exactly the original continuation
    dash.wait()
    assert dash.ready and trace(dash.lat_fig, "restore (client)").y[0] > 0
    dash.resume()
    dash.wait()     # the checkpoint's breakpoint (layer 4, step 5) pauses first
    assert dash.paused is not None and dash.paused.step == 5
    dash.resume()
    dash.wait()
    assert dash.steered.tokens == original.tokens

    dash.scale.value = 0.5 if dash.auto.value is False else dash.scale.value
    dash.fork_button.click()        # a new session from the checkpoint, panel's rule (1.5)
    dash.wait()
    assert dash.last_error is None, dash.message.value
    assert dash.steered_label.startswith("fork of") and len(dash.forks) == 1
    assert dash.steered.tokens[:5] == original.tokens[:5]
    assert dash.forks[0].id != dash.session.id


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
    assert [t.name for t in lat.data] == ["forward", "paused", "baseline forward", "round trip",
                                          "dispatch", "ready (client)", "restore (client)"]
    assert len(lat.data[0].y) == N and list(lat.data[3].y) == [1.0, 2.0]
    assert dj.plots.activation_norms([1.0, 2.0], start=3).data[0].x == (3, 4)
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
