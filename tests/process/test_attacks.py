"""Attacks on a real kernel server subprocess (issue 17), one test per defect, each against a
server started under resource caps (open files, address space) so that a regression ends in
a failed test, never in a machine out of memory or descriptors. Loopback only.

Model: tiny-gpt2 (random-init GPT-2, 2048 positions), float32, CPU, eager decode.
"""
from __future__ import annotations

import http.server
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

import psutil
import pytest

import djinn_nb as dj
from djinn_protocol import framing
from djinn_protocol.framing import LENGTH

TOKEN = "attack-test-token-0123456789"
PROMPT = "The capital of France is"
HANG_GUARD = 120.0
MiB = 1 << 20


def _caps(nofile: int, address_space: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    return apply


def start_server(*args, host="127.0.0.1", nofile=512, address_space=8 << 30, env=None):
    """A ``python -m kernel_server`` subprocess on tiny-gpt2 under the given caps; its
    (process, address)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2", "--device", "cpu",
         "--host", host, "--port", "0", "--log-level", "WARNING", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        preexec_fn=_caps(nofile, address_space))
    line = proc.stdout.readline()
    if not line.startswith("DJINN_SERVER_READY"):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, line.split()[1]


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def wait_for(cond, deadline: float = HANG_GUARD) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def host_port(address: str):
    from djinn_nb.client import parse_address
    return parse_address(address)


class FakeHub(http.server.ThreadingHTTPServer):
    """An HTTP server standing in for the Hugging Face Hub: it counts every request."""

    def __init__(self):
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append(self.path)
                self.send_response(404)
                self.end_headers()
            do_HEAD = do_GET

            def log_message(self, *a):
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def hub():
    h = FakeHub()
    yield h
    h.shutdown()


@pytest.fixture(scope="module")
def target(hub):
    """The server most attacks run against: token, caps on sessions per client, and an
    environment that would let it reach a hub (no HF_HUB_OFFLINE; a fake endpoint)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{hub.server_address[1]}"
    proc, address = start_server("--max-sessions-per-client", "3", "--checkpoint-budget-mb", "64",
                                 env={**env, "DJINN_TOKEN": TOKEN})
    yield proc, address
    stop(proc)


@pytest.fixture
def client(target):
    c = dj.connect(target[1], token=TOKEN)
    yield c
    c.close()


# ---- 1: connection floods ------------------------------------------------------------------
def test_a_flood_past_the_open_files_limit_does_not_stop_the_server():
    """Defect 1: at the open-files limit accept() fails (EMFILE); the server must keep going."""
    proc, address = start_server("--max-unauthenticated", "4096", "--max-connections", "4096",
                                 nofile=128)
    host, port = host_port(address)
    flood = []
    try:
        for _ in range(300):               # far past the server's 128 descriptors
            try:
                flood.append(socket.create_connection((host, port), timeout=5))
            except OSError:
                break
        time.sleep(1.0)                    # (the server meets EMFILE in its accept loop)
        assert proc.poll() is None, "the server exited under the flood"
        for s in flood:
            s.close()
        flood.clear()
        with dj.connect(address) as c:     # the flood gone, a client is served as before
            out = c.session().generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
            assert len(out.tokens) == 4
        assert proc.poll() is None
    finally:
        for s in flood:
            s.close()
        stop(proc)


def test_unauthenticated_connections_are_capped_and_a_client_still_gets_in(target):
    """Defect 1: no cap, no deadline before authentication. 300 silent connections: the
    server holds at most --max-unauthenticated of them, and a real client still connects."""
    proc, address = target
    host, port = host_port(address)
    fds_before = psutil.Process(proc.pid).num_fds()
    flood = [socket.create_connection((host, port), timeout=5) for _ in range(300)]
    try:
        time.sleep(1.0)
        assert psutil.Process(proc.pid).num_fds() <= fds_before + 64 + 8
        with dj.connect(address, token=TOKEN) as c:
            assert len(c.session().generate(PROMPT, max_new_tokens=2).tokens) >= 1
    finally:
        for s in flood:
            s.close()


def test_a_slow_handshake_is_cut_at_the_deadline():
    """Defect 1: a client that drips its handshake answer is closed after the deadline."""
    proc, address = start_server("--handshake-timeout-s", "2", env={**os.environ, "DJINN_TOKEN": TOKEN})
    try:
        sock = socket.create_connection(host_port(address), timeout=30)
        sock.recv(64)                                  # the challenge
        t0 = time.monotonic()
        closed = False
        for _ in range(40):                            # one byte a second, never all 32
            try:
                sock.sendall(b"x")
                sock.settimeout(1.0)
                if sock.recv(1) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        assert closed and time.monotonic() - t0 < 20
    finally:
        stop(proc)


# ---- 2: admission before allocation ---------------------------------------------------------
def test_a_model_too_big_is_refused_before_anything_is_built(target, client):
    proc, _ = target
    before = rss(proc)
    with pytest.raises(dj.LimitExceededError, match="GiB"):
        client.session(model="random:llama-70b")
    assert rss(proc) - before < 256 * MiB
    assert client.session().generate(PROMPT, max_new_tokens=2).tokens


# ---- 3 + 8: crafted checkpoint files ---------------------------------------------------------
def _file(client, max_new_tokens=6):
    s = client.session()
    s.breakpoint(layer=4)
    assert s.generate(PROMPT, max_new_tokens=max_new_tokens, temperature=0.7, seed=1).paused
    s.resume()
    ck = s.checkpoint().wait()
    data = bytes(client.fetch_bulk(client.call("export_checkpoint", checkpoint=ck.id)))
    s.close()
    return data


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    return _join_raw(json.dumps(header).encode(), body)


def _join_raw(raw: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + body


def _reseal(header, body: bytes, edit_meta=None) -> bytes:
    """Edit the djinn metadata and recompute the (keyless) hash, as a forger would."""
    import safetensors.torch
    from kernel_server.checkpoints.file_format import content_digest
    meta = json.loads(header["__metadata__"]["djinn"])
    if edit_meta:
        edit_meta(meta)
    tensors = safetensors.torch.load(_join(header, body))
    meta_json = json.dumps(meta, sort_keys=True)
    return safetensors.torch.save(tensors, metadata={"djinn": meta_json,
                                                     "sha256": content_digest(meta_json, tensors)})


def _retensor(data: bytes, change) -> bytes:
    import safetensors.torch
    from kernel_server.checkpoints.file_format import content_digest
    header, body = _split(data)
    tensors = dict(safetensors.torch.load(data))
    change(tensors)
    meta_json = header["__metadata__"]["djinn"]
    return safetensors.torch.save(tensors, metadata={"djinn": meta_json,
                                                     "sha256": content_digest(meta_json, tensors)})


def _load(client, tmp_path, data: bytes):
    path = tmp_path / "ck.safetensors"
    path.write_bytes(data)
    return client.load_checkpoint(path)


def test_a_forged_checkpoint_cannot_run_past_the_context(client, tmp_path):
    """Defect 3: max_new_tokens raised in a file (hash recomputed) past tiny-gpt2's 2048."""
    data = _file(client)
    header, body = _split(data)
    forged = _reseal(header, body, lambda m: m["config"].update(max_new_tokens=4000))
    with pytest.raises(dj.CheckpointError, match="context"):
        _load(client, tmp_path, forged)
    assert client.session().generate(PROMPT, max_new_tokens=2).tokens


def test_crafted_checkpoint_files_get_checkpoint_errors(client, tmp_path):
    """Defect 8: each crafted file is a CheckpointError, and the server stays usable."""
    data = _file(client)
    header, body = _split(data)
    deep = "[" * 50_000 + "]" * 50_000
    crafted = {
        "header is a JSON list": _join([header], body),
        "__metadata__ is a list": _join({**header, "__metadata__": [1]}, body),
        "header nested 50,000 deep": _join_raw(
            json.dumps({**header, "x": 0}).encode().replace(b'"x": 0', b'"x": ' + deep.encode()),
            body),
        "metadata nested 50,000 deep": _join({**header, "__metadata__": {
            **header["__metadata__"], "djinn": deep}}, body),
        "rng_state of the wrong size": _retensor(data, lambda t: t.update(
            rng_state=t["rng_state"][: t["rng_state"].numel() // 2].clone())),
        "KV with half the head_dim": _retensor(data, lambda t: t.update(
            {k: v[..., : v.shape[-1] // 2].clone() for k, v in t.items() if k.startswith("kv.")})),
        "KV with half the heads": _retensor(data, lambda t: t.update(
            {k: v[:, : v.shape[1] // 2].clone() for k, v in t.items() if k.startswith("kv.")})),
        "metadata that is not a string": _join({**header, "__metadata__": {
            **header["__metadata__"], "djinn": {"a": 1}}}, body),
    }
    for what, blob in crafted.items():
        with pytest.raises(dj.CheckpointError):
            _load(client, tmp_path, blob)
        assert client.call("hello")["sessions"] == 0, what     # nothing left behind
        s = client.session()
        assert s.generate(PROMPT, max_new_tokens=1).tokens, what
        s.close()


# ---- 4, 5, 6, 11: bulk and frames ------------------------------------------------------------
def test_announced_upload_sizes_are_not_allocated_before_the_bytes(target, client):
    """Defect 4: an upload's length header alone must not make the server allocate it."""
    proc, address = target
    host, _ = host_port(address)
    before = rss(proc)
    socks = []
    for _ in range(4):
        up = client.call("begin_upload", nbytes=48 * MiB)
        s = socket.create_connection((host, up["port"]), timeout=10)
        s.sendall(bytes.fromhex(up["nonce"]) + LENGTH.pack(48 * MiB))
        socks.append(s)
    time.sleep(1.0)
    try:
        assert rss(proc) - before < 48 * MiB          # four headers announced 192 MiB
    finally:
        for s in socks:
            s.close()


def test_header_only_control_frames_pin_no_memory(target):
    """Defect 4: the control reader must not allocate a frame's announced meta length."""
    proc, address = target
    victims = [dj.connect(address, token=TOKEN) for _ in range(6)]
    before = rss(proc)
    try:
        for v in victims:
            v.control_channel.sock.sendall(framing.HEADER.pack(60 * MiB, 0))
        time.sleep(1.0)
        assert rss(proc) - before < 64 * MiB          # six headers announced 360 MiB
    finally:
        for v in victims:
            v.close()


def test_bulk_offers_are_capped_per_client(client):
    """Defect 5: unfetched exports hold a socket, a thread and a copy each: at most 4."""
    s = client.session()
    s.generate(PROMPT, max_new_tokens=2)
    ck = s.checkpoint().wait()
    offers = [client.call("export_checkpoint", checkpoint=ck.id) for _ in range(4)]
    with pytest.raises(dj.LimitExceededError, match="max-offers-per-client"):
        client.call("export_checkpoint", checkpoint=ck.id)
    for offer in offers:                               # fetching frees the slots
        assert len(client.fetch_bulk(offer)) == offer["nbytes"]
    assert client.call("export_checkpoint", checkpoint=ck.id)["nbytes"] > 0


def test_a_silent_stranger_does_not_block_a_bulk_transfer(client):
    """Defect 6: an idle connection on the transfer's port must not stall the real client."""
    s = client.session()
    s.generate(PROMPT, max_new_tokens=2)
    ck = s.checkpoint().wait()
    offer = client.call("export_checkpoint", checkpoint=ck.id)
    host, _ = host_port(client.address)
    strangers = [socket.create_connection((host, offer["port"]), timeout=10) for _ in range(3)]
    try:
        t0 = time.monotonic()
        data = client.fetch_bulk(offer)
        assert len(data) == offer["nbytes"] and time.monotonic() - t0 < 9.0   # < NONCE_TIMEOUT
    finally:
        for st in strangers:
            st.close()


def test_a_cut_off_transfer_spends_its_nonce(client):
    """Defect 11: after a cut-off, the same nonce must not serve the payload again. The
    payload (a checkpoint of 1,800 prompt positions, ~7 MiB of KV) is larger than what the
    server's send buffer (4 MiB at most here) and our tiny receive window hold, so the server
    is still sending when we hang up: a real cut-off, not a transfer finished in buffers."""
    s = client.session()
    s.generate(list(range(100, 1900)), max_new_tokens=1, stop_at_eos=False)   # one prefill
    ck = s.checkpoint().wait()
    offer = client.call("export_checkpoint", checkpoint=ck.id)
    assert offer["nbytes"] > 6 * MiB
    host, _ = host_port(client.address)
    with socket.socket(socket.AF_INET) as cut:
        cut.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        cut.settimeout(10)
        cut.connect((host, offer["port"]))
        cut.sendall(bytes.fromhex(offer["nonce"]))
        assert len(cut.recv(100)) > 0                 # the payload started, then we hang up
    with pytest.raises((dj.ConnectionLostError, OSError)):
        client.fetch_bulk(offer)


# ---- 7: no network ---------------------------------------------------------------------------
def test_model_ids_never_reach_the_network(client, hub):
    """Defect 7: the server runs without HF_HUB_OFFLINE and with a (fake) hub endpoint."""
    hub.requests.clear()
    for name in ("someorg/some-model", "gpt2", "openai-community/gpt2-xl"):
        with pytest.raises(dj.UnknownModelError):
            client.session(model=name)
    assert hub.requests == []


# ---- 10: one answer for every unloadable path ------------------------------------------------
def test_missing_and_non_model_paths_get_the_same_answer(client, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "config.json").write_text("{}")
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps(
        {"model_type": "mystery", "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    answers = {}
    for path in (str(tmp_path / "missing"), str(empty), str(blank), str(custom), "/etc"):
        with pytest.raises(dj.UnknownModelError) as err:
            client.session(model=path)
        answers[path] = str(err.value).replace(repr(path), "NAME")
    assert len(set(answers.values())) == 1, answers


# ---- 9 + 13: caps and least disclosure -------------------------------------------------------
def test_breakpoints_rules_and_logits_are_capped(client):
    """Defect 9: 32 breakpoints x 100k steps cost 235 MiB; caps bound every session."""
    import numpy as np
    s = client.session()
    with pytest.raises(dj.LimitExceededError, match="max-steps-listed"):
        for layer in range(8):
            s.breakpoint(layer=layer, steps=list(range(1, 50_001)))
    s.clear_breakpoints()
    with pytest.raises(dj.LimitExceededError, match="max-breakpoints"):
        for layer in range(8):
            for phase in ("prefill", "decode", "both"):
                for k in range(4):
                    s.breakpoint(layer=layer, phase=phase, steps=[k + 1])
    with pytest.raises(dj.LimitExceededError, match="max-rules"):
        for _ in range(65):
            s.steer(layer=1, add=np.ones(64, dtype=np.float32), alpha=0.0)
    s.clear_breakpoints()
    s.clear_steering()
    with pytest.raises(dj.LimitExceededError, match="max-logits-mb"):
        s.generate(PROMPT, max_new_tokens=4096, return_logits=True)
    assert s.generate(PROMPT, max_new_tokens=2, return_logits=True).tokens


def test_hello_shows_only_the_callers_own(target, client, tmp_path):
    """Defect 13: hello() told any client server-wide counts and others' model paths."""
    other = dj.connect(target[1], token=TOKEN, owner_key="another-owner-key-0123456789")
    try:
        other.session(model="random:tiny-llama")
        info = client.call("hello")
        assert "random:tiny-llama" not in info["loaded_models"]
        assert info["sessions"] == 0
        assert "server" not in info
    finally:
        other.close()


def test_sessions_are_capped_per_principal_not_per_connection(target):
    """Defect 13: one principal with many connections could fill every slot."""
    key = "one-principal-owner-key-0123456789"
    conns = [dj.connect(target[1], token=TOKEN, owner_key=key) for _ in range(3)]
    try:
        conns[0].session()
        conns[1].session()
        conns[2].session()
        with pytest.raises(dj.LimitExceededError, match="max-sessions-per-client"):
            conns[1].session()
    finally:
        for c in conns:
            c.close()


def test_fresh_owner_keys_do_not_dodge_the_caps():
    """A principal is the token plus the client's own owner key: a fresh key per connection,
    or per hello() on one connection, made a fresh principal with fresh caps. Caps count per
    connection, per principal and per peer (host + credentials, whatever owner keys), and a
    connection that goes releases its share (its unfetched offers are withdrawn)."""
    proc, address = start_server("--max-sessions-per-client", "3", "--max-sessions-per-peer", "5",
                                 "--max-offers-per-client", "2", "--max-offers-per-peer", "3",
                                 env={**os.environ, "DJINN_TOKEN": TOKEN})
    host, _ = host_port(address)
    conns = []

    def connect(key=None):
        conns.append(dj.connect(address, token=TOKEN, owner_key=key))
        return conns[-1]
    try:
        one = connect()
        held = []
        for i in range(3):                      # one connection, a new owner key before each
            one.call("hello", owner_key=f"fresh-owner-proof-{i:04d}-0123456789")
            held.append(one.session())
        one.call("hello", owner_key="fresh-owner-proof-9999-0123456789")
        with pytest.raises(dj.LimitExceededError, match="max-sessions-per-client"):
            one.session()
        held[0].generate(PROMPT, max_new_tokens=2)
        ck = held[0].checkpoint().wait()
        offers = [one.call("export_checkpoint", checkpoint=ck.id)]
        one.call("hello", owner_key="fresh-owner-proof-7777-0123456789")
        offers.append(one.call("export_checkpoint", checkpoint=ck.id))
        one.call("hello", owner_key="fresh-owner-proof-8888-0123456789")
        with pytest.raises(dj.LimitExceededError, match="max-offers-per-client"):
            one.call("export_checkpoint", checkpoint=ck.id)
        # more connections from this host, each with its own key: capped per peer
        two, three = connect("another-key-0-0123456789"), connect("another-key-1-0123456789")
        s2 = two.session()
        three.session()                         # 5 sessions from this host
        with pytest.raises(dj.LimitExceededError, match="max-sessions-per-peer"):
            three.session()
        with pytest.raises(dj.LimitExceededError, match="max-sessions-per-peer"):
            connect("yet-another-key-0123456789").session()
        s2.generate(PROMPT, max_new_tokens=2)
        ck2 = s2.checkpoint().wait()
        two.call("export_checkpoint", checkpoint=ck2.id)     # 3 offers wait from this host
        with pytest.raises(dj.LimitExceededError, match="max-offers-per-peer"):
            two.call("export_checkpoint", checkpoint=ck2.id)
        one.close()                             # its sessions go, its offers are withdrawn

        def refused(offer) -> bool:
            try:
                socket.create_connection((host, offer["port"]), timeout=5).close()
                return False
            except (ConnectionRefusedError, ConnectionResetError):   # (reset: while closing)
                return True
        assert wait_for(lambda: all(refused(o) for o in offers))

        def can_open() -> bool:
            try:
                two.session()
                return True
            except dj.LimitExceededError:
                return False
        assert wait_for(can_open)
        two.call("export_checkpoint", checkpoint=ck2.id)
    finally:
        for c in conns:
            c.close()
        stop(proc)


# ---- 12: IPv6 --------------------------------------------------------------------------------
def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_loopback_serves_calls_control_and_bulk(tmp_path):
    proc, address = start_server(host="::1")
    try:
        assert address.startswith("[::1]:")
        with dj.connect(address) as c:
            s = c.session()
            out = s.generate(PROMPT, max_new_tokens=3, stop_at_eos=False)
            assert len(out.tokens) == 3
            ck = s.checkpoint().wait()
            path = ck.save(tmp_path / "v6.safetensors")          # the bulk path over IPv6
            restored = c.load_checkpoint(path)
            assert restored.id
    finally:
        stop(proc)
