"""Interrupting a running generation as researchers do: SIGINT to a script, the Jupyter
kernel's own interrupt request, ``s.interrupt()`` from another thread. Each time the server
ends the run at its next step boundary, the caller gets the tokens so far, and the client,
the session and the server go on working (tiny-gpt2, float32, CPU, the test server)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import djinn_nb as dj

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"
LONG = 1500          # tokens asked for: minutes of decoding on this machine if not interrupted
HANG_GUARD = 120     # seconds: only against a hang, never a timing claim


def wait_until_decoding(kernel, session_id: str, steps: int = 2) -> None:
    """Block until the server-side run of ``session_id`` has made ``steps`` tokens."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        s = kernel.sessions._sessions.get(session_id)
        run = getattr(s, "run", None)
        if s is not None and s.state == "running" and run is not None and run.step >= steps:
            return
        time.sleep(0.02)
    raise AssertionError(f"session {session_id} never started decoding")


SCRIPT = textwrap.dedent("""
    import json, signal, sys, time
    import djinn_nb as dj
    sigint = []
    def on_sigint(signum, frame):
        sigint.append(time.perf_counter())
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_sigint)
    c = dj.connect(sys.argv[1])
    s = c.session(model="tiny-gpt2")
    print(json.dumps({"session": s.id}), flush=True)
    out = {}
    try:
        s.generate(%(prompt)r, max_new_tokens=%(long)d, stop_at_eos=False)
    except dj.GenerationInterrupted as exc:
        back = time.perf_counter()
        ev = exc.event
        out.update(kind=type(ev).__name__, tokens=ev.tokens, stop_reason=ev.result.stop_reason,
                   same_as_last_event=s.last_event is ev, latency_ms=(back - sigint[0]) * 1e3)
    out["ping_ms"] = c.ping()
    n = len(out.get("tokens", []))
    out["again"] = s.generate(%(prompt)r, max_new_tokens=max(n, 1), stop_at_eos=False).tokens
    c.close()
    print(json.dumps(out), flush=True)
""") % {"prompt": PROMPT, "long": LONG}


@pytest.mark.slow
def test_sigint_in_a_script_ends_the_run_and_keeps_everything_usable(kernel, server):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, server.address], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        session_id = json.loads(proc.stdout.readline())["session"]
        wait_until_decoding(kernel, session_id)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    out = json.loads(out.strip().splitlines()[-1])
    assert out["kind"] == "Interrupted" and out["stop_reason"] == "interrupted"
    assert out["same_as_last_event"]
    assert 2 <= len(out["tokens"]) < LONG
    # the tokens so far are exactly those of an uninterrupted run of that length
    assert out["again"] == out["tokens"]
    assert out["ping_ms"] > 0


@pytest.mark.slow
def test_interrupt_from_another_thread_returns_an_interrupted_event(kernel, client):
    s = client.session(model="tiny-gpt2")
    asked = []

    def interrupter():
        wait_until_decoding(kernel, s.id)
        asked.append(s.interrupt())
    t = threading.Thread(target=interrupter)
    t.start()
    ev = s.generate(PROMPT, max_new_tokens=LONG, stop_at_eos=False)
    t.join(HANG_GUARD)
    assert asked == [True]
    assert isinstance(ev, dj.Interrupted) and isinstance(ev, dj.Finished) and ev.interrupted
    assert ev.result.stop_reason == "interrupted" and 2 <= len(ev.tokens) < LONG
    assert s.info()["state"] == "finished"
    assert s.generate(PROMPT, max_new_tokens=len(ev.tokens), stop_at_eos=False).tokens == ev.tokens
    assert s.interrupt() is False             # nothing running: nothing asked


def test_interrupt_of_an_idle_or_closed_session_is_harmless(client):
    s = client.session(model="tiny-gpt2")
    assert s.interrupt() is False
    s.close()
    assert s.interrupt() is False
    with pytest.raises(dj.SessionClosedError, match="is closed"):
        s.info()
    s.close()                                 # (twice: a no-op)
    with pytest.raises(dj.UnknownSessionError):
        client.call("interrupt", session="nosuchsession")
    assert client.ping() > 0


# ---- a real Jupyter kernel, interrupted through its own interrupt request ----------------
def _execute(kc, code: str, timeout: float = HANG_GUARD, expressions=None) -> dict:
    msg_id = kc.execute(code, user_expressions=expressions or {})
    return _reply(kc, msg_id, timeout)


def _reply(kc, msg_id: str, timeout: float = HANG_GUARD) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg["content"]


@pytest.mark.slow
def test_the_jupyter_kernels_interrupt_ends_the_run(kernel, server):
    jupyter_client = pytest.importorskip("jupyter_client", reason="jupyter_client not installed")
    pytest.importorskip("ipykernel", reason="ipykernel not installed")
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(ROOT), env=dict(os.environ, DJINN_SERVER=server.address))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=HANG_GUARD)
        r = _execute(kc, "import djinn_nb as dj\nc = dj.connect()\n"
                         "s = c.session(model='tiny-gpt2')", expressions={"sid": "s.id"})
        assert r["status"] == "ok", r
        session_id = r["user_expressions"]["sid"]["data"]["text/plain"].strip("'")
        msg_id = kc.execute(f"ev = s.generate({PROMPT!r}, max_new_tokens={LONG}, "
                            "stop_at_eos=False)")
        wait_until_decoding(kernel, session_id)
        t0 = time.perf_counter()
        km.interrupt_kernel()
        r = _reply(kc, msg_id)
        interrupt_s = time.perf_counter() - t0
        assert r["status"] == "error" and r["ename"] == "GenerationInterrupted", r
        # the next cell answers at once, on the same client and session
        r = _execute(kc, "got = s.last_event\n"
                         "again = s.generate(%r, max_new_tokens=len(got.tokens), "
                         "stop_at_eos=False).tokens" % PROMPT,
                     expressions={"facts": "(c.ping() > 0, got.interrupted, len(got.tokens), "
                                           "again == got.tokens)"})
        assert r["status"] == "ok", r
        ping_ok, interrupted, n, same = eval(r["user_expressions"]["facts"]["data"]["text/plain"])
        assert ping_ok and interrupted and same and 2 <= n < LONG
        print(f"jupyter interrupt -> reply: {interrupt_s * 1e3:.0f} ms (tiny-gpt2, cpu)")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
