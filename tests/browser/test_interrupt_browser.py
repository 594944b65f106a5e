"""Interrupting a long generation from JupyterLab's toolbar, in a real browser (Debian's
chromium driven by Playwright): the cell ends with ``GenerationInterrupted`` and the next
cell answers at once on the same client and session, which hold the tokens so far
(tiny-gpt2, float32, CPU, a kernel server subprocess the notebook reaches via DJINN_SERVER)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from jupyterlab_for_tests import CHROMIUM, CHROMIUM_FLAGS, jupyterlab

pytestmark = pytest.mark.lab

LONG = 1500       # tokens asked for (tiny-gpt2 takes 2048 positions)
CELLS = [
    "import djinn_nb as dj\nc = dj.connect()\ns = c.session(model='tiny-gpt2')\nprint('connected')",
    "print('generating', flush=True)\n"
    f"ev = s.generate('The capital of France is', max_new_tokens={LONG}, stop_at_eos=False)",
    "import time\nt0 = time.perf_counter()\nok = c.ping() > 0\nlast = s.last_event\n"
    "print(f'answer ping={ok} interrupted={last.interrupted} tokens={len(last.tokens)} '\n"
    "      f'in {time.perf_counter() - t0:.3f} s')",
]


def notebook(cells: list) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"}},
            "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
                       "outputs": [], "source": src} for i, src in enumerate(cells)]}


@pytest.fixture
def lab(tmp_path):
    """A kernel server subprocess and a fresh JupyterLab whose kernels reach it."""
    server = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                               "--port", "0"], stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "server.log", "wb"), text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        line = server.stdout.readline()
        assert line.startswith("DJINN_SERVER_READY"), (tmp_path / "server.log").read_text()
        with jupyterlab(tmp_path, {"interrupt.ipynb": json.dumps(notebook(CELLS))},
                        {"DJINN_SERVER": line.split()[1]}) as url_token:
            yield url_token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_toolbar_interrupt_ends_a_long_generation_and_the_next_cell_answers(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    url, token = lab
    expect.set_options(timeout=90_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1200})
            page.set_default_timeout(90_000)
            page.goto(f"{url}/lab/tree/interrupt.ipynb?reset&token={token}")
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
            expect(page.locator(".jp-OutputArea-output", has_text="generating")).to_be_visible()
            page.locator('.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"]').first.click()
            expect(page.locator(".jp-OutputArea-output",
                                has_text="GenerationInterrupted")).to_be_visible()
            expect(page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]')).to_be_visible()
            # the third cell (Run All stopped at the interrupt): run it on its own
            page.locator(".jp-Notebook .jp-CodeCell").nth(2).locator(".jp-InputArea-editor").click()
            t0 = time.monotonic()
            page.keyboard.press("Shift+Enter")
            answer = page.locator(".jp-OutputArea-output", has_text="answer ping=True")
            expect(answer).to_be_visible(timeout=30_000)      # (a hang guard, not a claim)
            took = time.monotonic() - t0
            page.screenshot(path=str(tmp_path / "interrupted.png"))
            m = re.search(r"interrupted=(\w+) tokens=(\d+)", answer.inner_text())
            assert m and m.group(1) == "True" and int(m.group(2)) < LONG, answer.inner_text()
            print(f"toolbar interrupt, next cell answered in {took:.1f} s (browser round trip "
                  f"included); {m.group(2)} tokens kept")
        finally:
            browser.close()
