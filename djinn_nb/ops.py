"""Intervention expressions, built in the notebook and evaluated on the server.

>>> import djinn_nb as dj
>>> h, v = dj.ops.h, dj.ops.const(unit_vector)           # v: [hidden]
>>> s.steer(6, edit=h - dj.ops.dot(h, v) * v)            # direction ablation, every step
>>> s.steer(6, edit=dj.ops.ablate(h, v))                 # the same, named
>>> s.edit(edit=dj.ops.clamp(h, -3.0, 3.0))              # while paused
>>> s.steer(6, edit=dj.ops.where(dj.ops.dot(h, v) > 2.0, h - 2.0 * v, h))   # conditional
>>> f = dj.ops.sae_encode(h, "my_sae")                    # an SAE loaded with s.load_sae
>>> s.steer(6, edit=dj.ops.sae_decode(f, "my_sae"))       # splice its reconstruction in

An expression is plain data on the wire (``djinn_protocol.expressions``): no code is sent.
``h`` is the activation at the rule's site, [positions, width]; vectors are over the last
(hidden) axis. ``dot``/``norm``/``sum``/``mean`` reduce that axis and keep it as size 1, so
results broadcast back against ``h``. The result must have ``h``'s shape.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from djinn_protocol.expressions import OPS, check, describe

__all__ = ["Expr", "h", "const", "dot", "norm", "project", "ablate", "clamp", "where",
           "minimum", "maximum", "relu", "softmax", "topk_mask", "abs", "exp", "log", "tanh",
           "sigmoid", "sqrt", "sum", "mean", "plugin", "sae_encode", "sae_decode", "OPS"]


def _node(value: Any) -> dict:
    if isinstance(value, Expr):
        return value.tree
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return {"op": "const", "value": float(value)}
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return {"op": "const", "value": np.asarray(value, dtype=np.float32)}
    raise TypeError(f"cannot use a {type(value).__name__} in an intervention expression")


class Expr:
    """A node of an intervention expression; arithmetic, comparisons and ``@`` build more."""
    __slots__ = ("tree",)
    __array_priority__ = 1000        # (numpy array @ Expr comes here, not to numpy)

    def __init__(self, tree: dict):
        self.tree = tree

    def _op(self, op: str, *others) -> "Expr":
        return Expr({"op": op, "args": [_node(x) for x in (self, *others)]})

    def _rop(self, op: str, other) -> "Expr":
        return Expr({"op": op, "args": [_node(other), self.tree]})

    __add__ = lambda self, o: self._op("add", o)
    __radd__ = lambda self, o: self._rop("add", o)
    __sub__ = lambda self, o: self._op("sub", o)
    __rsub__ = lambda self, o: self._rop("sub", o)
    __mul__ = lambda self, o: self._op("mul", o)
    __rmul__ = lambda self, o: self._rop("mul", o)
    __truediv__ = lambda self, o: self._op("div", o)
    __rtruediv__ = lambda self, o: self._rop("div", o)
    __matmul__ = lambda self, o: self._op("matmul", o)
    __rmatmul__ = lambda self, o: self._rop("matmul", o)
    __gt__ = lambda self, o: self._op("gt", o)
    __ge__ = lambda self, o: self._op("ge", o)
    __lt__ = lambda self, o: self._op("lt", o)
    __le__ = lambda self, o: self._op("le", o)

    def __neg__(self) -> "Expr":
        return self._op("neg")

    def __getitem__(self, key) -> "Expr":
        # ``x[..., None]``: hidden-axis reductions already keep their axis, so this is the
        # identity on them; anything else is refused rather than guessed
        if key == (Ellipsis, None):
            return self
        raise TypeError("expressions support only x[..., None] indexing (a no-op: reductions "
                        "keep the hidden axis); select positions with positions=[...]")

    def __bool__(self):
        raise TypeError("an expression has no truth value in the notebook: use "
                        "dj.ops.where(condition, a, b)")

    def __repr__(self) -> str:
        return f"<dj.ops.Expr {describe(self.tree)}>"

    def to_wire(self) -> dict:
        """The tree as sent (checked here too, so a mistake shows before the call)."""
        check(self.tree)
        return self.tree


#: the activation at the site
h = Expr({"op": "h"})


def const(value) -> Expr:
    """A constant sent with the expression: a number, a vector [width] or a matrix."""
    return Expr(_node(value)) if not isinstance(value, Expr) else value


def plugin(name: str, *args) -> Expr:
    """A trusted function the server's operator loaded with ``--plugin module:function``,
    called by name: ``plugin("sae_splice", h, const(k))``. Code never travels."""
    return Expr({"op": "plugin", "name": str(name), "args": [_node(a) for a in args]})


def sae_encode(x, sae: str) -> Expr:
    """The feature activations [..., d_sae] of ``x`` under the SAE the session loaded as
    ``sae`` (``s.load_sae``): ``where(pre > threshold, pre, 0)``, ``pre = (x - b_dec) @ W_enc
    + b_enc``. The server puts the SAE's weights into the rule (checkpoints and files keep them)."""
    return Expr({"op": "sae_encode", "sae": str(sae), "args": [_node(x)]})


def sae_decode(f, sae: str) -> Expr:
    """The SAE's reconstruction ``f @ W_dec + b_dec`` [..., d_in] of features ``f``;
    ``h - sae_decode(sae_encode(h, n), n)`` is its reconstruction error."""
    return Expr({"op": "sae_decode", "sae": str(sae), "args": [_node(f)]})


def _fn(op: str):
    def build(*args) -> Expr:
        if len(args) != OPS[op]:
            raise TypeError(f"dj.ops.{op} takes {OPS[op]} arguments")
        return Expr({"op": op, "args": [_node(a) for a in args]})
    build.__name__ = op
    return build


dot = _fn("dot")            #: (a · b) over the hidden axis, kept as size 1
norm = _fn("norm")          #: the L2 norm over the hidden axis, kept as size 1
sum = _fn("sum")            # noqa: A001  (over the hidden axis, kept)
mean = _fn("mean")          #: mean over the hidden axis, kept as size 1
project = _fn("project")    #: project(a, v): a's component along v (v a vector, or the rows of a matrix)
ablate = _fn("ablate")      #: ablate(a, v): a minus that component
clamp = _fn("clamp")        #: clamp(a, low, high)
where = _fn("where")        #: where(condition, a, b)
minimum = _fn("minimum")
maximum = _fn("maximum")
relu = _fn("relu")
softmax = _fn("softmax")    #: over the hidden axis
topk_mask = _fn("topk_mask")  #: topk_mask(a, k): 1 where a is among its k largest on the hidden axis, else 0
abs = _fn("abs")            # noqa: A001
exp = _fn("exp")
log = _fn("log")
tanh = _fn("tanh")
sigmoid = _fn("sigmoid")
sqrt = _fn("sqrt")
