"""The kernel server as users start it: `python -m kernel_server`, and `dj.connect()`
launching one, each a real subprocess on a loopback port."""
from __future__ import annotations

import subprocess
import sys

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
