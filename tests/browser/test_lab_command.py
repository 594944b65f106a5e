"""The README's lab command (`make lab`) brings up JupyterLab and a usable kernel server,
and Ctrl-C on its process group takes both down."""
from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import djinn_nb
from djinn_nb.lab import ADDRESS_LINE

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180.0     # kernel server (real weights) + JupyterLab, on 2 CPU cores
STOP_TIMEOUT = 60.0

pytestmark = [pytest.mark.lab, pytest.mark.smollm2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def lab_status(port: int, token: str) -> int | None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                                 headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_for(what: str, cond, timeout: float, proc: subprocess.Popen, output: list[str]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (exit code {proc.poll()}); "
                         "lab command output:\n" + "".join(output[-40:]))


def test_make_lab_serves_jupyterlab_and_kernel_server():
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("DJINN_SERVER", None)
    # `make setup` first (a no-op once .venv is installed) so the wait below times only the lab
    subprocess.run(["make", "setup"], cwd=REPO, env=env, check=True, timeout=500,
                   stdout=subprocess.DEVNULL)
    proc = subprocess.Popen(["make", "lab", f"PORT={port}", f"LAB_ARGS=--no-browser --token {token}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    output: list[str] = []

    def read():
        for line in proc.stdout:
            output.append(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    kernel_address = None
    try:
        assert wait_for("JupyterLab answers /api/status", lambda: lab_status(port, token) == 200,
                        START_TIMEOUT, proc, output)
        assert lab_status(port, "wrong-" + token) == 403, "JupyterLab must check the token"
        line = next((l for l in output if l.startswith(ADDRESS_LINE)), None)
        assert line, "the lab command did not print the kernel server address:\n" + "".join(output)
        kernel_address = re.match(re.escape(ADDRESS_LINE) + r" (\S+)", line).group(1)

        with djinn_nb.connect(kernel_address) as client:
            ev = client.session().generate("The capital of France is", max_new_tokens=3)
        assert ev.finished and len(ev.tokens) == 3, ev
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)    # Ctrl-C in the terminal of `make lab`
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=STOP_TIMEOUT)
            deadline = time.monotonic() + 10      # orphans of the group, if any, get a moment
            while time.monotonic() < deadline and group_alive(proc.pid):
                time.sleep(0.2)
            leftovers = group_alive(proc.pid)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # whatever did not stop, so nothing leaks
            except ProcessLookupError:
                pass
            reader.join(timeout=5)

    assert not leftovers, "processes of the lab command outlived Ctrl-C"
    host, kport = djinn_nb.client.parse_address(kernel_address)
    assert not port_open("127.0.0.1", port), "JupyterLab still listens after Ctrl-C"
    assert not port_open(host, kport), "the kernel server still listens after Ctrl-C"
    assert any(l.startswith("djinn_nb.lab: stopped") for l in output), "".join(output[-40:])
