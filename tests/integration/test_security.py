"""Access control and the absence of a code-execution surface, through real connections."""
from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

import djinn_nb as dj
from djinn_protocol import wire
from djinn_protocol.handshake import CHALLENGE_BYTES, answer

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def token_server(kernel):
    from kernel_server.transport.server import KernelServer
    srv = KernelServer(kernel, "127.0.0.1", 0, token=TOKEN).start()
    yield srv
    srv.close()


def test_right_token_works(token_server, monkeypatch):
    monkeypatch.delenv("DJINN_TOKEN", raising=False)
    with dj.connect(token_server.address, token=TOKEN) as c:
        assert c.session(model="tiny-gpt2").generate("hi", max_new_tokens=2).finished
    monkeypatch.setenv("DJINN_TOKEN", TOKEN)
    with dj.connect(token_server.address) as c:       # from $DJINN_TOKEN
        assert c.ping() > 0


def test_no_token_and_wrong_token_are_refused(token_server, monkeypatch):
    monkeypatch.delenv("DJINN_TOKEN", raising=False)
    with pytest.raises(dj.AuthenticationFailedError, match="requires a token"):
        dj.connect(token_server.address)
    with pytest.raises(dj.AuthenticationFailedError, match="refused"):
        dj.connect(token_server.address, token="wrong")
    with dj.connect(token_server.address, token=TOKEN) as c:   # the server is fine
        assert c.ping() > 0


def _raw_handshake(address, reply=None):
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = sock.recv(1)
    challenge = b""
    while len(challenge) < CHALLENGE_BYTES:
        challenge += sock.recv(CHALLENGE_BYTES - len(challenge))
    sock.sendall(reply if reply is not None else answer(TOKEN, challenge))
    verdict = sock.recv(1)
    sock.close()
    return head, challenge, verdict


def test_replayed_handshake_is_refused(token_server):
    head, challenge, verdict = _raw_handshake(token_server.address)
    assert head == b"\x01" and verdict == b"\x01"       # a genuine answer is accepted
    recorded = answer(TOKEN, challenge)
    head, challenge2, verdict = _raw_handshake(token_server.address, reply=recorded)
    assert challenge2 != challenge and verdict != b"\x01"   # the replay fails
    assert TOKEN.encode() not in recorded                    # the token never travels


@pytest.mark.slow
def test_non_loopback_bind_needs_a_token():
    out = subprocess.run([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "DJINN_TOKEN": ""})
    assert out.returncode == 2 and "without a token" in out.stderr


def test_rpyc_escape_routes_fail(client):
    """Only exposed_* methods answer; nothing returned is a live server object."""
    root = client._conn.root
    from rpyc.core.netref import BaseNetref
    for name in ["conn", "_on_close", "_bulk_if_large", "__dict__", "on_connect", "_conn",
                 "on_disconnect", "hello"]:
        with pytest.raises(AttributeError, match="cannot access"):
            getattr(root, name)                             # refused by rpyc itself
    with pytest.raises(AttributeError):
        root.exposed_hello                                  # the one exposed method is call
    # __class__ is the proxy's own local class, not a way into the server's classes
    assert not isinstance(root.__class__, BaseNetref) and type(root.__class__) is type
    for name in ["__self__", "__func__", "__globals__", "__code__", "__closure__"]:
        with pytest.raises(AttributeError):
            getattr(root.call, name)
    with pytest.raises(Exception):
        client._conn.modules                                # the classic namespace is absent
    with pytest.raises(Exception):
        client._conn.eval("1+1")
    with pytest.raises(Exception):
        client._conn.builtins
    reply = root.call("hello", wire.pack({}))
    assert type(reply) is tuple and type(reply[0]) is str   # plain values, not netrefs
    assert all(type(b) is bytes for b in reply[1])
    assert client.session(model="tiny-gpt2").layers == 8    # still serving


