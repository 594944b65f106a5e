"""The kernel server as users start it: `python -m kernel_server`, and `dj.connect()`
launching one, each a real subprocess on a loopback port."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import djinn_nb as dj


def test_connect_without_address_launches_and_stops_a_server(monkeypatch):
    monkeypatch.delenv("DJINN_SERVER", raising=False)
    client = dj.connect(model="tiny-gpt2", progress=False)
    proc = client._local_server.proc
    try:
        s = client.session()
        assert s.model == "tiny-gpt2" and s.layers == 8
        s.breakpoint(layer=6)
        ev = s.generate("The capital of France is", max_new_tokens=4)
        assert isinstance(ev, dj.Paused) and (ev.layer, ev.step) == (6, 1)
        assert isinstance(s.resume(ignore_breakpoints=True), dj.Finished)
    finally:
        client.close()
    assert proc.wait(timeout=30) is not None
    with pytest.raises(dj.ConnectionLostError):
        dj.connect(client.address)


def test_cli_serves_and_refuses_bad_options():
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--port", "0", "--max-new-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("DJINN_SERVER_READY"), line
        with dj.connect(line.split()[1]) as client:
            s = client.session()
            assert client.server_info["default_model"] == "tiny-gpt2"
            with pytest.raises(dj.LimitExceededError, match="--max-new-tokens"):
                s.generate("hello", max_new_tokens=9)
            assert len(s.generate("hello", max_new_tokens=8, stop_at_eos=False).tokens) == 8
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "refusing to bind 0.0.0.0" in bad.stderr


# ---- a launched server lives as long as its launcher (#22) ---------------------------------
HANG_GUARD = 30      # seconds: what the issue asks a launched server to exit within


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_gone(pid: int, timeout: float = HANG_GUARD) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


LAUNCHER = """
import sys, threading, time
import djinn_nb as dj
box = {}
def launch():
    box["c"] = dj.connect(model="tiny-gpt2", progress=False)
if sys.argv[1] == "worker":     # launched from a thread that has ended by the kill
    t = threading.Thread(target=launch); t.start(); t.join()
else:
    launch()
c = box["c"]
s = c.session()
s.breakpoint(layer=2)
s.generate("hello", max_new_tokens=4)      # a paused session for the server to release
print(c._local_server.proc.pid, c._local_server.log_path, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("thread", ["main", "worker"])
def test_a_launched_server_stops_when_its_launcher_is_killed(tmp_path, monkeypatch, thread):
    """SIGKILL the process that called dj.connect(): its server stops cleanly (sessions
    released) by itself, from the main thread (Linux: parent-death signal) and from a
    worker thread (the stdin pipe / parent pid watch)."""
    monkeypatch.delenv("DJINN_SERVER", raising=False)
    env = dict(os.environ, DJINN_LOG_DIR=str(tmp_path))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, thread], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = launcher.stdout.readline()
        assert line, launcher.stderr.read()
        pid, log = line.split()
        pid = int(pid)
        assert alive(pid)
        launcher.kill()
        launcher.wait(timeout=HANG_GUARD)
        assert wait_gone(pid), f"server {pid} still running {HANG_GUARD} s after its launcher died"
    finally:
        if launcher.poll() is None:
            launcher.kill()
    # a clean stop: the log (kept, nobody was left to delete it) says the paused session was
    # released (by the stop, or by the lost connection if the server heard of that first)
    text = open(log).read()
    assert "stopped; released" in text and "released 1 sessions" in text, text[-2000:]


@pytest.mark.slow
def test_a_hand_started_server_survives_its_starting_shell(tmp_path):
    out = tmp_path / "server.out"
    shell = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m kernel_server --model tiny-gpt2 --port 0 "
                       f"</dev/null >{out} 2>{tmp_path / 'server.err'} & echo $!"],
        capture_output=True, text=True, timeout=60)
    pid = int(shell.stdout.strip())           # the shell has exited
    try:
        deadline = time.monotonic() + 120
        while "DJINN_SERVER_READY" not in out.read_text():
            assert alive(pid) and time.monotonic() < deadline, (tmp_path / "server.err").read_text()
            time.sleep(0.1)
        address = out.read_text().split()[1]
        with dj.connect(address) as client:
            assert client.ping() > 0
        assert alive(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid)


@pytest.mark.slow
def test_connect_reuses_the_server_it_launched(tmp_path, monkeypatch):
    """dj.connect() with no address twice: one server; it stops with the last client, and its
    log (under DJINN_LOG_DIR) is removed after that clean stop."""
    monkeypatch.delenv("DJINN_SERVER", raising=False)
    monkeypatch.setenv("DJINN_LOG_DIR", str(tmp_path))
    first = dj.connect(model="tiny-gpt2", progress=False)
    server = first._local_server
    second = dj.connect(model="tiny-gpt2", progress=False)
    try:
        assert second.address == first.address and second._local_server is server
        assert server.log_path.parent == tmp_path and server.log_path.exists()
        first.close()
        assert server.running and second.ping() > 0
    finally:
        first.close()
        second.close()
    assert server.proc.wait(timeout=HANG_GUARD) == 0
    assert not server.log_path.exists()
    third = dj.connect(model="tiny-gpt2", progress=False)    # a new one once that stopped
    try:
        assert third._local_server is not server
    finally:
        third.close()
