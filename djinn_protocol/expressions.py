"""Intervention expressions on the wire: plain data, never code.

An expression is a tree of nodes ``{"op": name, "args": [node, ...]}`` (plus ``"value"``
for constants and ``"axis"``-free ops only): the activation at the site (``h``), constants
the client sends (scalars, vectors, matrices: numpy arrays through ``djinn_protocol.wire``)
and a fixed set of tensor ops. The client builds trees with ``djinn_nb.ops``; the server
checks them here (structure), then against the site's width and dtype (shapes, on torch's
meta device) before anything runs, and evaluates them with torch.

Vectors are over the hidden axis (the last); ``dot`` / ``norm`` reduce it and keep it as
size 1, so ``h - dot(h, v) * v`` is a direction ablation for a unit vector ``v``.

``sae_encode`` / ``sae_decode`` run a sparse autoencoder the session loaded
(``load_sae``), named by its ``"sae"`` key: ``sae_encode(x)`` is its feature activations
[..., d_sae], ``sae_decode(f)`` its reconstruction [..., d_in]. The server resolves the name
to the SAE's weights as constants (``SAE_ARGS``): a rule carries them into checkpoints and
files, and a client may send an SAE inline in that form too.
"""
from __future__ import annotations

from typing import Any

from .errors import InvalidEditError

#: op name -> number of arguments (None: a leaf). Every op keeps broadcasting semantics.
OPS: dict[str, int | None] = {
    # leaves
    "h": None, "const": None,
    # arithmetic
    "add": 2, "sub": 2, "mul": 2, "div": 2, "neg": 1, "matmul": 2,
    # over the hidden axis (kept as size 1)
    "dot": 2, "norm": 1, "sum": 1, "mean": 1,
    # projections (onto / away from the direction of a vector or the rows of a matrix)
    "project": 2, "ablate": 2,
    # elementwise
    "abs": 1, "relu": 1, "exp": 1, "log": 1, "tanh": 1, "sigmoid": 1, "sqrt": 1,
    "minimum": 2, "maximum": 2, "clamp": 3, "where": 3,
    "gt": 2, "ge": 2, "lt": 2, "le": 2, "eq": 2,
    # over the hidden axis, same shape out
    "softmax": 1, "topk_mask": 2,
    # a trusted function the server's operator loaded (``--plugin module:function``), by name
    "plugin": -1,
    # a sparse autoencoder, by its name (1 argument) or inline (its weights as constants)
    "sae_encode": -1, "sae_decode": -1,
}
#: the arguments of an inline SAE op after the input: sae_encode(x, W_enc [d_in, d_sae],
#: b_enc [d_sae], b_dec [d_in] (subtracted from x first; zeros when the SAE does not),
#: threshold [d_sae]) = where(pre > threshold, pre, 0) with pre = (x - b_dec) @ W_enc + b_enc
#: (a ReLU SAE has threshold 0); sae_decode(f, W_dec [d_sae, d_in], b_dec [d_in]) = f @ W_dec + b_dec
SAE_ARGS = {"sae_encode": ("W_enc", "b_enc", "b_dec", "threshold"), "sae_decode": ("W_dec", "b_dec")}
MAX_PLUGIN_ARGS = 8
MAX_NODES = 256
MAX_DEPTH = 48
MAX_CONST_ELEMENTS = 1 << 24          # 16 M values over all constants of one expression


def check(tree: Any) -> int:
    """Check the structure of an expression (ops, arity, size, depth); returns its node
    count. ``InvalidEditError`` naming what is wrong, for anything else."""
    count = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise InvalidEditError(f"an expression may have at most {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            raise InvalidEditError(f"an expression may be at most {MAX_DEPTH} levels deep")
        if not isinstance(node, dict) or not isinstance(node.get("op"), str):
            raise InvalidEditError("an expression node must be a dict with an 'op' name "
                                   f"(got {type(node).__name__})")
        op = node["op"]
        if op not in OPS:
            raise InvalidEditError(f"unknown expression op {op[:40]!r}; known: {', '.join(OPS)}")
        allowed = {"op", "args"} | ({"value"} if op == "const" else set()) | \
            ({"name"} if op == "plugin" else set()) | ({"sae"} if op in SAE_ARGS else set())
        extra = set(node) - allowed
        if extra:
            raise InvalidEditError(f"expression node {op!r} has unknown keys {sorted(extra)[:5]}")
        arity = OPS[op]
        args = node.get("args", [])
        if arity is None:
            if args:
                raise InvalidEditError(f"{op!r} takes no arguments")
            if op == "const" and "value" not in node:
                raise InvalidEditError("a 'const' node needs a 'value'")
            continue
        if op == "plugin":
            name = node.get("name")
            if not isinstance(name, str) or not 0 < len(name) <= 64:
                raise InvalidEditError("a 'plugin' node needs the plugin's 'name'")
            if not isinstance(args, list) or not 0 < len(args) <= MAX_PLUGIN_ARGS:
                raise InvalidEditError(f"a plugin takes 1..{MAX_PLUGIN_ARGS} arguments")
        elif op in SAE_ARGS:
            name = node.get("sae")
            if not isinstance(name, str) or not 0 < len(name) <= 64:
                raise InvalidEditError(f"an {op!r} node needs the 'sae' name of a loaded SAE")
            if not isinstance(args, list) or len(args) not in (1, 1 + len(SAE_ARGS[op])):
                raise InvalidEditError(f"{op!r} takes 1 argument (the SAE by name) or "
                                       f"{1 + len(SAE_ARGS[op])} (its weights inline)")
        elif not isinstance(args, list) or len(args) != arity:
            raise InvalidEditError(f"{op!r} takes {arity} argument{'s' if arity > 1 else ''}")
        stack.extend((a, depth + 1) for a in args)
    return count


def describe(node: dict, depth: int = 0) -> str:
    """A short text of an expression: ``sub(h, mul(dot(h, const[576]), const[576]))``."""
    if depth > 8:
        return "…"
    op = node["op"]
    if op == "h":
        return "h"
    if op == "const":
        value = node["value"]
        return f"{value:g}" if isinstance(value, (int, float)) else f"const{list(getattr(value, 'shape', []))}"
    if op in SAE_ARGS:
        return f"{op}[{node['sae']}]({describe(node['args'][0], depth + 1)})"
    name = node["name"] if op == "plugin" else op
    return f"{name}({', '.join(describe(a, depth + 1) for a in node['args'])})"


def split_constants(tree: dict) -> tuple[dict, list]:
    """The tree with each array constant replaced by ``{"op": "const", "array": j}`` and
    the arrays in that order (for a checkpoint file: JSON metadata plus tensors)."""
    arrays: list = []

    def walk(node):
        if node["op"] == "const" and not isinstance(node["value"], (int, float)):
            arrays.append(node["value"])
            return {"op": "const", "array": len(arrays) - 1}
        out = {k: v for k, v in node.items() if k != "args"}
        if "args" in node:
            out["args"] = [walk(a) for a in node["args"]]
        return out
    return walk(tree), arrays


def join_constants(tree: Any, arrays: list) -> Any:
    """``split_constants`` undone (references outside ``arrays`` are an ``InvalidEditError``)."""
    if isinstance(tree, list):
        return [join_constants(t, arrays) for t in tree]
    if not isinstance(tree, dict):
        return tree
    if tree.get("op") == "const" and "array" in tree:
        j = tree["array"]
        if type(j) is not int or not 0 <= j < len(arrays):
            raise InvalidEditError("an expression refers to a constant that is not there")
        return {"op": "const", "value": arrays[j]}
    return {k: join_constants(v, arrays) for k, v in tree.items()}
