"""Clients and servers that die: sessions are released, others never stall, and a client
gets a clear error in bounded time and can reconnect to a restarted server."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import djinn_nb as dj

PROMPT = "The capital of France is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int = 0):
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--port", str(port), "--operator-stats"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith("DJINN_SERVER_READY"), line
    return proc, line.split()[1]


#: a hang guard, never a timing expectation: every wait below polls for a state and
#: returns as soon as it holds; the deadline only stops a test that would hang
HANG_GUARD = 120.0


def wait_for(predicate, timeout=HANG_GUARD):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_killed_client_releases_its_paused_sessions():
    proc, address = start_server()
    try:
        with dj.connect(address) as watcher:
            reference = watcher.session().generate(PROMPT, max_new_tokens=8,
                                                   stop_at_eos=False).tokens
            script = textwrap.dedent(f"""
                import djinn_nb as dj, time
                c = dj.connect({address!r})
                for _ in range(3):
                    s = c.session()
                    s.breakpoint(layer=4)
                    assert s.generate({PROMPT!r}, max_new_tokens=8).paused
                print("PAUSED", flush=True)
                time.sleep(600)
            """)
            victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                      text=True)
            assert victim.stdout.readline().strip() == "PAUSED"
            # (--operator-stats: hello() also tells the server-wide figures)
            sessions = lambda: watcher.call("hello")["server"]["sessions"]
            assert sessions() == 4
            # another client keeps generating while the victim's sessions sit paused
            assert watcher.session().generate(PROMPT, max_new_tokens=8,
                                              stop_at_eos=False).tokens == reference
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            assert wait_for(lambda: sessions() == 2), sessions()   # the victim's 3 are gone
            assert watcher.session().generate(PROMPT, max_new_tokens=8,
                                              stop_at_eos=False).tokens == reference
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_killed_server_gives_a_clear_error_then_reconnect_and_continue(tmp_path):
    port = free_port()
    proc, address = start_server(port)
    path = tmp_path / "kept.djckpt"
    client = dj.connect(address)
    try:
        s = client.session()
        s.breakpoint(layer=3, steps=[5])
        assert s.generate(PROMPT, max_new_tokens=20, stop_at_eos=False).paused
        s.checkpoint().save(path)
        original = s.resume()
        s.clear_breakpoints()
        outcome = {}

        def long_generation():
            try:
                s.generate(PROMPT, max_new_tokens=2000, stop_at_eos=False)
                outcome["error"] = None
            except dj.DjinnError as exc:
                outcome["error"] = exc

        # the server dies while the client waits for the reply: kill it as soon as the
        # request is on the socket (2000 tokens take seconds; the kill follows within
        # milliseconds), whatever the machine's speed
        sent = client.stats(memory=False)["bytes_sent"]
        worker = threading.Thread(target=long_generation)
        worker.start()
        assert wait_for(lambda: client.stats(memory=False)["bytes_sent"] > sent, timeout=HANG_GUARD)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG_GUARD)
        worker.join(timeout=HANG_GUARD)
        assert not worker.is_alive(), "the client hung on a dead server"
        assert isinstance(outcome["error"], dj.ConnectionLostError), outcome
        assert "lost the connection" in str(outcome["error"])
        with pytest.raises(dj.ConnectionLostError):
            s.generate(PROMPT, max_new_tokens=2)
        proc, address2 = start_server(port)
        assert address2 == address
        client.reconnect()
        loaded = client.load_checkpoint(path)
        assert loaded.session.resume().paused                       # its breakpoint, step 5
        assert loaded.session.resume().tokens == original.tokens
    finally:
        client.close()
        proc.kill()
        proc.wait(timeout=30)


def test_pause_timeout_stops_the_generation_and_says_why():
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    from kernel_server.model.validation import Limits
    kernel = Kernel("tiny-gpt2", device="cpu", limits=Limits(pause_timeout_s=0.5))
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    try:
        with dj.connect(srv.address) as c:
            s = c.session()
            reference = s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).tokens
            s.breakpoint(layer=2, steps=[3])
            assert s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).paused
            assert wait_for(lambda: s.state == "finished")
            with pytest.raises(dj.NotPausedError, match="pause timeout"):
                s.activation()
            s.clear_breakpoints()
            assert s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).tokens == reference
            s.breakpoint(layer=2, steps=[3])
            assert s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).paused
            assert wait_for(lambda: s.state == "finished")      # the server stopped it
            with pytest.raises(dj.NotPausedError, match="pause timeout"):
                s.resume()              # resuming too late: told how it ended
    finally:
        srv.close()


def test_sigterm_stops_the_server_cleanly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    address = proc.stdout.readline().split()[1]
    client = dj.connect(address)
    s = client.session()
    s.breakpoint(layer=2, steps=[2])
    assert s.generate(PROMPT, max_new_tokens=5, stop_at_eos=False).paused
    path = s.checkpoint().save(tmp_path / "before-stop.djckpt")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "released 1 sessions" in proc.stderr.read()
    with pytest.raises(dj.ConnectionLostError):
        s.resume()
    client.close()
    proc2, address2 = start_server()
    try:
        with dj.connect(address2) as c:               # the file written before the stop loads
            assert c.load_checkpoint(path).session.state == "ready"
    finally:
        proc2.kill()
        proc2.wait(timeout=30)


# ---- re-attaching after a disconnect (--reconnect-grace-s) ---------------------------------
def cut(client) -> None:
    """The network goes: the client's sockets die under it, nobody closes anything politely."""
    for sock in [client._conn._channel.stream.sock,
                 getattr(client.control_channel, "sock", None)]:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def grace_server():
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    from kernel_server.model.validation import Limits
    srv = KernelServer(Kernel("tiny-gpt2", device="cpu", limits=Limits(reconnect_grace_s=600)),
                       "127.0.0.1", 0).start()
    yield srv
    srv.close()