# ---- TLS (--certfile / --keyfile) ----------------------------------------------------------
@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made now with the openssl command."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=djinn-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.fixture(scope="module")
def tls_server(cert):
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    # its own Kernel: bulk transfers take the TLS context of the server that owns the kernel
    srv = KernelServer(Kernel("tiny-gpt2", device="cpu"), "127.0.0.1", 0, token=TOKEN,
                       certfile=cert[0], keyfile=cert[1]).start()
    yield srv
    srv.close()


class Recorder:
    """A loopback TCP relay that keeps every byte the client sends."""

    def __init__(self, target: str):
        import threading
        host, port = target.split(":")
        self.target = (host, int(port))
        self.sent = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(a, b, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()

    def _pump(self, src, dst, record):
        try:
            while data := src.recv(1 << 16):
                if record:
                    self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_tls_end_to_end_with_checkpoints_over_bulk(tls_server, cert, tmp_path, monkeypatch):
    monkeypatch.delenv("DJINN_TOKEN", raising=False)
    monkeypatch.delenv("DJINN_TLS", raising=False)
    with dj.connect(tls_server.address, token=TOKEN, tls=cert[0]) as c:
        assert c._conn._channel.stream.sock.version().startswith("TLSv1.")
        if c.control_channel is not None:                           # the control channel too
            assert c.control_channel.sock.version().startswith("TLSv1.")
        s = c.session()
        reference = s.generate("The capital of France is", max_new_tokens=6,
                               stop_at_eos=False).tokens
        s.breakpoint(layer=3, steps=[2])
        assert s.generate("The capital of France is", max_new_tokens=6, stop_at_eos=False).paused
        assert s.activation().shape == (1, 64)
        path = s.checkpoint().wait().save(tmp_path / "over-tls.djckpt")   # bulk fetch, in TLS
        assert c.stats()["bulk_bytes_received"] >= path.stat().st_size > 0
        assert s.resume().tokens == reference
        loaded = c.load_checkpoint(path)                                   # bulk upload, in TLS
        assert loaded.session.resume().paused                              # its breakpoint
        assert loaded.session.resume().tokens == reference
    monkeypatch.setenv("DJINN_TLS", cert[0])                 # the same from $DJINN_TLS
    with dj.connect(tls_server.address, token=TOKEN) as c:
        assert c.ping() > 0


def test_tls_really_encrypts(tls_server, server, cert, monkeypatch):
    """Through a recording relay (rpyc only): the prompt is on the wire in the clear
    without TLS, and nowhere with it."""
    monkeypatch.setenv("DJINN_CONTROL", "0")     # every call on the relayed rpyc connection
    secret = "zanzibar-xylophone-quokka"
    for target, kwargs, visible in [(server.address, {}, True),
                                    (tls_server.address, {"token": TOKEN, "tls": cert[0]}, False)]:
        relay = Recorder(target)
        try:
            with dj.connect(relay.address, **kwargs) as c:
                c.session().generate(secret, max_new_tokens=2)
            assert (secret.encode() in relay.sent) is visible
        finally:
            relay.close()


def test_tls_mismatches_are_clear_errors(tls_server, server, cert, monkeypatch):
    from djinn_nb.errors import TLSError
    monkeypatch.delenv("DJINN_TLS", raising=False)
    with pytest.raises(TLSError, match="requires TLS"):       # plaintext client, TLS server
        dj.connect(tls_server.address, token=TOKEN)
    with pytest.raises(TLSError, match="does not use TLS"):   # TLS client, plaintext server
        dj.connect(server.address, tls=cert[0])
    with pytest.raises(TLSError, match="does not verify"):    # self-signed, not trusted
        dj.connect(tls_server.address, token=TOKEN, tls=True)
    with pytest.raises(dj.AuthenticationFailedError, match="refused"):   # TLS, wrong token
        dj.connect(tls_server.address, token="wrong", tls=cert[0])
    with dj.connect(tls_server.address, token=TOKEN, tls=cert[0]) as c:  # still serving
        assert c.session().layers == 8


@pytest.mark.slow
def test_cli_serves_tls(cert, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--port", "0", "--certfile", cert[0], "--keyfile", cert[1],
                             "--token-file", str(token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("DJINN_SERVER_READY"), line
        with dj.connect(line.split()[1], token=TOKEN, tls=cert[0]) as c:
            assert len(c.session().generate("hi", max_new_tokens=3, stop_at_eos=False).tokens) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                          "--port", "0", "--certfile", str(tmp_path / "missing.pem")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot load the TLS certificate" in bad.stderr


# ---- request size (--max-request-mb) -------------------------------------------------------
def test_a_huge_argument_is_a_typed_error_and_nothing_is_sent(client):
    s = client.session(model="tiny-gpt2")
    reference = s.generate("The capital of France is", max_new_tokens=5, stop_at_eos=False).tokens
    huge = np.zeros((200 * 2**20 // (64 * 4), 64), dtype=np.float32)          # 200 MiB
    sent = client.stats()["bytes_sent"]
    with pytest.raises(dj.LimitExceededError, match="--max-request-mb"):
        s.steer(layer=1, add=huge, positions=list(range(huge.shape[0])))
    assert client.stats()["bytes_sent"] - sent < 1 << 20
    assert s.generate("The capital of France is", max_new_tokens=5,
                      stop_at_eos=False).tokens == reference


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _closed_by_server(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.slow
def test_oversized_frames_close_only_that_connection(monkeypatch):
    """Raw rpyc frames past the client's own check: a header announcing 200 MiB, and a
    small compressed frame that inflates to 200 MiB. The server drops those connections
    without allocating the request; another client goes on as before."""
    import struct
    import zlib
    monkeypatch.setenv("DJINN_CONTROL", "0")
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--port", "0", "--max-request-mb", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = proc.stdout.readline().split()[1]
        host, port = address.split(":")
        with dj.connect(address) as other:
            s = other.session()
            s.breakpoint(layer=2, steps=[1])
            assert s.generate("The capital of France is", max_new_tokens=5,
                              stop_at_eos=False).paused
            s.edit(set=np.ones((1, 64), dtype=np.float32))    # a legitimate request still fits
            peak = _peak_rss(proc.pid)
            big = 200 << 20
            frames = [struct.pack("!LB", big, 0) + b"\0" * (1 << 20),        # announced size
                      (lambda z: struct.pack("!LB", len(z), 1) + z + b"\n")(
                          zlib.compress(b"\0" * big, 1))]                     # inflated size
            for frame in frames:
                raw = socket.create_connection((host, int(port)), timeout=60)
                assert raw.recv(1) == b"\x00"              # the opening: no token on loopback
                try:
                    raw.sendall(frame)
                except OSError:
                    pass                                    # already cut off while sending
                assert _closed_by_server(raw)
                raw.close()
            assert _peak_rss(proc.pid) - peak < 64 << 20    # the 200 MiB never existed there
            assert other.ping() > 0                         # the other client is unaffected
            assert s.resume().finished
            rows = (9 << 20) // 256                         # 9 MiB of float32 [rows, 64]
            with pytest.raises(dj.LimitExceededError, match="over the server's limit of 8 MiB"):
                s.steer(layer=1, add=np.zeros((rows, 64), dtype=np.float32),
                        positions=list(range(rows)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_new_calls_refuse_bad_input_with_typed_errors(client):
    """hello(owner_key), reattach, attach, closing: wrong types and values are typed errors
    (never ServerError), and the connection keeps working."""
    bad = [None, 5, 1.5, "", "x" * 300, ["a"], {"a": 1}, np.zeros(3)]
    for value in bad:
        for call, key in [("hello", "owner_key"), ("reattach", "owner"), ("attach", "session")]:
            if call == "hello" and value is None:
                continue                                   # (None: no owner key, valid)
            try:
                out = client.call(call, **{key: value})
            except dj.ServerError as exc:
                raise AssertionError(f"{call}({key}={value!r:.40}) -> ServerError: {exc}")
            except dj.DjinnError:
                continue
            assert call == "reattach" and out == {"sessions": [], "checkpoints": []}, (call, out)
    with pytest.raises(dj.InvalidArgumentError):
        client.call("closing", bogus=1)
    assert client.session(model="tiny-gpt2").generate("hi", max_new_tokens=2).finished
