"""Bad input and wrong-state calls through the real connection: a typed error with the
server's message, no remote traceback, and the session works afterwards."""
from __future__ import annotations

import numpy as np
import pytest

import djinn_nb as dj
from djinn_protocol import wire

PROMPT = "The capital of France is"


@pytest.fixture
def s(client):
    return client.session(model="tiny-gpt2")


def reference(s):
    return s.generate(PROMPT, max_new_tokens=5, stop_at_eos=False).tokens


def assert_clean(exc_info, *words):
    msg = str(exc_info.value)
    assert "Traceback" not in msg and "File \"" not in msg
    for w in words:
        assert w in msg, msg


def test_unknown_model(client):
    with pytest.raises(dj.UnknownModelError) as e:
        client.session(model="/no/such/model")
    assert_clean(e, "/no/such/model")
    with pytest.raises(dj.InvalidArgumentError):
        client.call("open_session", model=123)
    assert client.session(model="tiny-gpt2").layers == 8


def test_layer_out_of_range(s):
    tokens = reference(s)
    for bad in (8, -1, 10**9):
        with pytest.raises(dj.LayerOutOfRangeError) as e:
            s.breakpoint(layer=bad)
        assert_clean(e, "0..7")
    with pytest.raises(dj.LayerOutOfRangeError):
        s.steer(layer=99, scale=0.5)
    with pytest.raises(dj.InvalidArgumentError):
        s.breakpoint(layer="6")
    with pytest.raises(dj.InvalidArgumentError):
        s.breakpoint(layer=1, phase="sideways")
    assert s.info()["breakpoints"] == [] and s.info()["steering"] == []
    assert reference(s) == tokens


def test_bad_edits_while_paused(s):
    tokens = reference(s)
    s.breakpoint(layer=3, steps=[2])
    ev = s.generate(PROMPT, max_new_tokens=5, stop_at_eos=False)
    assert ev.paused
    h = s.activation()
    cases = [
        (dict(add=np.ones(7, dtype=np.float32)), dj.InvalidEditError, "hidden size"),
        (dict(add=np.full(64, np.nan, dtype=np.float32)), dj.InvalidEditError, "NaN"),
        (dict(set=np.full((1, 64), np.inf, dtype=np.float32)), dj.InvalidEditError, "NaN or infinite"),
        (dict(scale=float("nan")), dj.InvalidArgumentError, "finite"),
        (dict(scale=0.5, add=np.ones(64)), dj.InvalidEditError, "exactly one"),
        (dict(), dj.InvalidEditError, "exactly one"),
        (dict(scale=0.5, positions=[999]), dj.InvalidArgumentError, "paused chunk"),
        (dict(set=np.ones((3, 64), dtype=np.float32)), dj.InvalidEditError, "rows"),
        (dict(add=np.array(["a"] * 64)), dj.InvalidArgumentError, "dtype"),
    ]
    for kwargs, exc, words in cases:
        with pytest.raises(exc) as e:
            s.edit(**kwargs)
        assert_clean(e, words)
    assert np.array_equal(s.activation(), h)         # nothing was changed by the refusals
    ev = s.resume()
    assert ev.finished and ev.tokens == tokens


def test_calls_in_the_wrong_state(s):
    with pytest.raises(dj.NotPausedError) as e:
        s.activation()
    assert_clean(e, "idle")
    with pytest.raises(dj.NotPausedError):
        s.edit(scale=0.5)
    with pytest.raises(dj.NotPausedError):
        s.resume()
    with pytest.raises(dj.NotPausedError):
        s.step()
    tokens = reference(s)
    s.breakpoint(layer=1)
    assert s.generate(PROMPT, max_new_tokens=5, stop_at_eos=False).paused
    with pytest.raises(dj.SessionBusyError) as e:
        s.generate(PROMPT, max_new_tokens=5)
    assert_clean(e, "paused")
    assert s.resume(ignore_breakpoints=True).tokens == tokens


def test_bad_generate_arguments(s):
    tokens = reference(s)
    for kwargs, exc in [
        (dict(prompt=""), dj.InvalidArgumentError),
        (dict(prompt=[1, 2, 10**9]), dj.InvalidArgumentError),
        (dict(prompt=PROMPT, max_new_tokens=0), dj.InvalidArgumentError),
        (dict(prompt=PROMPT, max_new_tokens=10**7), dj.LimitExceededError),
        (dict(prompt=PROMPT, temperature=-1.0), dj.InvalidArgumentError),
        (dict(prompt=PROMPT, max_new_tokens=2.5), dj.InvalidArgumentError),
        (dict(prompt=PROMPT, bogus=1), dj.InvalidArgumentError),
        (dict(prompt=[{"role": "user"}]), dj.InvalidArgumentError),
        (dict(prompt=12), dj.InvalidArgumentError),
    ]:
        with pytest.raises(exc):
            s.client.call("generate", session=s.id, **kwargs)
    assert s.state in ("idle", "finished")
    assert reference(s) == tokens


def test_closed_and_unknown_sessions(client, s):
    tokens = reference(s)
    s.close()
    with pytest.raises(dj.SessionClosedError):          # told why, not "unknown"
        s.generate(PROMPT)
    with pytest.raises(dj.UnknownSessionError):
        client.call("generate", session="nope", prompt=PROMPT)
    assert reference(client.session(model="tiny-gpt2")) == tokens


def test_closing_a_paused_session_frees_it(client, s):
    s.breakpoint(layer=2)
    assert s.generate(PROMPT, max_new_tokens=5).paused
    s.close()                                   # aborts the paused forward on the server
    assert reference(client.session(model="tiny-gpt2"))


def test_malformed_requests_are_refused(client):
    root = client._conn.root
    for raw in ["x", ("{", ()), ("{}", ("notbytes",)), ("[1]", ()), ('{"session": 1}', ()),
                ("[" * 100_000, ())]:
        reply = wire.unpack(root.call("generate", raw))
        assert reply["error"]["type"] in ("InvalidArgumentError", "UnknownSessionError"), reply
    assert client.session(model="tiny-gpt2").layers == 8


def test_lost_connection_is_a_typed_error(kernel):
    from kernel_server.transport.server import KernelServer
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    c = dj.connect(srv.address)
    s = c.session(model="tiny-gpt2")
    srv.close()
    with pytest.raises(dj.ConnectionLostError) as e:
        s.generate(PROMPT, max_new_tokens=3)
    assert_clean(e, "kernel server")
    c.close()
    with pytest.raises(dj.ConnectionLostError):
        c.session()
    with pytest.raises(dj.ConnectionLostError) as e:
        dj.connect(srv.address)
    assert_clean(e, "cannot reach")


def test_context_longer_than_the_model_takes(s):
    """Past a model's positions (tiny-gpt2: 2048; GPT-2: 1024) a CUDA kernel would assert and
    lose the process's CUDA context: refused first, with a typed error, and nothing changes."""
    limit = s.info()["max_positions"]
    assert limit == 2048
    ids = [11] * (limit - 4)
    with pytest.raises(dj.LimitExceededError, match="positions"):
        s.generate(ids, max_new_tokens=8)
    with pytest.raises(dj.LimitExceededError, match="positions"):
        s.generate([ids, [11, 12]], max_new_tokens=8)
    with pytest.raises(dj.LimitExceededError, match="positions"):
        s.score(ids + [11] * 8)
    assert s.generate(ids, max_new_tokens=4).tokens            # what fits still runs
    assert s.generate(PROMPT, max_new_tokens=3).tokens