def test_reconnect_reattaches_paused_sessions_and_checkpoints(grace_server):
    owners = grace_server.kernel.owners
    with dj.connect(grace_server.address) as a, dj.connect(grace_server.address) as b:
        s = a.session()
        reference = s.generate(PROMPT, max_new_tokens=8, stop_at_eos=False).tokens
        s.breakpoint(layer=2, steps=[3])
        assert s.generate(PROMPT, max_new_tokens=8, stop_at_eos=False).paused
        ck = s.checkpoint().wait()
        other = a.session()                              # an idle one comes back too
        old_owner = a._owner
        cut(a)
        assert wait_for(lambda: old_owner in owners._orphans)   # the server saw it go
        with pytest.raises(dj.ConnectionLostError):
            s.activation()
        # another client (no token here: its own random owner key) gets nothing of it
        with pytest.raises(dj.UnknownSessionError):
            b.attach(s.id)
        assert b.call("reattach", owner=old_owner) == {"sessions": [], "checkpoints": []}
        for call in ("session_info", "activation", "resume", "close_session"):
            with pytest.raises(dj.UnknownSessionError):
                b.call(call, session=s.id)
        for session in (s.id, b.session().id):         # (the checkpoint is looked up first)
            with pytest.raises(dj.CheckpointError, match="no checkpoint"):
                b.call("restore", session=session, checkpoint=ck.id)
        # the client itself takes everything back; the same objects keep working
        got = a.reconnect()
        assert sorted(got["sessions"]) == sorted([s.id, other.id]) and got["checkpoints"] == [ck.id]
        assert s.state == "paused" and s.activation().shape == (1, 64)
        assert s.resume().tokens == reference
        s.restore(ck)
        assert s.resume().paused and s.resume().tokens == reference
        assert other.generate(PROMPT, max_new_tokens=8, stop_at_eos=False).tokens == reference
        assert [c["id"] for c in a.checkpoints()] == [ck.id]


def test_grace_period_over_releases_everything():
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    from kernel_server.model.validation import Limits
    kernel = Kernel("tiny-gpt2", device="cpu", limits=Limits(reconnect_grace_s=0.5))
    kernel.operator_stats = True                # hello() tells the server-wide figures
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    try:
        with dj.connect(srv.address) as watcher, dj.connect(srv.address) as a:
            s = a.session()
            s.breakpoint(layer=2)
            assert s.generate(PROMPT, max_new_tokens=4).paused
            s.checkpoint().wait()
            cut(a)
            info = lambda: watcher.call("hello")["server"]
            assert wait_for(lambda: info()["sessions"] == 0 and info()["checkpoint_bytes"] == 0)
            assert a.reconnect() == {"sessions": [], "checkpoints": []}
            with pytest.raises(dj.UnknownSessionError):
                s.activation()
    finally:
        srv.close()


def test_without_grace_reconnect_finds_nothing(client):
    s = client.session(model="tiny-gpt2")
    assert client.reconnect() == {"sessions": [], "checkpoints": []}
    with pytest.raises(dj.UnknownSessionError):
        s.info()


def test_attach_from_another_process_needs_the_same_token_and_owner_key(tmp_path):
    """A notebook kernel dies with paused sessions; a new process with the same token takes
    them over by id. An owner key narrows who may: only a client that knows it."""
    token = "grace-token-for-tests"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--port", "0", "--token-file", str(token_file),
                             "--reconnect-grace-s", "600", "--operator-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = proc.stdout.readline().split()[1]
        with dj.connect(address, token=token) as watcher:
            reference = watcher.session().generate(PROMPT, max_new_tokens=8,
                                                   stop_at_eos=False).tokens
            script = textwrap.dedent(f"""
                import djinn_nb as dj, time
                ids = []
                for key in (None, "alice-owner-key-0123456789"):
                    c = dj.connect({address!r}, token={token!r}, owner_key=key)
                    s = c.session()
                    s.breakpoint(layer=4, steps=[2])
                    assert s.generate({PROMPT!r}, max_new_tokens=8, stop_at_eos=False).paused
                    ids += [s.id, s.checkpoint().wait().id]
                print(*ids, flush=True)
                time.sleep(600)
            """)
            victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                      text=True)
            plain_sid, plain_ck, alice_sid, alice_ck = victim.stdout.readline().split()
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            # (--operator-stats: hello() also tells the server-wide figures)
            sessions = lambda: watcher.call("hello")["server"]["sessions"]
            assert sessions() == 3                        # kept: the grace period runs
            with dj.connect(address, token=token, owner_key="bob-owner-key-0123456789") as bob:
                for sid in (plain_sid, alice_sid):
                    with pytest.raises(dj.UnknownSessionError):
                        bob.attach(sid)
            with dj.connect(address, token=token) as c:
                with pytest.raises(dj.UnknownSessionError):
                    c.attach(alice_sid)                   # alice's needs alice's key
                s = c.attach(plain_sid)
                assert s.info()["state"] == "paused"
                assert [ck["id"] for ck in c.checkpoints()] == [plain_ck]
                assert s.resume().tokens == reference
                with pytest.raises(dj.UnknownSessionError):
                    watcher.attach(plain_sid)              # attached: no longer up for grabs
            with dj.connect(address, token=token, owner_key="alice-owner-key-0123456789") as c:
                s = c.attach(alice_sid)
                assert [ck["id"] for ck in c.checkpoints()] == [alice_ck]
                assert s.resume().tokens == reference
            assert wait_for(lambda: sessions() == 1)      # only the watcher's remains
    finally:
        proc.kill()
        proc.wait(timeout=30)
