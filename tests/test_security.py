"""Access control and the absence of a code-execution surface, through real connections."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

import djinn_nb as dj
from djinn_nb.auth import CHALLENGE_BYTES, answer

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def token_server(kernel):
    from kernel_server.server import KernelServer
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


def test_non_loopback_bind_needs_a_token():
    out = subprocess.run([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "DJINN_TOKEN": ""})
    assert out.returncode == 2 and "without a token" in out.stderr


def test_rpyc_escape_routes_fail(client):
    """Only exposed_* methods answer; nothing returned is a live server object."""
    root = client._conn.root
    from rpyc.core.netref import BaseNetref
    for name in ["kernel", "owner", "_session_call", "__dict__", "on_connect", "_conn",
                 "on_disconnect", "_uploads"]:
        with pytest.raises(AttributeError, match="cannot access"):
            getattr(root, name)                             # refused by rpyc itself
    # __class__ is the proxy's own local class, not a way into the server's classes
    assert not isinstance(root.__class__, BaseNetref) and type(root.__class__) is type
    for name in ["__self__", "__func__", "__globals__", "__code__", "__closure__"]:
        with pytest.raises(AttributeError):
            getattr(root.hello, name)
    with pytest.raises(Exception):
        client._conn.modules                                # the classic namespace is absent
    with pytest.raises(Exception):
        client._conn.eval("1+1")
    with pytest.raises(Exception):
        client._conn.builtins
    reply = root.hello(dj.wire.pack({}))
    assert type(reply) is tuple and type(reply[0]) is str   # plain values, not netrefs
    assert all(type(b) is bytes for b in reply[1])
    assert client.session(model="tiny-gpt2").layers == 8    # still serving
