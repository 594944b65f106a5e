"""Standing rules of every row of a lane as device buffers: what a lane's CUDA graph (and,
without graphs, its eager forward) applies at each hooked site, row by row.

A *program* lists, per (layer, site), the slots the step applies in order: ``scale``,
``add``, ``set`` (shared by all rows: each row has its own value and its own on/off flag)
and ``expr`` (one row's expression, evaluated on that row's slice with its constants in
buffers). A row's rules at a site must map onto the program's slots in order (a
subsequence); a slot the row does not use, or a rule that does not fire on this step
(step-limited, explicit positions, another phase), has its flag off and leaves the row's
bits untouched (``torch.where``, never a multiply by 1 or an add of 0: -0.0 stays -0.0).

Bit for bit as the eager hooks (``apply_edit`` on the row's [1, 1, width] slice): the
elementwise ops are the same per element whatever the batch; a scale is multiplied in
float32 as a Python scalar is; ``alpha * vector`` is pre-computed by the same expression;
an expression runs on the row's own slice (a [1, 1, width] copy), with its constants'
values copied into buffers (floats stay Python floats: they are part of the program).

Moving a slider (a new rule with the same kinds) rewrites buffers only; a new kind of rule
makes a new program (a new graph, captured once, kept per lane).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

log = logging.getLogger("kernel_server.runtime.lane_rules")

#: sites whose rules can run inside a lane step (the block output and the two sub-block
#: outputs: [rows, 1, hidden] tensors); heads and module:<path> rules take their own step
GRAPH_SITES = ("attn", "mlp", "resid")
PHASE = "decode"


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- which rules a lane step can apply -----------------------------------------------------
def expr_key(tree) -> tuple:
    """The structure of an expression tree: its ops, its float constants and the shapes of
    its array constants (their values live in buffers)."""
    if isinstance(tree, dict):
        return tuple(sorted((k, expr_key(v)) for k, v in tree.items()))
    if isinstance(tree, (list, tuple)):
        return tuple(expr_key(v) for v in tree)
    if isinstance(tree, np.ndarray):
        return ("array", tree.shape)
    if isinstance(tree, torch.Tensor):
        return ("tensor", tuple(tree.shape))
    return (type(tree).__name__, tree)


def _uses_plugin(tree) -> bool:
    if isinstance(tree, dict):
        return tree.get("op") == "plugin" or any(_uses_plugin(a) for a in tree.get("args", []))
    return False


def slot_kind(rule, row: int) -> tuple | None:
    """The program slot ``rule`` needs in lane row ``row``, or None when a lane step cannot
    apply it (the step then runs outside the batch, with the run's own hooks)."""
    op = rule.op
    if rule.site not in GRAPH_SITES or op.head is not None:
        return None
    if op.kind == "expr":
        if _uses_plugin(op.expr.tree):
            return None
        return ("expr", row, expr_key(op.expr.tree))
    if op.kind not in ("scale", "add", "set"):
        return None
    vec = op.vector
    if vec is not None and not (vec.dim() == 1 or (vec.dim() == 2 and vec.shape[0] == 1)):
        return None            # one row per position: only explicit positions pick one
    return (op.kind,)


def fires(rule, step: int, position: int) -> bool:
    """Whether ``rule`` edits decode step ``step`` whose one position is ``position``."""
    if not rule.matches(rule.layer, step, PHASE):
        return False
    if rule.rows is not None and 0 not in rule.rows:
        return False           # (a single run is row 0 of its own hidden state)
    pos = rule.op.positions
    return not isinstance(pos, tuple) or position in pos


def _subsequence_map(seq: list, program: tuple) -> list | None:
    """Indices of ``program`` that ``seq`` maps onto in order (greedy), or None."""
    out, j = [], 0
    for kind in seq:
        while j < len(program) and program[j] != kind:
            j += 1
        if j == len(program):
            return None
        out.append(j)
        j += 1
    return out


def _merge(a: tuple, b: list) -> tuple:
    """A shortest common supersequence of ``a`` and ``b`` (tiny: a site's rules)."""
    n, m = len(a), len(b)
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            if i == n or j == m:
                best[i][j] = (n - i) + (m - j)
            elif a[i] == b[j]:
                best[i][j] = 1 + best[i + 1][j + 1]
            else:
                best[i][j] = 1 + min(best[i + 1][j], best[i][j + 1])
    out, i, j = [], 0, 0
    while i < n or j < m:
        if i < n and j < m and a[i] == b[j]:
            out.append(a[i]); i += 1; j += 1
        elif j == m or (i < n and best[i + 1][j] <= best[i][j + 1]):
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return tuple(out)


def row_sequences(run, row: int) -> dict | None:
    """(layer, site) -> [(slot kind, rule)] of ``run``'s graphable rules in lane row ``row``
    (every decode rule, firing on this step or not), or None when a rule that fires on
    this step (``run.step``) cannot run in a lane step."""
    position = len(run.tokens) - 1
    out: dict = {}
    for rule in run.interventions.rules:
        if rule.phase not in (PHASE, "both"):
            continue
        kind = slot_kind(rule, row)
        if kind is None:
            if fires(rule, run.step, position):
                return None
            continue           # it does not fire now: no slot, nothing to apply
        out.setdefault((rule.layer, rule.site), []).append((kind, rule))
    return out


def build_program(needs: list) -> tuple:
    """The program covering every row's sequences: ((layer, site), (kind, ...)) sorted."""
    program: dict = {}
    for seqs in needs:
        for key, seq in seqs.items():
            kinds = [k for k, _ in seq]
            have = program.get(key, ())
            if _subsequence_map(kinds, have) is None:
                program[key] = _merge(have, kinds)
    return tuple(sorted(program.items()))


def covers(program: tuple, needs: list) -> bool:
    slots = dict(program)
    return all(_subsequence_map([k for k, _ in seq], slots.get(key, ())) is not None
               for seqs in needs for key, seq in seqs.items())


# ---- the buffers of one program --------------------------------------------------------------
class _Slot:
    def __init__(self, kind: tuple, rows: int, width: int, device, dtype):
        self.kind = kind
        self.flag = torch.zeros(rows, dtype=torch.bool, device=device)
        self.flag_host = [False] * rows
        self.bound: list = [None] * rows           # the rule whose values a row holds
        self.scale = self.vector = self.expr = None
        if kind[0] == "scale":
            self.scale = torch.ones(rows, dtype=_opmath(dtype), device=device)
        elif kind[0] in ("add", "set"):
            self.vector = torch.zeros((rows, width), dtype=dtype, device=device)
        self.expr_rule = None
        self.consts: list = []
        self.bases: list = []

    # an expression slot belongs to one row; its constants live in buffers of their shapes
    def bind_expr(self, rule, device, dtype) -> None:
        expr = rule.op.expr
        if self.expr is None:
            self.consts = [c if isinstance(c, float) else torch.empty_like(c, device=device, dtype=dtype)
                           for c in expr._consts]
            self.bases = [torch.empty_like(b, device=device, dtype=dtype) for b in expr._bases]
            self.expr = dataclasses.replace(expr, _consts=tuple(self.consts), _bases=tuple(self.bases))
        for dst, src in zip(self.consts, expr._consts):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src.to(device=device, dtype=dtype))
        for dst, src in zip(self.bases, expr._bases):
            dst.copy_(src.to(device=device, dtype=dtype))


