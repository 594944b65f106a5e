"""The one declared table of calls: every request a client may make of a kernel server.

Each ``Call`` names its parameters (with a wire type, required or a default), where the
server runs it (``target``: ``"session.<method>"`` is a method of the caller's session named
by the ``session`` argument, ``"server.<function>"`` a function of the server's transport
handlers) and what it replies. The client's ``Session``/``Client`` methods send these
names, the server's one dispatcher binds and checks arguments against this table (unknown,
misspelt, missing or wrongly typed arguments are an ``InvalidArgumentError`` naming them),
and the fuzzer draws its calls from it. Adding a call means one entry here plus its server
function. Values are checked further (ranges, shapes, the model) on the server.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

from .errors import CheckpointError, InvalidArgumentError

#: wire types a parameter may declare; "?" after one also allows None
KINDS = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
    "list": (list,), "dict": (dict,), "any": (object,),
}
REQUIRED = object()   # the default of a parameter that must be given


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    kind: str                # a key of KINDS, optionally with "?" (None allowed)
    default: Any = REQUIRED
    error: type = InvalidArgumentError   # what a value of the wrong type raises

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, call: str, value: Any) -> None:
        kind = self.kind.rstrip("?")
        if value is None and (self.kind.endswith("?") or kind == "any"):
            return
        types = KINDS[kind]
        ok = isinstance(value, types) and not (type(value) is bool and kind in ("int", "float"))
        if not ok:
            raise self.error(f"{call}(): {self.name} must be {describe(self.kind)}, "
                             f"got {type(value).__name__}")


def describe(kind: str) -> str:
    base = {"str": "a str", "int": "an int", "float": "a number", "bool": "a bool",
            "list": "a list", "dict": "a dict", "any": "a value"}[kind.rstrip("?")]
    return base + (" or None" if kind.endswith("?") else "")


@dataclasses.dataclass(frozen=True)
class Call:
    name: str
    target: str                       # "session.<method>" | "server.<function>"
    params: tuple[Param, ...] = ()
    reply: str = "None"               # what comes back (documentation and tests)
    deferred: bool = False            # may be answered by the generation thread (hot cycle)

    @property
    def on_session(self) -> bool:
        return self.target.startswith("session.")

    @property
    def function(self) -> str:
        return self.target.split(".", 1)[1]

    def bind(self, args: Any) -> dict:
        """``args`` checked against the declaration, defaults filled in."""
        if not isinstance(args, dict):
            raise InvalidArgumentError(f"{self.name}(): arguments must be a dict")
        known = {p.name: p for p in self.params}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise InvalidArgumentError(
                f"{self.name}(): unknown argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; it takes {', '.join(known) or 'none'}")
        missing = [p.name for p in self.params if p.required and p.name not in args]
        if missing:
            raise InvalidArgumentError(f"{self.name}(): missing required argument"
                                       f"{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        out = {}
        for p in self.params:
            value = args[p.name] if p.name in args else copy.copy(p.default)
            p.check(self.name, value)
            out[p.name] = value
        return out


def _p(spec: str, default: Any = REQUIRED) -> Param:
    name, kind = spec.split(":")
    return Param(name, kind, default)


SESSION = _p("session:str")
CHECKPOINT = Param("checkpoint", "str", error=CheckpointError)   # (an id: no such checkpoint)
_EDIT = (_p("scale:float?", None), _p("add:any", None), _p("alpha:float", 1.0),
         _p("set:any", None), _p("edit:dict?", None), _p("positions:any", "all"))

CALLS: dict[str, Call] = {c.name: c for c in [
    # ---- connection ------------------------------------------------------------------------
    Call("hello", "server.hello", (_p("owner_key:str?", None),),
         "server facts and this connection's owner id"),
    Call("reattach", "server.reattach", (_p("owner:str"),),
         "{sessions, checkpoints} re-attached from a lost connection"),
    Call("attach", "server.attach", (SESSION,), "session info"),
    Call("closing", "server.closing"),
    Call("ping", "server.ping"),
    Call("memory", "server.memory", (), "{devices, checkpoint_bytes}"),
    Call("open_control", "server.open_control", (), "{port, nonce} of the control channel"),
    # ---- sessions --------------------------------------------------------------------------
    Call("open_session", "server.open_session", (_p("model:str?", None),), "session info"),
    Call("close_session", "server.close_session", (SESSION,)),
    Call("session_info", "session.info", (SESSION,), "session info"),
    # ---- generation ------------------------------------------------------------------------
    Call("generate", "session.generate", (
        SESSION, _p("prompt:any"), _p("max_new_tokens:int", 20), _p("chat:bool", False),
        _p("temperature:float", 0.0), _p("top_k:int?", None), _p("top_p:float?", None),
        _p("seed:int?", None), _p("stop_at_eos:bool", True), _p("record_top_k:int", 5),
        _p("return_logits:bool", False)), "event: paused or finished"),
    Call("resume", "session.resume", (SESSION, _p("ignore_breakpoints:bool", False)),
         "event", deferred=True),
    Call("step", "session.step", (SESSION, _p("to:str", "layer")), "event", deferred=True),
    Call("stop", "session.stop", (SESSION,), "event: finished", deferred=True),
    Call("interrupt", "session.interrupt", (SESSION,),
         "whether a running generation was asked to stop at its next step"),
    # ---- breakpoints and steering ----------------------------------------------------------
    Call("set_breakpoint", "session.set_breakpoint", (
        SESSION, _p("layer:int?", None), _p("phase:str", "decode"), _p("steps:any", None),
        _p("site:str", "resid")), "the breakpoint"),
    Call("clear_breakpoints", "session.clear_breakpoints", (
        SESSION, _p("layer:int?", None), _p("site:str?", None)), "how many were removed"),
    Call("steer", "session.steer", (
        SESSION, _p("layer:int?", None), *_EDIT, _p("phase:str", "both"),
        _p("steps:any", None), _p("site:str", "resid"), _p("head:int?", None),
        _p("rows:any", None), _p("sae:str?", None), _p("feature:int?", None),
        _p("clamp:float?", None)), "the rule"),
    Call("clear_steering", "session.clear_steering", (SESSION, _p("rule_id:int?", None)),
         "how many were removed"),
    # ---- while paused ----------------------------------------------------------------------
    Call("activation", "session.activation", (
        SESSION, _p("positions:any", "all"), _p("reduce:str?", None), _p("row:int?", None)),
         "array (over rpyc a large one is offered on the bulk path)"),
    Call("edit", "session.edit", (SESSION, *_EDIT, _p("head:int?", None)), "{edits}"),
    Call("logit_lens", "session.logit_lens", (
        SESSION, _p("k:int", 10), _p("positions:any", "last")), "top-k per position"),
    # ---- one-shot passes -------------------------------------------------------------------
    Call("score", "session.score", (
        SESSION, _p("tokens:any"), _p("start:int?", None), _p("steering:any", "session"),
        _p("compare:bool", True), _p("top_k:int", 5), _p("return_logits:bool", False)),
         "per-position log-probs and comparisons"),
    Call("steering_vector", "session.steering_vector", (
        SESSION, _p("positive:list"), _p("negative:list"), _p("layer:int"),
        _p("reduce:str", "last")), "float32 array [hidden]"),
    Call("cache", "session.cache", (
        SESSION, _p("prompt:any"), _p("sites:any", ["resid"]), _p("layers:any", None),
        _p("reduce:str?", None), _p("steering:any", None)), "activations by site key"),
    Call("lens", "session.lens", (
        SESSION, _p("prompt:any"), _p("layers:any", None), _p("k:int", 10),
        _p("target:int?", None)), "top-k per layer"),
    Call("patch", "session.patch", (
        SESSION, _p("clean:any"), _p("corrupted:any"), _p("layer:int"), _p("answer:list"),
        _p("positions:any", None), _p("site:str", "resid"), _p("head:int?", None)),
         "one layer's row of the patching grid"),
    Call("patch_sweep", "session.patch_sweep", (
        SESSION, _p("clean:any"), _p("corrupted:any"), _p("answer:list"), _p("layers:any", None),
        _p("positions:any", None), _p("site:str", "resid"), _p("head:int?", None),
        _p("batch:int", 64)), "the patching grid of layers x positions, cells as batch rows"),
    Call("attribution_patch", "session.attribution_patch", (
        SESSION, _p("clean:any"), _p("corrupted:any"), _p("answer:list"), _p("layers:any", None),
        _p("site:str", "resid")), "the first-order estimate of the patching grid"),
    Call("grad", "session.grad", (
        SESSION, _p("prompt:any"), _p("metric:str", "logit_diff"), _p("answer:list?", None),
        _p("target:int?", None), _p("start:int?", None), _p("sites:any", ["resid"]),
        _p("layers:any", None), _p("reduce:str?", None)), "{grads: by site key, metric}"),
    Call("load_sae", "session.load_sae", (
        SESSION, _p("path:str"), _p("layer:int?", None), _p("site:str?", None),
        _p("sae:str?", None)), "the SAE's description (name, layer, site, d_in, d_sae, ...)"),
    Call("sae_features", "session.sae_features", (
        SESSION, _p("sae:str"), _p("prompt:any", None), _p("k:int", 10),
        _p("features:list?", None), _p("steering:any", None)),
         "top-k features per position {indices, values, l0, recon_error, positions, ...}"),
    Call("to_str_tokens", "session.to_str_tokens", (SESSION, _p("text:any")), "token texts"),
    Call("tokenize", "session.tokenize", (SESSION, _p("text:str")), "token ids"),
    Call("decode", "session.decode", (SESSION, _p("tokens:list")), "text"),
    # ---- checkpoints -----------------------------------------------------------------------
    Call("checkpoint", "server.checkpoint", (SESSION, _p("row:any", None)),
         "checkpoint description (row='all': a list, one per row of a batch call)"),
    Call("checkpoint_info", "server.checkpoint_info", (CHECKPOINT, _p("wait:bool", False)),
         "checkpoint description"),
    Call("checkpoints", "server.checkpoints", (), "this client's checkpoints"),
    Call("delete_checkpoint", "server.delete_checkpoint", (CHECKPOINT,)),
    Call("restore", "server.restore", (SESSION, CHECKPOINT), "session info"),
    Call("fork", "server.fork", (CHECKPOINT,), "the new session's info"),
    Call("export_checkpoint", "server.export_checkpoint", (CHECKPOINT,),
         "{port, nonce, nbytes}: the file on the bulk path"),
    Call("begin_upload", "server.begin_upload", (_p("nbytes:int"),),
         "{port, nonce}: where to send the file"),
    Call("import_checkpoint", "server.import_checkpoint", (
        _p("upload:str"), _p("session:str?", None)), "{checkpoint, session}"),
    # ---- a cluster (kernel_server.cluster, issue 20) ----------------------------------------
    # answered by the cluster's directory (a kernel server refuses them):
    Call("cluster_status", "server.cluster_status", (), "{replicas: [...], models: {...}}"),
    Call("cluster_place", "server.cluster_place", (_p("model:str"), _p("exclude:list", [])),
         "the least-loaded healthy replica serving model"),
    Call("cluster_relay", "server.cluster_relay", (
        _p("source:str"), _p("offer:dict"), _p("target:str"), _p("upload:dict")),
         "{nbytes}: a checkpoint file streamed from one replica's offer to another's upload"),
    Call("cluster_moved", "server.cluster_moved", (_p("replica:str"), _p("sessions:list")),
         "where the drain moved these sessions of replica: [{session, replica, address, moved_to}]"),
    # answered by a replica to the cluster operator (its directory) only:
    Call("cluster_load", "server.cluster_load", (), "{sessions by state, memory, checkpoint bytes}"),
    Call("handover_out", "server.handover_out", (),
         "[{session, principal, model, state, offer}] of every paused or ready session"),
    Call("handover_in", "server.handover_in", (_p("upload:str"), _p("principal:str")),
         "{session}: the file restored into a session kept for principal to attach"),
]}


def lookup(name: Any) -> Call:
    """The declared call ``name`` (``InvalidArgumentError`` for anything else)."""
    call = CALLS.get(name) if isinstance(name, str) else None
    if call is None:
        raise InvalidArgumentError(f"unknown call {str(name)[:80]!r}")
    return call
