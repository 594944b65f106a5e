"""The dashboard in a real browser: JupyterLab on localhost, Debian's chromium driven by
Playwright, runs notebooks/03_dashboard.ipynb, moves the steering slider and waits for the
divergence plot to change; then changes the prompt, moves the slider again and sees the new
runs compared with no error box; checks that the token view scrolls inside its own box and
that every layer toggle is in sight. A second test opens notebooks/05_sites_and_patching.ipynb
and draws its attention view. Screenshots under the test's tmp_path (and docs/dashboard.png,
docs/token_view.png, docs/attention_view.png when DJINN_UPDATE_SCREENSHOT=1).

Notebook 03 runs on tiny-gpt2 here (DJINN_NOTEBOOK_MODEL) for speed; with
DJINN_UPDATE_SCREENSHOT=1 it runs on its default, SmolLM2-135M, so that the committed
screenshots show real text."""
from __future__ import annotations

import re
import os
import shutil
import time
from pathlib import Path

import pytest

from jupyterlab_for_tests import CHROMIUM, CHROMIUM_FLAGS, jupyterlab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "03_dashboard.ipynb"
ATTENTION_NOTEBOOK = ROOT / "notebooks" / "05_sites_and_patching.ipynb"
UPDATE_SCREENSHOTS = os.environ.get("DJINN_UPDATE_SCREENSHOT") == "1"
#: notebook 03's model (it reads DJINN_NOTEBOOK_MODEL) and its number of blocks
MODEL, LAYERS = ("smollm2-135m", 30) if UPDATE_SCREENSHOTS else ("tiny-gpt2", 8)
# the divergence figure by its first trace ("KL"), not by DOM order: a plot gets the class
# .js-plotly-plot only once drawn, so "the first plot" changes as the others are drawn
DIVERGENCE_Y = """() => {
  for (const el of document.querySelectorAll('.djinn-dashboard .js-plotly-plot')) {
    if (el._fullData && el._fullData.length && el._fullData[0].name === 'KL')
      return Array.from(el._fullData[0].y || []);
  }
  return null;
}"""

TOKEN_BOX = """() => {
  const box = document.querySelector('.djinn-dashboard .dj-token-scroll');
  const dash = document.querySelector('.djinn-dashboard');
  return {overflow: getComputedStyle(box).overflowX, width: box.getBoundingClientRect().width,
          dashboard: dash.getBoundingClientRect().width};
}"""

TOGGLES_IN_SIGHT = """() => {
  const grid = document.querySelector('.djinn-dashboard .dj-layer-toggles');
  const r = grid.getBoundingClientRect();
  const buttons = Array.from(grid.querySelectorAll('button'));
  return buttons.length > 0 && grid.scrollHeight <= grid.clientHeight + 1 && buttons.every(b => {
    const q = b.getBoundingClientRect();
    return q.width > 0 && q.top >= r.top - 1 && q.bottom <= r.bottom + 1; });
}"""


@pytest.fixture
def lab(tmp_path):
    """A fresh JupyterLab on a free port, serving copies of the notebooks (Lab autosaves)."""
    notebooks = {nb.name: nb.read_text() for nb in (NOTEBOOK, ATTENTION_NOTEBOOK)}
    with jupyterlab(tmp_path, notebooks, {"DJINN_NOTEBOOK_MODEL": MODEL}) as url_token:
        yield url_token