class ProgramBuffers:
    """The device buffers of a program and the hook target that applies them (the capture
    and the eager lane step run the model's hooks through ``proxy``)."""

    def __init__(self, program: tuple, rows: int, width: int, device, dtype):
        self.program = program
        self.rows = rows
        self.device, self.dtype = device, dtype
        self.sites: dict = {}
        for key, kinds in program:
            self.sites[key] = [_Slot(kind, rows, width, device, dtype) for kind in kinds]
        self.proxy = _ProgramProxy(self)

    def _mapped(self, seqs: dict, strict: bool = True):
        for key, slots in self.sites.items():
            seq = seqs.get(key, [])
            mapped = _subsequence_map([k for k, _ in seq], tuple(s.kind for s in slots))
            if mapped is None:
                if strict:
                    raise RuntimeError(f"lane program {key}: {tuple(s.kind for s in slots)} "
                                       f"does not cover a row's rules {[k for k, _ in seq]}")
                mapped = []
            used = dict(zip(mapped, (rule for _, rule in seq)))
            yield key, [(slot, used.get(i)) for i, slot in enumerate(slots)]

    def prepare(self, row: int, seqs: dict) -> None:
        """Write the values of row ``row``'s rules (an expression slot gets its buffered
        expression: a graph captured now holds it), flags untouched. ``seqs`` may be newer
        than the program (the row's run asking for its next step meanwhile, in its own
        thread): what the program does not cover is left for that step's own program."""
        for _, pairs in self._mapped(seqs, strict=False):
            for slot, rule in pairs:
                if rule is not None and slot.bound[row] is not rule:
                    self._write(slot, row, rule)

    def bind(self, row: int, seqs: dict, step: int, position: int) -> list:
        """Write row ``row``'s rule values and this step's flags; returns the ids of the rules
        that fire (as the eager hooks list them: by layer, sub-block sites before the block
        output, then rule order)."""
        fired = []
        for key, pairs in self._mapped(seqs):
            for slot, rule in pairs:
                on = rule is not None and fires(rule, step, position)
                if rule is not None and rule.matches(rule.layer, step, PHASE):
                    fired.append((key[0], GRAPH_SITES.index(key[1]), rule.id))
                if rule is not None and slot.bound[row] is not rule:
                    self._write(slot, row, rule)
                if slot.flag_host[row] != on:
                    slot.flag_host[row] = on
                    slot.flag[row] = on
        return [rid for _, _, rid in sorted(fired)]

    def _write(self, slot: _Slot, row: int, rule) -> None:
        op = rule.op
        if slot.kind[0] == "scale":
            slot.scale[row] = op.scale
        elif slot.kind[0] == "expr":
            slot.bind_expr(rule, self.device, self.dtype)
        else:
            vec = op.vector.to(device=self.device, dtype=self.dtype).reshape(-1)
            if op.kind == "add":
                vec = op.alpha * vec               # the expression apply_edit computes
            slot.vector[row].copy_(vec)
        slot.bound[row] = rule

    def apply(self, key: tuple, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [rows, 1, width] with the slots of ``key`` applied row by row."""
        for slot in self.sites.get(key, ()):
            kind = slot.kind[0]
            flag = slot.flag.view(-1, 1, 1)
            if kind == "scale":
                new = (hidden.to(slot.scale.dtype) * slot.scale.view(-1, 1, 1)).to(hidden.dtype)
            elif kind == "add":
                new = hidden + slot.vector.unsqueeze(1)
            elif kind == "set":
                new = slot.vector.unsqueeze(1).expand_as(hidden)
            elif slot.expr is None:
                continue           # (no rule ever bound to it: its flag is off)
            else:
                row = slot.kind[1]
                part = slot.expr(hidden[row:row + 1].clone())
                new = hidden.clone()
                new[row:row + 1] = part
            hidden = torch.where(flag, new, hidden)
        return hidden


class _ProgramProxy:
    """The hook target of a batched lane step (kernel_server.runtime.hooks.HookTarget)."""

    def __init__(self, owner: ProgramBuffers):
        self._owner = owner
        self.hot_layers = frozenset(layer for (layer, site) in owner.sites if site == "resid")
        self.hot_sites = frozenset(key for key in owner.sites if key[1] != "resid")

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        new = self._owner.apply((layer, site), hidden)
        return None if new is hidden else new


# ---- can an expression be captured? -------------------------------------------------------
def expression_capturable(expr, width: int, device, dtype) -> str | None:
    """None when evaluating ``expr`` on a [1, 1, width] tensor can be captured in a CUDA
    graph (probed once on a side stream), else why not. Its rows then step outside the
    batch with the same bits."""
    h = torch.zeros((1, 1, width), dtype=dtype, device=device)
    stream = torch.cuda.Stream(device=device)
    try:
        with torch.cuda.device(device):
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                expr(h)                              # (warm-up: lazy inits outside the capture)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                expr(h)
        graph.reset()
        return None
    except Exception as exc:         # any failure: the expression runs outside the batch
        torch.cuda.synchronize(device)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
