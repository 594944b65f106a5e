"""Intervention expressions on the server: checked (structure, then shapes on torch's meta
device, constants finite and within size limits) before anything runs, then evaluated with
plain torch ops in the activation's dtype. The wire format and the op list live in
``djinn_protocol.expressions``; the client builds trees with ``djinn_nb.ops``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from djinn_protocol.errors import InvalidEditError
from djinn_protocol.expressions import MAX_CONST_ELEMENTS, SAE_ARGS, check, describe


#: trusted intervention functions the server's operator loaded at start (``--plugin``):
#: name -> fn(h, *args) -> tensor of h's shape. Clients call them by name with data
#: arguments inside an expression; a client can never upload code.
PLUGINS: dict = {}


def register_plugin(spec: str) -> str:
    """Load ``module:function`` (or ``name=module:function``) and register it; its name."""
    import importlib
    name, _, target = spec.rpartition("=")
    module, _, function = target.partition(":")
    if not module or not function:
        raise ValueError(f"--plugin wants module:function (or name=module:function), got {spec!r}")
    fn = getattr(importlib.import_module(module), function)
    if not callable(fn):
        raise ValueError(f"--plugin {spec}: {function} is not callable")
    PLUGINS[name or function] = fn
    return name or function


def _project(a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """a's component in the span of ``basis`` ([width, k], orthonormal columns)."""
    return (a @ basis) @ basis.transpose(0, 1)


def _topk_mask(a: torch.Tensor, k) -> torch.Tensor:
    k = int(k)
    return torch.zeros_like(a).scatter(-1, a.topk(k, dim=-1).indices, 1)


def _cond(c):
    return c != 0 if isinstance(c, torch.Tensor) else bool(c)


BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "minimum": lambda a, b: torch.minimum(*_tensors(a, b)),
    "maximum": lambda a, b: torch.maximum(*_tensors(a, b)),
    "dot": lambda a, b: (a * b).sum(-1, keepdim=True),
    "matmul": lambda a, b: _matmul(a, b),
    "gt": lambda a, b: _cmp(torch.gt, a, b), "ge": lambda a, b: _cmp(torch.ge, a, b),
    "lt": lambda a, b: _cmp(torch.lt, a, b), "le": lambda a, b: _cmp(torch.le, a, b),
    "eq": lambda a, b: _cmp(torch.eq, a, b),
    "topk_mask": _topk_mask,
}
UNARY = {
    "neg": torch.neg, "abs": torch.abs, "relu": torch.relu, "exp": torch.exp, "log": torch.log,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "sqrt": torch.sqrt,
    "norm": lambda a: torch.linalg.vector_norm(a, dim=-1, keepdim=True),
    "sum": lambda a: a.sum(-1, keepdim=True), "mean": lambda a: a.mean(-1, keepdim=True),
    "softmax": lambda a: torch.softmax(a, dim=-1),
}


def _matmul(a, b):
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError("@ needs a tensor on both sides (use * for a number)")
    return (a @ b).unsqueeze(-1) if b.dim() == 1 else a @ b


def _tensors(a, b):
    like = a if isinstance(a, torch.Tensor) else b
    return [x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=like.dtype, device=like.device)
            for x in (a, b)]


def _cmp(fn, a, b):
    like = a if isinstance(a, torch.Tensor) else b
    return fn(a, b).to(like.dtype)


@dataclass(frozen=True, eq=False)
class Expression:
    """A checked expression, ready to run: ``expr(h)`` is a new tensor of ``h``'s shape."""
    tree: dict                 # the wire tree (constants as numpy / floats), for describe and files
    text: str
    _consts: tuple             # per const node, in evaluation order: a float or a tensor
    _bases: tuple              # per project/ablate node: the orthonormal basis of its constant

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        consts, bases = iter(self._consts), iter(self._bases)
        return _evaluate(self.tree, h, consts, bases, h.dtype, h.device)

    def describe(self) -> str:
        return self.text


def _evaluate(node, h, consts, bases, dtype, device):
    op = node["op"]
    if op == "h":
        return h
    if op == "const":
        value = next(consts)
        return value if isinstance(value, float) else value.to(device=device, dtype=dtype)
    args = [_evaluate(a, h, consts, bases, dtype, device) for a in node["args"]]
    if op == "sae_encode":      # (inline: kernel_server.model.sae.resolve_names made it so)
        x, w_enc, b_enc, b_dec, threshold = args
        pre = (x - b_dec) @ w_enc + b_enc
        return torch.where(pre > threshold, pre, torch.zeros_like(pre))
    if op == "sae_decode":
        f, w_dec, b_dec = args
        return f @ w_dec + b_dec
    if op == "plugin":
        return PLUGINS[node["name"]](*args)
    if op in ("project", "ablate"):
        basis = next(bases).to(device=device, dtype=dtype)
        part = _project(args[0], basis)
        return part if op == "project" else args[0] - part
    if op == "clamp":
        low, high = args[1], args[2]
        return torch.clamp(args[0], min=low, max=high) if not any(
            isinstance(x, torch.Tensor) for x in (low, high)) else torch.maximum(
            torch.minimum(args[0], high if isinstance(high, torch.Tensor) else torch.full_like(args[0], high)),
            low if isinstance(low, torch.Tensor) else torch.full_like(args[0], low))
    if op == "where":
        cond, a, b = args
        a, b = _tensors(a, b) if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) else (a, b)
        return torch.where(_cond(cond), a, b)
    if op in UNARY:
        return UNARY[op](args[0])
    return BINARY[op](*args)


