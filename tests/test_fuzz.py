"""Bad input of any type or value through the real connection, for every exposed call:
each call returns a result or a typed error (never ServerError, the sign of an unhandled
exception), the server stays up, and a valid call afterwards gives the correct tokens."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import djinn_nb as dj

PROMPT = "The capital of France is"
CALLS = {
    "open_session": ["model"], "close_session": ["session"], "session_info": ["session"],
    "generate": ["session", "prompt", "max_new_tokens", "chat", "temperature", "top_k", "top_p",
                 "seed", "stop_at_eos", "record_top_k", "return_logits"],
    "resume": ["session", "ignore_breakpoints"], "step": ["session", "to"], "stop": ["session"],
    "activation": ["session", "positions", "reduce", "row"],
    "edit": ["session", "scale", "add", "alpha", "set", "positions", "head"],
    "set_breakpoint": ["session", "layer", "phase", "steps", "site"],
    "clear_breakpoints": ["session", "layer", "site"],
    "steer": ["session", "layer", "scale", "add", "alpha", "set", "positions", "phase", "steps",
              "site", "head", "rows"],
    "score": ["session", "tokens", "start", "steering", "compare", "top_k", "return_logits"],
    "steering_vector": ["session", "positive", "negative", "layer", "reduce"],
    "cache": ["session", "prompt", "sites", "layers", "reduce", "steering"],
    "lens": ["session", "prompt", "layers", "k", "target"],
    "logit_lens": ["session", "k", "positions"],
    "patch": ["session", "clean", "corrupted", "layer", "answer", "positions", "site", "head"],
    "tokenize": ["session", "text"], "decode": ["session", "tokens"], "memory": [], "ping": [],
    "export_checkpoint": ["checkpoint"],
    "clear_steering": ["session", "rule_id"],
    "checkpoint": ["session"], "checkpoint_info": ["checkpoint", "wait"], "checkpoints": [],
    "delete_checkpoint": ["checkpoint"], "restore": ["session", "checkpoint"], "fork": ["checkpoint"],
    "begin_upload": ["nbytes"], "import_checkpoint": ["upload", "session"],
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["all", "last", "both", "decode", "prefill", "norm", "mean", "layer", "token",
                     "tiny-gpt2", "", "x" * 300, "session", "resid", "attn", "mlp", "heads",
                     "attn_pattern", "module:transformer.h.1.mlp", "module:__class__"]),
)
arrays = st.one_of(
    st.builds(lambda n, d: np.zeros(n, dtype=d), st.integers(0, 130),
              st.sampled_from(["float32", "float16", "int64", "bool", "uint8"])),
    st.builds(lambda r, c: np.full((r, c), np.nan, dtype=np.float32), st.integers(0, 3),
              st.integers(0, 70)),
    st.just(np.ones(64, dtype=np.float32)), st.just(np.ones((1, 64), dtype=np.float64)),
)
values = st.recursive(st.one_of(scalars, arrays),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)


@pytest.fixture(scope="module")
def fuzz_client(server):
    # module-scoped (conftest's `client` is per test): hypothesis runs all examples in one test
    c = dj.connect(server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def state(fuzz_client):
    """A real session (sometimes paused) and checkpoint id for the fuzzer to aim at."""
    s = fuzz_client.session(model="tiny-gpt2")
    reference = s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).tokens
    ck = s.checkpoint()
    return {"session": s, "reference": reference, "checkpoint": ck.id, "cases": 0}


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_call_survives_bad_input(fuzz_client, state, data):
    name = data.draw(st.sampled_from(sorted(CALLS)), label="call")
    params = CALLS[name] + ["bogus"]
    keys = data.draw(st.lists(st.sampled_from(params), unique=True, max_size=len(params)))
    kwargs = {}
    for key in keys:
        if key == "session" and data.draw(st.booleans()):
            kwargs[key] = state["session"].id
        elif key == "checkpoint" and data.draw(st.booleans()):
            kwargs[key] = state["checkpoint"]
        else:
            kwargs[key] = data.draw(values, label=key)
    if name == "generate" and isinstance(kwargs.get("max_new_tokens"), int):
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], 8)   # keep each case quick
    state["cases"] += 1
    try:
        fuzz_client._call(name, **kwargs)
    except dj.ServerError as exc:          # an unhandled exception inside the server
        raise AssertionError(f"{name}({kwargs!r:.300}) -> ServerError: {exc}") from None
    except dj.DjinnError:
        pass


def test_server_still_correct_after_fuzzing(fuzz_client, state):
    assert state["cases"] >= 1000, state["cases"]
    print(f"fuzz cases run: {state['cases']}")
    s = fuzz_client.session(model="tiny-gpt2")
    assert s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).tokens == state["reference"]


#: exposed calls fuzzed elsewhere: the handshake and re-attach calls (test_security.py's bad
#: input test) and the control channel's opener (test_control_channel.py)
FUZZED_ELSEWHERE = {"hello", "reattach", "attach", "closing", "open_control",
                    # rpyc.Service's own: return the service's name strings, take no input
                    "get_service_name", "get_service_aliases"}


def test_every_exposed_call_is_fuzzed():
    from kernel_server.service import KernelService
    exposed = {n[len("exposed_"):] for n in dir(KernelService) if n.startswith("exposed_")}
    assert exposed - FUZZED_ELSEWHERE <= set(CALLS), sorted(exposed - FUZZED_ELSEWHERE - set(CALLS))
