"""Edits of a hidden state: breakpoints, standing steering rules, and the one function
that applies an edit (so a paused ``edit()`` and a standing ``steer()`` agree bit for bit)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch

Positions = Union[str, tuple]  # "all" | "last" | tuple of absolute token positions


@dataclass(frozen=True)
class EditOp:
    """h <- scale*h, h <- h + alpha*vector, h <- vector, or h <- expr(h), on chosen positions."""
    kind: str                      # "scale" | "add" | "set" | "expr"
    scale: float = 1.0
    alpha: float = 1.0
    vector: torch.Tensor | None = None   # [hidden] or [n_positions, hidden], on the model device
    positions: Positions = "all"
    head: int | None = None        # heads site: edit only this head (vector is [head_dim])
    head_dim: int = 0
    expr: object = None            # kind "expr": a kernel_server.model.expressions.Expression

    def describe(self) -> dict:
        d = {"op": self.kind, "positions": list(self.positions) if isinstance(self.positions, tuple)
             else self.positions}
        if self.head is not None:
            d["head"] = self.head
        if self.kind == "scale":
            d["scale"] = self.scale
        if self.kind == "add":
            d["alpha"] = self.alpha
        if self.vector is not None:
            d["vector_shape"] = list(self.vector.shape)
        if self.expr is not None:
            d["expr"] = self.expr.describe()
        return d


@dataclass(frozen=True)
class Breakpoint:
    layer: int
    phase: str = "decode"             # "prefill" | "decode" | "both"
    steps: frozenset | None = None    # None: every step of that phase
    site: str = "resid"               # see kernel_server.model.sites

    def matches(self, layer: int, step: int, phase: str) -> bool:
        return (layer == self.layer and self.phase in (phase, "both")
                and (self.steps is None or step in self.steps))

    def describe(self) -> dict:
        return {"layer": None if self.layer < 0 else self.layer, "site": self.site,
                "phase": self.phase, "steps": None if self.steps is None else sorted(self.steps)}


@dataclass(frozen=True)
class SteeringRule:
    layer: int
    op: EditOp
    phase: str = "both"
    steps: frozenset | None = None
    id: int = 0
    site: str = "resid"
    rows: tuple | None = None         # batched generation: only these rows (None: all)

    def matches(self, layer: int, step: int, phase: str) -> bool:
        return (layer == self.layer and self.phase in (phase, "both")
                and (self.steps is None or step in self.steps))

    def describe(self) -> dict:
        return {"id": self.id, "layer": None if self.layer < 0 else self.layer, "site": self.site,
                "rows": None if self.rows is None else list(self.rows),
                "phase": self.phase,
                "steps": None if self.steps is None else sorted(self.steps), **self.op.describe()}


@dataclass
class Interventions:
    """The breakpoints and steering rules of one session."""
    breakpoints: list[Breakpoint] = field(default_factory=list)
    rules: list[SteeringRule] = field(default_factory=list)


def apply_rule(hidden: torch.Tensor, rule: SteeringRule, start: int) -> torch.Tensor:
    """``apply_edit`` of a rule's op on the rows (batch entries) the rule names."""
    if rule.rows is None:
        return apply_edit(hidden, rule.op, start)
    index = [r for r in rule.rows if r < hidden.shape[0]]
    if not index:
        return hidden
    out = hidden.clone()
    out[index] = apply_edit(hidden[index], rule.op, start)
    return out


def select_rows(positions: Positions, start: int, length: int) -> tuple[list[int], list[int]] | None:
    """Which rows of a chunk of ``length`` positions starting at absolute ``start`` that
    ``positions`` names, as (row indices, indices into ``positions``); None means every row."""
    if positions == "all":
        return None
    if positions == "last":
        return [length - 1], [0]
    picked = [(p - start, i) for i, p in enumerate(positions) if start <= p < start + length]
    return [r for r, _ in picked], [i for _, i in picked]


def apply_edit(hidden: torch.Tensor, op: EditOp, start: int) -> torch.Tensor:
    """``hidden`` [batch, positions, hidden] with ``op`` applied; a new tensor, input untouched.

    ``start`` is the absolute position of row 0 (0 in the prefill, the context length
    minus one in a decode step). A vector is [hidden] (broadcast) or one row per
    selected position. With ``op.head`` set, ``hidden`` is [batch, positions, heads *
    head_dim] and only that head's slice is edited (the vector is then [head_dim])."""
    if op.head is not None:
        from dataclasses import replace
        b, n, width = hidden.shape
        x = hidden.reshape(b, n, width // op.head_dim, op.head_dim)
        sub = x[:, :, op.head, :]
        part = apply_edit(sub, replace(op, head=None), start)
        if part is sub:
            return hidden
        out = x.clone()
        out[:, :, op.head, :] = part
        return out.reshape(b, n, width)
    selection = select_rows(op.positions, start, hidden.shape[1])
    vec = None if op.vector is None else op.vector.to(device=hidden.device, dtype=hidden.dtype)
    if selection is None:
        if op.kind == "expr":
            return op.expr(hidden)
        if op.kind == "scale":
            return hidden * op.scale
        if op.kind == "add":
            return hidden + op.alpha * vec
        return vec.expand_as(hidden).clone()
    rows, picks = selection
    if not rows:
        return hidden
    if vec is not None and vec.dim() == 2:
        vec = vec[torch.tensor(picks, device=vec.device)]
    out = hidden.clone()
    index = torch.tensor(rows, device=hidden.device)
    part = out[:, index, :]
    if op.kind == "expr":
        part = op.expr(part)
    elif op.kind == "scale":
        part = part * op.scale
    elif op.kind == "add":
        part = part + op.alpha * vec
    else:
        part = vec.expand_as(part)
    out[:, index, :] = part
    return out