def _constants(tree: dict, width: int) -> tuple[list, list]:
    """The const nodes' values (checked) in evaluation order, and the bases of projections."""
    consts, bases, total = [], [], 0
    seen: dict = {}          # the same array twice (an SAE used twice) is checked and held once

    def walk(node):
        nonlocal total
        op = node["op"]
        if op == "const":
            value = node["value"]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise InvalidEditError("an expression constant is not finite")
                consts.append(float(value))
                return
            if not isinstance(value, np.ndarray) or value.ndim not in (1, 2) or value.size == 0:
                raise InvalidEditError("an expression constant must be a number, a vector or a matrix")
            if id(value) in seen:
                consts.append(seen[id(value)][1])
                return
            total += value.size
            if total > MAX_CONST_ELEMENTS:
                raise InvalidEditError(f"an expression's constants may hold at most "
                                       f"{MAX_CONST_ELEMENTS} values")
            if value.dtype.kind not in "fiub" or not np.isfinite(value).all():
                raise InvalidEditError("expression constants must be finite numbers")
            seen[id(value)] = (value, torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
            consts.append(seen[id(value)][1])
            return
        if op in SAE_ARGS:
            _check_sae_node(node, width)
        for a in node.get("args", []):
            walk(a)
        if op in ("project", "ablate"):
            direction = node["args"][1]
            if direction["op"] != "const" or not isinstance(direction.get("value"), np.ndarray):
                raise InvalidEditError(f"{op}(a, v): v must be a constant vector [{width}] or "
                                       f"matrix [k, {width}]")
            v = np.asarray(direction["value"], dtype=np.float64).reshape(-1, width) \
                if direction["value"].shape[-1] == width else None
            if v is None:
                raise InvalidEditError(f"{op}(a, v): v must have {width} columns")
            q, r = np.linalg.qr(v.T)                    # orthonormal columns spanning v's rows
            if np.abs(np.diag(r)).min() < 1e-12:
                raise InvalidEditError(f"{op}(a, v): v's rows must be linearly independent and non-zero")
            bases.append(torch.from_numpy(q.astype(np.float32)))
    walk(tree)
    return consts, bases


def _check_sae_node(node: dict, width: int) -> None:
    """An SAE node must be inline (its name resolved by the session) with consistent shapes."""
    op, args = node["op"], node["args"]
    if len(args) == 1:
        raise InvalidEditError(f"no SAE named {node['sae'][:64]!r} is loaded here (s.load_sae(path))")
    values = [a.get("value") if a["op"] == "const" else None for a in args[1:]]
    if not all(isinstance(v, np.ndarray) for v in values):
        raise InvalidEditError(f"an inline {op}'s weights must be constant arrays")
    w = values[0]
    if w.ndim != 2:
        raise InvalidEditError(f"{op}: {SAE_ARGS[op][0]} must be a matrix")
    d_in, d_sae = w.shape if op == "sae_encode" else w.shape[::-1]
    want = [[d_in, d_sae], [d_sae], [d_in], [d_sae]] if op == "sae_encode" else [[d_sae, d_in], [d_in]]
    for name, v, shape in zip(SAE_ARGS[op], values, want):
        if list(v.shape) != shape:
            raise InvalidEditError(f"{op}: {name} is {list(v.shape)}, expected {shape}")


def _plugin_names(node) -> set:
    names = {node["name"]} if node["op"] == "plugin" else set()
    for a in node.get("args", []):
        names |= _plugin_names(a)
    return names


def compile_expression(tree, width: int, dtype: torch.dtype, device="cpu") -> Expression:
    """Check ``tree`` for a site of ``width`` and return the runnable ``Expression``, its
    constants already on ``device`` in ``dtype`` (no copy per step); ``InvalidEditError``
    for anything that would not run or not give ``h``'s shape."""
    check(tree)
    consts, bases = _constants(tree, width)
    moved: dict = {}           # one copy on the device per array (an SAE used twice: once)
    consts = [c if isinstance(c, float) else
              moved.setdefault(id(c), c.to(device=device, dtype=dtype)) for c in consts]
    bases = [b.to(device=device, dtype=dtype) for b in bases]
    expr = Expression(tree, describe(tree), tuple(consts), tuple(bases))
    plugins = _plugin_names(tree)
    unknown = sorted(plugins - set(PLUGINS))
    if unknown:
        raise InvalidEditError(f"no plugin named {unknown[0][:64]!r} on this server (loaded: "
                               f"{', '.join(sorted(PLUGINS)) or 'none'}; the operator adds them "
                               "with --plugin module:function)")
    # shapes are checked on torch's meta device (nothing computed); a plugin may use ops the
    # meta device lacks, so with one the probe is a small zero tensor on the CPU instead
    probe = torch.zeros((2, 3, width), dtype=dtype) if plugins else \
        torch.empty((2, 3, width), device="meta", dtype=dtype)
    try:
        out = expr(probe) if not plugins else Expression(
            tree, expr.text, tuple(c if isinstance(c, float) else c.cpu() for c in consts),
            tuple(b.cpu() for b in bases))(probe)
    except Exception as exc:      # the probe is validation: whatever fails, the rule is refused
        raise InvalidEditError(f"the expression {expr.text[:200]} does not fit a site of width "
                               f"{width}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(probe.shape):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else "a number"
        raise InvalidEditError(f"the expression {expr.text[:200]} gives {shape} for an activation "
                               f"of shape [..., positions, {width}]; it must keep h's shape")
    return expr
