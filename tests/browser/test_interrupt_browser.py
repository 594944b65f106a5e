"""Interrupting a long generation from JupyterLab's toolbar, in a real browser (Debian's
chromium driven by Playwright): the cell ends with ``GenerationInterrupted`` and the next
cell answers at once on the same client and session, which hold the tokens so far
(tiny-gpt2, float32, CPU, a kernel server subprocess the notebook reaches via DJINN_SERVER)."""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.lab

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
LONG = 1500       # tokens asked for (tiny-gpt2 takes 2048 positions)
CELLS = [
    "import djinn_nb as dj\nc = dj.connect()\ns = c.session(model='tiny-gpt2')\nprint('connected')",
    "print('generating', flush=True)\n"
    f"ev = s.generate('The capital of France is', max_new_tokens={LONG}, stop_at_eos=False)",
    "import time\nt0 = time.perf_counter()\nok = c.ping() > 0\nlast = s.last_event\n"
    "print(f'answer ping={ok} interrupted={last.interrupted} tokens={len(last.tokens)} '\n"
    "      f'in {time.perf_counter() - t0:.3f} s')",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook(cells: list) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"}},
            "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
                       "outputs": [], "source": src} for i, src in enumerate(cells)]}


@pytest.fixture
def lab(tmp_path):
    """A kernel server subprocess and a fresh JupyterLab whose kernels reach it."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    server = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                               "--port", "0"], stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "server.log", "wb"), text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    line = server.stdout.readline()
    assert line.startswith("DJINN_SERVER_READY"), (tmp_path / "server.log").read_text()
    root, settings = tmp_path / "root", tmp_path / "settings"
    root.mkdir()
    (root / "interrupt.ipynb").write_text(json.dumps(notebook(CELLS)))
    notify = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notify.parent.mkdir(parents=True)
    notify.write_text(json.dumps({"fetchNews": "false"}))
    port, token = free_port(), secrets.token_hex(16)
    log = open(tmp_path / "jupyterlab.log", "wb")
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               DJINN_SERVER=line.split()[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
         f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
         f"--LabApp.user_settings_dir={settings}"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("JupyterLab did not start:\n"
                                + (tmp_path / "jupyterlab.log").read_text())
                time.sleep(0.25)
        yield url, token
    finally:
        for p in (proc, server):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


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
