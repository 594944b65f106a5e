"""Bad input of any type or value through the real connection, for every exposed call:
each call returns a result or a typed error (never ServerError, the sign of an unhandled
exception), the server stays up, and a valid call afterwards gives the correct tokens."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import djinn_nb as dj

from djinn_protocol.calls import CALLS as DECLARED

PROMPT = "The capital of France is"
#: calls fuzzed elsewhere: the handshake and re-attach calls (test_security.py's bad input
#: test, test_disconnects.py) and the control channel's opener (test_control_channel.py)
FUZZED_ELSEWHERE = {"hello", "reattach", "attach", "closing", "open_control"}
#: every declared call but those, with its declared parameter names (read from the table)
CALLS = {name: [p.name for p in call.params] for name, call in DECLARED.items()
         if name not in FUZZED_ELSEWHERE}

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
        fuzz_client.call(name, **kwargs)
    except dj.ServerError as exc:          # an unhandled exception inside the server
        raise AssertionError(f"{name}({kwargs!r:.300}) -> ServerError: {exc}") from None
    except dj.DjinnError:
        pass


def test_server_still_correct_after_fuzzing(fuzz_client, state):
    assert state["cases"] >= 1000, state["cases"]
    print(f"fuzz cases run: {state['cases']}")
    s = fuzz_client.session(model="tiny-gpt2")
    assert s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).tokens == state["reference"]


def test_every_declared_call_is_fuzzed_and_has_a_server_target():
    from kernel_server.runtime.session_state import Session
    from kernel_server.transport.dispatch import SERVER_TARGETS
    assert set(CALLS) | FUZZED_ELSEWHERE == set(DECLARED)
    assert FUZZED_ELSEWHERE < set(DECLARED)
    for name, call in DECLARED.items():
        target = SERVER_TARGETS.get(name) if not call.on_session else getattr(Session, call.function, None)
        assert callable(target), name


def test_the_rpyc_service_exposes_only_the_dispatcher():
    from kernel_server.transport.rpyc_service import RpycService
    exposed = {n for n in dir(RpycService) if n.startswith("exposed_")}
    # (rpyc.Service's own two return the service's name strings and take no input)
    assert exposed == {"exposed_call", "exposed_get_service_name", "exposed_get_service_aliases"}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_unknown_and_misspelt_arguments_are_refused_by_name(fuzz_client, name):
    # (a session of its own: the fuzzer may have closed the shared one)
    s = fuzz_client.session(model="tiny-gpt2")
    args = {"session": s.id} if DECLARED[name].on_session else {}
    with pytest.raises(dj.InvalidArgumentError, match="unknown argument 'bogus'"):
        fuzz_client.call(name, bogus=1, **args)
    s.close()


def test_steer_and_edit_refuse_misspelt_keywords(fuzz_client):
    s = fuzz_client.session(model="tiny-gpt2")
    with pytest.raises(dj.InvalidArgumentError, match="'bogus', 'sacle'"):
        fuzz_client.call("steer", session=s.id, layer=1, scale=0.9, sacle=2.0, bogus=1)
    with pytest.raises(dj.InvalidArgumentError, match="'alhpa'"):
        fuzz_client.call("edit", session=s.id, scale=0.5, alhpa=3.0)
    assert s.info()["steering"] == []                        # nothing was added


def test_wrongly_typed_and_missing_arguments_name_the_parameter(fuzz_client):
    sid = fuzz_client.session(model="tiny-gpt2").id
    with pytest.raises(dj.InvalidArgumentError, match=r"generate\(\): max_new_tokens must be an int"):
        fuzz_client.call("generate", session=sid, prompt=PROMPT, max_new_tokens="5")
    with pytest.raises(dj.InvalidArgumentError, match="missing required argument prompt"):
        fuzz_client.call("generate", session=sid)
    with pytest.raises(dj.InvalidArgumentError, match="unknown call"):
        fuzz_client.call("generate_everything")


def test_client_methods_agree_with_the_table():
    """Each Session / Client method sends a declared call whose defaults are the method's."""
    import inspect
    from djinn_nb import Session
    pairs = {"breakpoint": "set_breakpoint", "clear_breakpoints": "clear_breakpoints",
             "steer": "steer", "clear_steering": "clear_steering", "generate": "generate",
             "resume": "resume", "step": "step", "edit": "edit", "logit_lens": "logit_lens",
             "activation": "activation", "lens": "lens", "steering_vector": "steering_vector",
             "score": "score", "tokenize": "tokenize", "patch": "patch_sweep",
             "attribution_patch": "attribution_patch", "grad": "grad",
             "to_str_tokens": "to_str_tokens", "cache": "cache"}
    client_only = {"progress"}                       # (a notebook-side option: a tqdm bar)
    for method, name in pairs.items():
        declared = {p.name: p for p in DECLARED[name].params}
        for p in list(inspect.signature(getattr(Session, method)).parameters.values())[1:]:
            if p.name in client_only:
                continue
            assert p.name in declared, (method, p.name)
            if p.default is not inspect.Parameter.empty and not declared[p.name].required:
                want = declared[p.name].default
                # a str the client sends as a one-item list (sites="resid" -> ["resid"])
                assert p.default == want or [p.default] == want, (method, p.name)
