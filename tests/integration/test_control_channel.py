"""The control channel (djinn_nb.control / kernel_server.transport.control_listener): every call of a client
goes over its raw socket, with the same results and the same typed errors as over rpyc;
strangers and bad frames are refused while the server stays up; the channel closing is
the client's connection closing (its sessions are released)."""
from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

import djinn_nb as dj
from djinn_nb import control
from djinn_protocol import framing
from djinn_protocol.framing import NONCE_BYTES

PROMPT = "The capital of France is"


@pytest.fixture
def rpyc_client(server, monkeypatch):
    """A client of the same server that keeps every call on rpyc."""
    monkeypatch.setenv("DJINN_CONTROL", "0")
    c = dj.connect(server.address)
    monkeypatch.delenv("DJINN_CONTROL")
    yield c
    c.close()


def sessions_on(client) -> int:
    """Sessions on the in-process test server, all clients (hello() tells a client only its
    own: issue 17)."""
    return _SERVER[0].kernel.sessions.count()


_SERVER: list = []


@pytest.fixture(autouse=True)
def _the_server(server):
    _SERVER[:] = [server]


def wait_for(predicate, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def scenario(client) -> dict:
    """Breakpoints, a small and a large activation, edits with a vector and an array,
    resume, step, steering, stop, logits: everything a notebook does, recorded."""
    s = client.session(model="tiny-gpt2")
    out = {}
    s.breakpoint(layer=3, phase="both")
    ev = s.generate(" ".join(["word"] * 300), max_new_tokens=6, stop_at_eos=False,
                    return_logits=True)
    out["first"] = ev
    out["activation"] = s.activation()                          # 300+ x 64 floats: 77 KiB
    out["rows"] = s.activation(positions=[0, 7])
    out["norms"] = s.activation(reduce="norm")
    out["edit"] = s.edit(add=np.linspace(-1, 1, 64, dtype=np.float32), alpha=0.5,
                         positions="last")
    out["step"] = s.step()                                      # layer 4 of the prefill
    out["set"] = s.edit(set=np.full((1, 64), 0.25, dtype=np.float32), positions="last")
    out["resume"] = s.resume()                                  # layer 3 of step 1
    out["token_step"] = s.step(to="token")                      # layer 3 of step 2
    out["resume2"] = s.resume(ignore_breakpoints=True)          # the end
    s.clear_breakpoints()
    out["rule"] = s.steer(layer=2, add=np.ones(64, dtype=np.float32), alpha=0.3)
    out["steered"] = s.generate(PROMPT, max_new_tokens=5, stop_at_eos=False, return_logits=True)
    s.clear_steering()
    s.breakpoint(layer=1, steps=[2])
    s.generate(PROMPT, max_new_tokens=5, stop_at_eos=False, return_logits=True)
    out["stopped"] = s.stop()
    out["info"] = {k: v for k, v in s.info().items() if k != "id"}
    s.close()
    return out


def same(a, b, path="") -> None:
    """Equal values, arrays bit for bit; step timings excepted."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), path
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, a, b)
        for k in a:
            if k not in ("forward_ms", "paused_ms", "seed"):    # (timings; greedy: seed unused)
                same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b), path
        same(vars(a), vars(b), path)
    else:
        assert a == b, (path, a, b)


def test_every_call_goes_over_the_control_channel(client):
    assert isinstance(client.control_channel, control.ControlChannel)
    before = client.control_channel.bytes_sent
    scenario(client)
    assert client.control_channel.bytes_sent > before
    # rpyc only carried the opening: hello and the control offer
    assert client.stats(memory=False)["rpyc_calls"] == 2


def test_same_results_as_rpyc(client, rpyc_client):
    assert rpyc_client.control_channel is None
    fast, slow = scenario(client), scenario(rpyc_client)
    same(fast, slow)
    assert fast["activation"].shape[0] >= 300 and fast["resume2"].result.logits.shape == (6, 49152)


BAD_CALLS = [
    ("generate", lambda sid: dict(session="nope", prompt=PROMPT)),
    ("resume", lambda sid: dict(session=sid)),
    ("activation", lambda sid: dict(session=sid)),
    ("edit", lambda sid: dict(session=sid, scale=0.5)),
    ("stop", lambda sid: dict(session=sid)),
    ("set_breakpoint", lambda sid: dict(session=sid, layer=99)),
    ("set_breakpoint", lambda sid: dict(session=sid, layer="6")),
    ("generate", lambda sid: dict(session=sid, prompt=PROMPT, bogus=1)),
    ("generate", lambda sid: dict(session=sid)),
    ("generate", lambda sid: dict(session=sid, prompt=PROMPT, max_new_tokens=10**9)),
    ("steer", lambda sid: dict(session=sid, layer=1, add=np.full(64, np.nan, np.float32))),
    ("steer", lambda sid: dict(session=sid, layer=1, add=np.zeros(3, np.float32))),
    ("steer", lambda sid: dict(session=sid, layer=1, add=np.zeros((2, 64), np.float32))),
    ("open_session", lambda sid: dict(model=123)),
    ("restore", lambda sid: dict(session=sid, checkpoint="nope")),
    ("checkpoint_info", lambda sid: dict(checkpoint=12)),
    ("ping", lambda sid: dict(extra=1)),
    ("generate", lambda sid: dict(session=sid, prompt=object())),       # refused client-side
]


def outcome(client, name, kwargs, sid):
    try:
        client.call(name, **kwargs)
    except dj.DjinnError as exc:
        return type(exc), str(exc).replace(sid, "<sid>")
    return None


def test_same_typed_errors_as_rpyc(client, rpyc_client):
    a, b = client.session(model="tiny-gpt2"), rpyc_client.session(model="tiny-gpt2")
    reference = b.generate(PROMPT, max_new_tokens=5, stop_at_eos=False).tokens
    assert a.generate(PROMPT, max_new_tokens=5, stop_at_eos=False).tokens == reference
    for name, make in BAD_CALLS:
        fast = outcome(client, name, make(a.id), a.id)
        slow = outcome(rpyc_client, name, make(b.id), b.id)
        assert fast is not None and fast == slow, (name, fast, slow)
        assert issubclass(fast[0], dj.DjinnError) and fast[0] is not dj.ServerError
    assert a.generate(PROMPT, max_new_tokens=5, stop_at_eos=False).tokens == reference


def test_unknown_call_is_a_typed_error_and_the_channel_goes_on(client):
    with pytest.raises(dj.InvalidArgumentError, match="unknown call"):
        client.call("no_such_call")
    with pytest.raises(dj.InvalidArgumentError, match="unknown call"):
        client.call("__init__")
    assert client.ping() > 0


def raw_frame(client, meta: bytes, payload: bytes = b"", announce: int | None = None) -> dict:
    """Send a hand-made frame on the client's own (authorised) control socket."""
    ch = client.control_channel
    with ch._lock:
        head = framing.HEADER.pack(len(meta), len(payload) if announce is None else announce)
        ch.sock.sendall(head + meta + payload)
        return ch._read_reply()


def test_bad_frames_get_typed_errors_and_the_channel_stays_usable(client):
    s = client.session(model="tiny-gpt2")
    reference = s.generate(PROMPT, max_new_tokens=4, stop_at_eos=False).tokens
    array = {"__ndarray__": 0, "dtype": "float32", "shape": [64]}
    cases = [
        b"{not json",
        b"[1, 2, 3]",
        json.dumps({"call": 7, "args": {}}).encode(),
        json.dumps({"call": "ping", "args": []}).encode(),
        json.dumps({"call": "ping", "args": {"a": {"__ndarray__": 3, "dtype": "float32",
                                                   "shape": [2]}}}).encode(),
        json.dumps({"call": "ping", "args": {"a": {"__ndarray__": 0, "dtype": "object",
                                                   "shape": [2]}}}).encode(),
        json.dumps({"call": "ping", "args": {"a": {"__ndarray__": 0, "dtype": "float32",
                                                   "shape": [-1]}}}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
    ]
    for meta in cases:
        reply = raw_frame(client, meta, b"\0" * 8)
        assert reply["error"]["type"] == "InvalidArgumentError", (meta[:60], reply)
    # arrays that do not match the announced payload: skipped whole, typed error
    meta = json.dumps({"call": "steer", "args": {"session": s.id, "layer": 1, "add": array}})
    reply = raw_frame(client, meta.encode(), b"\0" * 100)
    assert reply["error"]["type"] == "InvalidArgumentError" and "payload" in reply["error"]["message"]
    # a well-formed hand-made request works, and so does the client afterwards
    reply = raw_frame(client, meta.encode(), np.zeros(64, np.float32).tobytes())
    assert reply["ok"]["layer"] == 1
    s.clear_steering()
    assert s.generate(PROMPT, max_new_tokens=4, stop_at_eos=False).tokens == reference


def test_oversized_frame_closes_that_connection_only(server, client):
    victim = dj.connect(server.address)
    victim.session(model="tiny-gpt2")
    assert wait_for(lambda: sessions_on(client) >= 1)
    before = sessions_on(client)
    limit = server.control.max_request_bytes
    with pytest.raises((EOFError, OSError)):
        raw_frame(victim, b"{}", announce=limit + 1)          # nothing allocated, cut off
    assert wait_for(lambda: sessions_on(client) == before - 1)   # its session released
    with pytest.raises(dj.ConnectionLostError):
        victim.ping()
    victim.close()
    assert client.ping() > 0


def offer(client) -> dict:
    return client.call("open_control")


def handshake(sock: socket.socket, nonce: bytes) -> bytes:
    assert sock.recv(1) == b"\x00"                 # the opening: loopback, no token
    sock.sendall(nonce)
    try:
        return sock.recv(1)
    except ConnectionResetError:
        return b""


def test_strangers_are_refused_and_the_server_stays_up(server, client):
    port = offer(client)["port"]
    host = server.host
    # a wrong nonce
    with socket.create_connection((host, port), timeout=10) as sock:
        assert handshake(sock, b"x" * NONCE_BYTES) == b""
    # garbage right away, and a half nonce then silence
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.recv(1)
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 64)
        assert sock.recv(1) == b""
    # a real nonce works once; replaying it is refused. (It is another client's offer: the
    # channel opened with it closing below is that client's connection closing.)
    other = dj.connect(server.address)
    good = offer(other)
    nonce = bytes.fromhex(good["nonce"])
    with socket.create_connection((host, port), timeout=10) as first:
        assert handshake(first, nonce) == framing.ACK
        with socket.create_connection((host, port), timeout=10) as second:
            assert handshake(second, nonce) == b""
        framing.send_frame(first, json.dumps({"call": "ping", "args": {}}).encode())
        reader = framing.FrameReader(first)
        meta_len, payload = reader.read_header()
        assert json.loads(reader.read(meta_len)) == {"ok": None} and payload == 0
    assert client.ping() > 0 and dj.connect(server.address).ping() > 0
    other.close()


def test_silent_stranger_is_dropped_after_the_handshake_timeout(server, client, monkeypatch):
    import kernel_server.transport.control_listener as server_control
    monkeypatch.setattr(server_control, "HANDSHAKE_TIMEOUT", 0.5)
    # the socket's timeout is only a hang guard: were the stranger not dropped, recv() would
    # raise TimeoutError instead of returning the end of the stream
    with socket.create_connection((server.host, offer(client)["port"]), timeout=120) as sock:
        assert sock.recv(1) == b"\x00"
        assert sock.recv(1) == b""                     # closed by the server, not by us
    assert client.ping() > 0


def test_the_token_is_needed_on_the_control_socket_too(kernel, monkeypatch):
    from kernel_server.transport.server import KernelServer
    monkeypatch.delenv("DJINN_TOKEN", raising=False)
    srv = KernelServer(kernel, "127.0.0.1", 0, token="control-token").start()
    try:
        with dj.connect(srv.address, token="control-token") as c:
            assert isinstance(c.control_channel, control.ControlChannel)   # opened through the challenge
            assert c.session(model="tiny-gpt2").generate(PROMPT, max_new_tokens=2).finished
            good = offer(c)
            with socket.create_connection((srv.host, good["port"]), timeout=10) as sock:
                assert sock.recv(1) == b"\x01"           # a challenge, not an open door
                sock.recv(64)
                sock.sendall(b"\0" * 32)                 # a wrong answer
                assert sock.recv(1) in (b"\x00", b"")
            with pytest.raises(dj.AuthenticationFailedError):   # the nonce alone is not enough
                control.open_channel(srv.host, good, token="wrong")
            assert c.ping() > 0
    finally:
        srv.close()


def test_closing_the_control_socket_releases_the_sessions(server, client):
    victim = dj.connect(server.address)
    for _ in range(2):
        s = victim.session(model="tiny-gpt2")
        s.breakpoint(layer=2)
        assert s.generate(PROMPT, max_new_tokens=4).paused
    mine = sessions_on(victim)
    victim.control_channel.sock.shutdown(socket.SHUT_RDWR)         # only the control socket goes
    assert wait_for(lambda: sessions_on(client) <= mine - 2)
    with pytest.raises(dj.ConnectionLostError, match="lost the connection"):
        s.resume()
    with pytest.raises((EOFError, OSError)):               # the rpyc connection went too
        victim._conn.ping()
    victim.close()


def test_closing_the_rpyc_connection_closes_the_control_channel(server, client):
    victim = dj.connect(server.address)
    s = victim.session(model="tiny-gpt2")
    s.breakpoint(layer=2)
    assert s.generate(PROMPT, max_new_tokens=4).paused
    mine = sessions_on(victim)
    victim._conn.close()                                  # only the rpyc connection goes
    assert wait_for(lambda: sessions_on(client) <= mine - 1)
    with pytest.raises(dj.ConnectionLostError, match="lost the connection"):
        s.resume()
    victim.close()


def test_calls_from_two_threads_share_the_channel(client):
    s, t = client.session(model="tiny-gpt2"), client.session(model="tiny-gpt2")
    reference = s.generate(PROMPT, max_new_tokens=30, stop_at_eos=False).tokens
    results, errors = {}, []

    def long_run():
        try:
            results["long"] = s.generate(PROMPT, max_new_tokens=30, stop_at_eos=False).tokens
        except Exception as exc:       # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=long_run)
    worker.start()
    pings = [client.ping() for _ in range(20)]
    t.breakpoint(layer=1)
    assert t.generate(PROMPT, max_new_tokens=3).paused and t.activation().shape == (1, 64)
    worker.join(timeout=60)
    assert not errors and results["long"] == reference and len(pings) == 20


@pytest.mark.slow
def test_a_timed_out_call_leaves_the_channel_in_step(server):
    c = dj.connect(server.address, timeout=1.0)
    try:
        s = c.session(model="tiny-gpt2")
        with pytest.raises(dj.ConnectionLostError, match="no reply within"):
            s.generate(PROMPT, max_new_tokens=2000, stop_at_eos=False)    # several seconds
        c.control_channel.timeout = None           # the late reply is dropped, not taken for this one's
        info = s.info()
        assert info["id"] == s.id
        assert c.call("hello")["version"] == dj.__version__
    finally:
        c.close()


def test_disabled_by_environment(server, monkeypatch):
    monkeypatch.setenv("DJINN_CONTROL", "0")
    with dj.connect(server.address) as c:
        assert c.control_channel is None
        assert c.session(model="tiny-gpt2").generate(PROMPT, max_new_tokens=2).finished


def test_control_channel_runs_inside_tls(tmp_path, monkeypatch):
    """With --certfile the control socket goes through the same opening as rpyc: TLS, then
    the token; arrays travel through TLS (sendall instead of sendmsg) with the same results."""
    import ssl
    import subprocess
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    monkeypatch.delenv("DJINN_TOKEN", raising=False)
    monkeypatch.delenv("DJINN_TLS", raising=False)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem"), "-days", "2", "-subj", "/CN=djinn-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    cert = str(tmp_path / "cert.pem")
    srv = KernelServer(Kernel("tiny-gpt2", device="cpu"), "127.0.0.1", 0, token="tls-token",
                       certfile=cert, keyfile=str(tmp_path / "key.pem")).start()
    try:
        with dj.connect(srv.address, token="tls-token", tls=cert) as c:
            assert isinstance(c.control_channel, control.ControlChannel)
            assert isinstance(c.control_channel.sock, ssl.SSLSocket)
            assert c.control_channel.sock.version().startswith("TLSv1.")
            monkeypatch.setenv("DJINN_CONTROL", "0")
            with dj.connect(srv.address, token="tls-token", tls=cert) as slow:
                monkeypatch.delenv("DJINN_CONTROL")
                same(scenario(c), scenario(slow))
            good = offer(c)
            with socket.create_connection((srv.host, good["port"]), timeout=10) as sock:
                assert sock.recv(1) == b"\x02"            # TLS first; a clear nonce is refused
                sock.sendall(bytes.fromhex(good["nonce"]))
                got = b""
                try:
                    while (chunk := sock.recv(64)):          # at most a TLS alert, then closed
                        got += chunk
                except OSError:
                    pass
                assert framing.ACK not in got[:1] and len(got) < 64
            assert c.ping() > 0
    finally:
        srv.close()


@pytest.mark.slow
def test_an_interrupt_while_waiting_keeps_the_channel_and_the_sessions(client):
    """Ctrl-C (the notebook's stop button) during a long call: the caller gets
    KeyboardInterrupt, the server finishes that call, its reply is dropped, and the next
    calls work on the same sessions."""
    import _thread
    s = client.session(model="tiny-gpt2")
    reference = s.generate(PROMPT, max_new_tokens=5, stop_at_eos=False).tokens
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            s.generate(PROMPT, max_new_tokens=1500, stop_at_eos=False)     # several seconds
    finally:
        timer.cancel()
    assert not client.control_channel.closed
    assert s.info()["state"] == "finished"          # (waits for that generation to end)
    assert s.generate(PROMPT, max_new_tokens=5, stop_at_eos=False).tokens == reference


# ---- the direct reply (kernel_server.runtime.session_state.reply_route) --------------------------------
def test_resume_is_answered_by_the_generation_thread(server, client, monkeypatch):
    """Over the control channel a resume's reply is sent by the generation thread that
    computed the next pause (no hand-off back to the serving thread); the tokens are those
    of an uninterrupted run, and a pipelined request is answered only after that reply."""
    from kernel_server.transport import control_listener as server_control
    senders = []
    real = server_control.ControlServer._reply

    def spy(conn, reply):
        senders.append(threading.current_thread().name)
        return real(conn, reply)
    monkeypatch.setattr(server_control.ControlServer, "_reply", staticmethod(spy))
    s = client.session(model="tiny-gpt2")
    plain = s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).tokens
    s.breakpoint(layer=2)
    ev = s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False)
    senders.clear()
    while ev.paused:
        ev = s.resume()
    assert ev.tokens == plain
    assert senders and all(n.startswith("djinn-generation") for n in senders), senders
    # a client that sends its next request before the reply: replies stay in order
    ev = s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False)
    assert ev.paused and ev.step == 1
    ch = client.control_channel
    with ch._lock:
        for name, args in (("resume", {"session": s.id}), ("session_info", {"session": s.id})):
            framing.send_frame(ch.sock, *control.ControlChannel.request(name, args))
        first, second = ch._read_reply(), ch._read_reply()
    assert first["ok"]["event"] == "paused" and first["ok"]["step"] == 2
    assert second["ok"]["state"] == "paused"
    assert s.stop().finished


@pytest.mark.parametrize("close_first", [True, False])
def test_closing_a_session_while_its_deferred_resume_runs_leaves_no_paused_worker(kernel,
                                                                                  close_first):
    """The session is closed (its client went) while a deferred resume computes, before or
    after the generation thread reaches the next pause: either way that pause ends and the
    worker is not left waiting."""
    from concurrent.futures import Future
    session = kernel.sessions.open(kernel.models.get("tiny-gpt2"), owner="test")
    session.set_breakpoint(layer=2)
    assert session.generate(PROMPT, max_new_tokens=50, stop_at_eos=False)["event"] == "paused"
    run = session.run
    with session._lock:      # (held: the delivery of the next pause waits for it)
        outcome = session.resume()
        assert isinstance(outcome, Future)          # settled by the generation thread
        if close_first:
            kernel.sessions.close(session.id, "test")
    if close_first:
        with pytest.raises(dj.SessionClosedError):
            outcome.result(timeout=30)
    else:
        assert outcome.result(timeout=30)["event"] == "paused"
        kernel.sessions.close(session.id, "test")
    assert wait_for(run._future.done), "the generation worker is still waiting"
    assert run.stop_reason == "stopped"