def test_slider_changes_divergence_plot_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    url, token = lab
    expect.set_options(timeout=90_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.set_default_timeout(90_000)
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?reset&token={token}")
            expect(page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]')).to_be_visible()
            page.locator(".jp-Notebook .jp-Cell").first.click()
            for attempt in range(3):     # the first menu click can land before the kernel is wired
                page.locator('.lm-MenuBar-itemLabel:text-is("Run")').click()
                page.locator('.lm-Menu-itemLabel:text-is("Run All Cells")').click()
                try:
                    expect(page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|1)\]"))
                           .first).to_be_visible(timeout=15_000)
                    break
                except AssertionError:
                    page.screenshot(path=str(tmp_path / f"run-all-{attempt}.png"))
            # the last printing cell ran (slider moved in code, from the checkpoint)
            expect(page.locator(".jp-OutputArea-output", has_text="steered from").first).to_be_visible()
            expect(page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]')).to_be_visible()
            dash = page.locator(".djinn-dashboard")
            expect(dash).to_be_visible()
            page.wait_for_function(f"() => {{ const y = ({DIVERGENCE_Y})(); return y && y.length === 16; }}")
            before = page.evaluate(DIVERGENCE_Y)

            slider = dash.locator(".widget-slider", has=page.locator(".widget-label", has_text="scale"))
            expect(slider.locator(".widget-readout")).to_have_text("0.60")
            handle = slider.locator(".noUi-handle")
            handle.focus()
            handle.press("ArrowRight")
            expect(slider.locator(".widget-readout")).to_have_text("0.65")
            page.wait_for_function(
                f"(before) => {{ const y = ({DIVERGENCE_Y})(); return y && y.length === 16 && "
                "JSON.stringify(y) !== JSON.stringify(before); }", arg=before)
            after = page.evaluate(DIVERGENCE_Y)
            assert after != before and len(after) == 16
            expect(dash.locator(".dj-error")).to_have_count(0)
            expect(dash.locator(".dj-tokens")).to_be_visible()

            # a prompt change, then a slider move: the new runs are compared, no stale error
            dash.locator(".widget-textarea textarea").fill("The capital of Italy is")
            handle.focus()
            handle.press("ArrowRight")
            expect(slider.locator(".widget-readout")).to_have_text("0.70")
            page.wait_for_function(
                f"(before) => {{ const y = ({DIVERGENCE_Y})(); return y && y.length === 16 && "
                "JSON.stringify(y) !== JSON.stringify(before); }", arg=after)
            expect(dash.locator(".widget-html", has_text="steered: 16 tokens, mismatch")).to_have_count(1)
            expect(dash.locator(".dj-error")).to_have_count(0)

            # the token view scrolls in its own box; every layer has a visible toggle
            box = page.evaluate(TOKEN_BOX)
            assert box["overflow"] == "auto" and box["width"] <= box["dashboard"] + 1, box
            expect(dash.locator(".dj-layer-toggles button")).to_have_count(LAYERS)
            assert page.evaluate(TOGGLES_IN_SIGHT)
            expect(dash.locator(".dj-tokens td[title*='top-k']").first).to_be_attached()

            time.sleep(1.0)    # let plotly finish drawing the updated traces
            shot, tokens = tmp_path / "dashboard.png", tmp_path / "token_view.png"
            dash.screenshot(path=str(shot))
            dash.locator(".dj-token-scroll").screenshot(path=str(tokens))
            assert shot.stat().st_size > 10_000
            if UPDATE_SCREENSHOTS:
                shutil.copy(shot, ROOT / "docs" / "dashboard.png")
                shutil.copy(tokens, ROOT / "docs" / "token_view.png")
        finally:
            browser.close()


ATTENTION_FIGURE = """(cell) => {
  const el = cell.querySelector('.js-plotly-plot');
  if (!el || !el._fullData) return null;
  return {traces: el._fullData.filter(t => t.type === 'heatmap').length,
          ticks: Array.from(el._fullLayout.xaxis.ticktext || [])};
}"""


def test_attention_view_in_jupyterlab(lab, tmp_path):
    """Notebook 05 up to its attention view, then the view itself: one heatmap per head of
    SmolLM2's block 6, the prompt's tokens (whitespace drawn as ␣) on the axes."""
    from playwright.sync_api import expect, sync_playwright
    url, token = lab
    expect.set_options(timeout=180_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.set_default_timeout(180_000)
            page.goto(f"{url}/lab/tree/{ATTENTION_NOTEBOOK.name}?reset&token={token}")
            idle = page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
            expect(idle).to_be_visible()
            cell = page.locator(".jp-CodeCell", has_text="dj.plots.attention_pattern(pat")
            for attempt in range(3):     # the first menu click can land before the kernel is wired
                cell.locator(".jp-InputPrompt").click()
                page.locator('.lm-MenuBar-itemLabel:text-is("Run")').click()
                page.locator('.lm-Menu-itemLabel:text-is("Run All Above Selected Cell")').click()
                try:
                    expect(page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|1)\]"))
                           .first).to_be_visible(timeout=15_000)
                    break
                except AssertionError:
                    page.screenshot(path=str(tmp_path / f"run-above-{attempt}.png"))
            expect(page.locator(".jp-OutputArea-output", has_text="ActivationCache").first).to_be_visible()
            expect(idle).to_be_visible()
            cell.locator(".jp-InputPrompt").click()
            page.locator('.lm-MenuBar-itemLabel:text-is("Run")').click()
            page.locator('.lm-Menu-itemLabel:text-is("Run Selected Cell")').click()
            plot = cell.locator(".jp-OutputArea .js-plotly-plot")
            expect(plot).to_be_visible()
            page.wait_for_function(f"(cell) => ({ATTENTION_FIGURE})(cell)", arg=cell.element_handle())
            fig = page.evaluate(ATTENTION_FIGURE, cell.element_handle())
            assert fig["traces"] == 9, fig                    # SmolLM2: 9 query heads
            assert fig["ticks"][:2] == ["The", "\u2423capital"], fig
            expect(cell.locator(".jp-OutputArea-output", has_text="Error")).to_have_count(0)
            time.sleep(1.0)
            shot = tmp_path / "attention_view.png"
            plot.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if UPDATE_SCREENSHOTS:
                shutil.copy(shot, ROOT / "docs" / "attention_view.png")
        finally:
            browser.close()
