"""Fast decode: a static KV cache and one CUDA graph per decode step, with the standing
steering rules inside the graph.

Eager Hugging Face decode of a small model is bound by Python and kernel launches, not by
the GPU. When no breakpoint is hot for a step, the step is one ``CUDAGraph.replay()``; a step
that pauses replays one graph per decoder block:

- the run's KV cache moves, once, at its first decode step, from the DynamicCache of the
  prefill into a ``StaticCache`` of a *slot* (the prefill itself stays eager and exact);
- a slot holds the static cache, the persistent input buffers (token id, an all-ones
  attention mask as long as the cache) and the captured graphs, one per *signature* of
  steering rules (the (layer, kind) of each rule that fires on a decode step);
- the graph is captured through the same layer hooks as eager decode: during capture the
  model's hook registry (kernel_server.runtime.hooks) dispatches to a proxy target whose
  ``on_site`` applies each rule's math
  reading persistent device tensors (a scale, a pre-multiplied ``alpha * vector``, a
  ``set`` vector). Moving a slider rewrites those tensors; nothing is re-captured;
- standing expression rules (``kind == "expr"``, kernel_server.model.expressions) are graph
  rules too when every op is a device kernel (``capturable``): their array constants live in
  device buffers of the signature, their numbers are part of it;
- a step with a pause on the residual stream (a breakpoint or ``step()`` target), or a rule
  the graph cannot hold (step-limited, explicit positions, an expression with a plugin or a
  host-made tensor), replays the step *in segments*: one graph per decoder block, captured
  once per slot in one memory pool, with no rules inside; between two segments the run's own
  hook (``hand_over``) sees block i's output where the next segment reads it, applies the
  rules, pauses, and what the client edits is written back into that buffer before the next
  segment replays. The kernels are those of the whole-step graph: a pause with no edit gives
  its bits. Without graphs (``static`` mode, a private slot) the same hand-over runs from the
  hooks of one eager forward;
- a step that needs a hook inside a block (a rule or breakpoint on another site,
  kernel_server.model.sites) runs the ordinary eager forward with the run's own hooks, on
  the same static cache object;
- when the run ends (finished, stopped, aborted, failed) its keys and values are copied
  into a DynamicCache again and the slot goes back to the pool: checkpoints, forks and
  restores of a finished run never see a slot.

On CUDA with Triton, single-query attention is the split-KV kernel of
``kernel_server.model.exact_attention``, which reads only the positions in use and reduces in
a fixed order: fast-mode logits equal the eager DynamicCache ones bit for bit (tested on an
H200: tiny Llama float32, random Llama-1B/7B bfloat16; ``info()["exactness"]`` states it). On
CPU (PyTorch's SDPA over the whole masked slot) and with the float32 math fallback they
match to rounding, not bit for bit. Within fast mode the invariants of the design hold bit for bit:
the eager fallback step on the static cache and the graph replay run the same kernels, and
the in-graph steering math equals ``apply_edit`` exactly (a scale is multiplied in the op's
math type as a Python scalar would be; ``alpha * vector`` is pre-computed by the same
expression).

Every run is bit-reproducible on a GPU as on CPU: a fresh run, a restored checkpoint
and a repeated run give the same logits, in float32 and in bfloat16, because single-query
attention takes a deterministic kernel there (kernel_server/model/exact_attention.py; the fused
SDPA kernels were the cause of a restore-vs-fresh mismatch first blamed on the graphs).

Modes (server option ``--fast-decode``, or $DJINN_FAST_DECODE): ``auto`` (the default) -
CUDA graphs on a CUDA device, off on CPU; ``off`` - every step eager on a DynamicCache;
``static`` - the static cache and the in-graph math without graph capture, on any device
(tests on CPU, debugging).
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger("kernel_server.runtime.fast_decode")

MODES = ("auto", "off", "static")
# auto: graphs on CUDA, CPU unchanged (bench/results/fast_decode_exactness_cuda.json: a
# steering sweep from a checkpoint reproduces fresh generations bit for bit, graphs on or off)
_mode = os.environ.get("DJINN_FAST_DECODE", "auto")
#: static-cache slots per model (each holds one run's KV cache and its own graphs)
MAX_SLOTS = int(os.environ.get("DJINN_FAST_DECODE_SLOTS", "4"))
MIN_BUCKET = 256            # smallest static cache, in positions (sizes are powers of two)
MAX_GRAPHS_PER_SLOT = 8     # rule signatures kept per slot (least recently used dropped)
WARMUP_STEPS = 2            # eager forwards on the capture stream before capturing


def set_mode(mode: str) -> None:
    """Select the fast decode mode for runs started from now on."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"fast decode mode must be one of {', '.join(MODES)}; got {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


def effective_mode(device: torch.device, mode: str | None = None) -> str:
    """``graph``, ``static`` or ``off`` for a model on ``device``."""
    mode = _mode if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"fast decode mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "off":
        return "off"
    if mode == "static":
        return "static"
    return "graph" if torch.device(device).type == "cuda" and torch.cuda.is_available() else "off"


# ---- which steps can run in the graph ------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """How one decode step runs. ``eager`` names the reason it needs the whole forward in
    Python (a hook inside a decoder block); ``segmented`` the reason it replays the graph in
    per-layer segments with the run's own hooks called between them (a pause, or a rule
    the graph cannot hold); both None: one replay of the graph of ``rules``. ``rules`` are
    the rules that graph applies, in order; ``fired`` the rule ids the step record lists
    (as the eager hooks would: by layer, then rule order)."""
    eager: str | None
    rules: tuple = ()
    fired: tuple = ()
    segmented: str | None = None

    @property
    def signature(self) -> tuple:
        return tuple(rule_key(r) for r in self.rules)


def _graphable_vector(vec) -> bool:
    return vec is None or vec.dim() == 1 or (vec.dim() == 2 and vec.shape[0] == 1)


def plan_step(interventions, step: int, position: int, ignore_breakpoints: bool = False,
              step_target: tuple | None = None) -> StepPlan:
    """Decide how decode step ``step`` (its one input token at absolute ``position``) runs.
    Pure host logic on the session's breakpoints and rules."""
    phase = "decode"
    segmented = None
    if step_target is not None and step_target[1] == step:
        segmented = "step() target"
    if not ignore_breakpoints:
        for b in interventions.breakpoints:
            if b.matches(b.layer, step, phase):
                if b.site != "resid":           # a hook inside a block: the eager forward
                    return StepPlan("breakpoint off the residual stream")
                segmented = segmented or "breakpoint"
    rules, fired = [], {}
    for rule in interventions.rules:
        if not rule.matches(rule.layer, step, phase):
            continue
        fired.setdefault(rule.layer, []).append(rule.id)
        if rule.site != "resid" or rule.op.head is not None:
            return StepPlan("rule off the residual stream")   # kernel_server.model.sites: eager hooks
        if rule.op.kind == "expr" and not capturable(rule.op.expr.tree):
            segmented = segmented or "expression the graph cannot hold"
            continue
        if rule.steps is not None:
            segmented = segmented or "step-limited rule"
            continue
        pos = rule.op.positions
        if isinstance(pos, tuple):
            if position in pos:
                segmented = segmented or "rule on explicit positions"
            continue      # else it fires (the record lists it) but selects no row: a no-op
        if not _graphable_vector(rule.op.vector):
            segmented = segmented or "rule vector with several rows"
            continue
        rules.append(rule)
    if segmented is not None:       # the run's hooks apply every rule between the segments
        return StepPlan(None, segmented=segmented)
    return StepPlan(None, tuple(rules), tuple(i for layer in sorted(fired) for i in fired[layer]))


# ---- expressions inside the graph ------------------------------------------------------------
def _is_scalar(node) -> bool:
    """Whether an expression node evaluates to a Python number (no ``h``, no array)."""
    if node["op"] == "const":
        return not isinstance(node["value"], np.ndarray)
    if node["op"] in ("h", "plugin"):
        return False
    return all(_is_scalar(a) for a in node.get("args", []))


def capturable(tree) -> bool:
    """Whether a standing expression can run inside a CUDA graph: every op is a device
    kernel. Not: plugins (any Python), and ops that make a tensor from a Python number on
    the host (``minimum``/``maximum``/``where`` with a number operand, see
    kernel_server.model.expressions._tensors), or a ``topk_mask`` whose k is a tensor.
    Those run between graph segments instead, through the same eager code."""
    op, args = tree["op"], tree.get("args", [])
    if op == "plugin":
        return False
    if op in ("minimum", "maximum") and any(_is_scalar(a) for a in args):
        return False
    if op == "where" and any(_is_scalar(a) for a in args[1:]):
        return False
    if op == "topk_mask" and not _is_scalar(args[1]):
        return False
    return all(capturable(a) for a in args)


def _shape_key(node):
    """An expression tree as a hashable key: the ops, the numbers (a graph bakes a Python
    number in), and the shape of each array constant (its values live in device buffers)."""
    out = []
    for key in sorted(node):
        value = node[key]
        if key == "args":
            value = tuple(_shape_key(a) for a in value)
        elif isinstance(value, np.ndarray):
            value = ("array", tuple(value.shape))
        out.append((key, value))
    return tuple(out)


def rule_key(rule) -> tuple:
    """What a captured graph depends on for ``rule``: its layer and kind (values live in
    device buffers), and for an expression its structure and numbers."""
    if rule.op.kind == "expr":
        expr = rule.op.expr
        key = _expr_keys.get(expr)          # (made once per expression, not once per step)
        if key is None:
            first: dict = {}           # which constants are one array (held once in the graph)
            sharing = tuple(first.setdefault(id(c), i) for i, c in enumerate(expr._consts))
            key = _expr_keys[expr] = (_shape_key(expr.tree), sharing)
        return (rule.layer, "expr") + key
    return (rule.layer, rule.op.kind)


_expr_keys: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# ---- the steering math inside the graph ----------------------------------------------------
def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The type a Python-scalar multiply computes in (float32 for half/bf16/float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RuleBuffers:
    """Persistent device tensors holding the values of a signature's rules, and the proxy
    the capture runs the layer hooks through. ``bind`` writes new values in place.

    An expression rule's buffers are copies of its array constants (and projection bases);
    the graph evaluates the same expression code over them, so its bits are those of the
    eager ``apply_edit`` (its numbers are part of the signature: the graph bakes them in)."""

    def __init__(self, signature: tuple, hidden_size: int, device, dtype, rules=None):
        self.signature = signature
        self.dtype = dtype
        self.buffers = []
        for i, (_, kind, *_) in enumerate(signature):
            if kind == "scale":
                self.buffers.append(torch.ones((), dtype=_opmath(dtype), device=device))
            elif kind == "expr":         # shapes from the rule the signature was made of
                self.buffers.append(_ExprBuffers(rules[i].op.expr, device))
            else:
                self.buffers.append(torch.zeros(hidden_size, dtype=dtype, device=device))
        self.bound: list = [None] * len(signature)
        by_layer: dict = {}
        for (layer, kind, *_), buf in zip(signature, self.buffers):
            by_layer.setdefault(layer, []).append((kind, buf))
        self.by_layer = by_layer
        self.proxy = _SteeringProxy(self)

    def bind(self, rules) -> None:
        """Write the values of ``rules`` (matching the signature) into the buffers; a rule
        already bound (the same frozen object) costs nothing."""
        for i, rule in enumerate(rules):
            if self.bound[i] is rule:
                continue
            op, buf = rule.op, self.buffers[i]
            if op.kind == "scale":
                buf.fill_(op.scale)
            elif op.kind == "expr":
                buf.bind(op.expr)
            else:
                vec = op.vector.to(device=buf.device, dtype=self.dtype)
                if op.kind == "add":
                    vec = op.alpha * vec             # the expression apply_edit computes
                buf.copy_(vec.reshape(-1))
            self.bound[i] = rule

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` with this layer's rules applied, bit for bit as ``apply_edit``."""
        for kind, buf in self.by_layer.get(layer, ()):
            if kind == "scale":
                hidden = (hidden.to(buf.dtype) * buf).to(hidden.dtype)
            elif kind == "add":
                hidden = hidden + buf
            elif kind == "expr":
                hidden = buf.expression(hidden)
            else:
                hidden = buf.expand_as(hidden).clone()
        return hidden


class _ExprBuffers:
    """An expression rule inside a graph: device copies of its array constants and bases
    (one per distinct array: an SAE used twice is held once), and the expression evaluated
    over them (kernel_server.model.expressions' own code)."""

    def __init__(self, expr, device):
        from kernel_server.model.expressions import Expression
        mine: dict = {}
        self.consts = [c if isinstance(c, float) else
                       mine.setdefault(id(c), torch.empty_like(c, device=device)) for c in expr._consts]
        self.bases = [torch.empty_like(b, device=device) for b in expr._bases]
        self.expression = Expression(expr.tree, expr.text, tuple(self.consts), tuple(self.bases))

    def bind(self, expr) -> None:
        done = set()
        for mine, theirs in zip(self.consts, expr._consts):
            if not isinstance(mine, float) and id(mine) not in done:
                mine.copy_(theirs)
                done.add(id(mine))
        for mine, theirs in zip(self.bases, expr._bases):
            mine.copy_(theirs)


class _SteeringProxy:
    """The hook target (kernel_server.runtime.hooks.HookTarget) in place of the run while a graph
    is captured (and in ``static`` mode), so the graph holds the rules' math."""

    hot_sites = frozenset()          # graph steps steer the residual stream only

    def __init__(self, owner: RuleBuffers):
        self._owner = owner
        self.hot_layers = frozenset(owner.by_layer)

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        new = self._owner.apply(layer, hidden)
        return None if new is hidden else new


def hand_over(run, layer: int, boundary: torch.Tensor) -> None:
    """Between two segments of a step: the run's own hook on ``layer`` (its rules, its
    breakpoint: a pause, edits, resume) over the hidden state in ``boundary``, the tensor the
    next segment reads; what the hook returns is written back into it. The run sees a copy,
    so nothing outside holds a tensor of the graph's pool."""
    seen = boundary.clone()
    new = run.on_site(layer, "resid", seen)
    if new is not None:
        boundary.copy_(new)


class _SegmentProxy:
    """The hook target of a segmented step without graphs (static mode, a private slot):
    the run's hooks through ``hand_over``, as the segmented replay calls them."""

    hot_sites = frozenset()

    def __init__(self, run):
        self._run = run

    @property
    def hot_layers(self) -> frozenset:
        return self._run.hot_layers        # live: a pause may add breakpoints or rules

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        hand_over(self._run, layer, hidden)
        return None


class _SegmentCapture:
    """The hook target while a step is captured in segments: at each decoder block's output
    the current graph ends and the next begins (one private memory pool for all of them, so
    the tensors alive across a boundary stay where the next segment reads them)."""

    hot_sites = frozenset()

    def __init__(self, num_layers: int, pool):
        self.hot_layers = frozenset(range(num_layers))
        self.pool = pool
        self.graphs: list = []
        self.boundaries: list = []
        self.open = False

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.graphs.append(graph)
        self.open = True

    def end(self) -> None:
        self.open = False
        self.graphs[-1].capture_end()

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        self.end()
        self.boundaries.append(hidden)
        self.begin()
        return None


# ---- slots: a static cache, its input buffers and its graphs -------------------------------
@dataclass(eq=False)       # compared by identity (holds tensors)
class _Graph:
    buffers: RuleBuffers
    graph: object = None          # torch.cuda.CUDAGraph (None in static mode)
    logits: torch.Tensor | None = None


@dataclass(eq=False)       # compared by identity (holds tensors)
class _Segments:
    """A decode step captured in per-layer segments: ``graphs[i]`` (i < layers) ends with
    block i's output in ``boundaries[i]``; the last one computes ``logits``. No rules inside:
    the run's hooks apply them between segments, as in an eager step."""
    graphs: list
    boundaries: list
    logits: torch.Tensor


@dataclass(eq=False)       # compared by identity (holds tensors)
class Slot:
    cache: object                 # transformers StaticCache
    max_len: int
    ids: torch.Tensor             # [1, 1] input token
    mask: torch.Tensor            # [1, max_len] all ones (the causal part comes from the cache)
    stream: object = None
    graphs: dict = field(default_factory=dict)   # signature -> _Graph (insertion order = LRU)
    busy: bool = False
    initialized: bool = False
    private: bool = False         # not in the pool (all pooled slots busy): no graphs
    segments: _Segments | None = None    # the step in per-layer segments (captured on demand)


    def set_length(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    def drop(self) -> None:
        for g in self.graphs.values():
            if g.graph is not None:
                g.graph.reset()
        self.graphs.clear()
        if self.segments is not None:
            for g in self.segments.graphs:
                g.reset()
            self.segments = None


def _bucket(need: int) -> int:
    size = MIN_BUCKET
    while size < need:
        size *= 2
    return size


class FastDecoder:
    """Per model: whether fast decode works for it, and its pool of slots."""

    def __init__(self, loaded, mode: str):
        self.loaded = loaded
        self.mode = mode                  # "graph" | "static"
        self.unsupported = _unsupported(loaded)
        self.slots: list[Slot] = []
        self.lock = threading.Lock()
        self.graphs_broken: str | None = None   # a capture failed: decode without graphs
        self.stats = {"captures": 0, "capture_failures": 0, "promotions": 0, "no_slot": 0}
        if self.unsupported:
            log.info("fast decode off for %s: %s", loaded.name, self.unsupported)

    def acquire(self, need: int) -> Slot:
        """A static cache of exactly ``_bucket(need)`` positions. Exactly: the masked
        attention reduces over the whole cache, so its length is part of the numbers, and a
        run must not get other logits because a bigger slot happened to be free. A pooled
        slot when one is free or can be made (its graphs are kept); else a private one
        without graphs (the same kernels, eagerly: the same numbers), freed with the run."""
        size = _bucket(need)
        with self.lock:
            free = [s for s in self.slots if not s.busy and s.max_len == size]
            if not free:
                if len(self.slots) >= MAX_SLOTS:
                    idle = [s for s in self.slots if not s.busy]
                    if not idle:
                        self.stats["no_slot"] += 1
                        return self._new_slot(size, private=True)
                    victim = min(idle, key=lambda s: s.max_len)
                    victim.drop()
                    self.slots.remove(victim)
                free = [self._new_slot(size)]
                self.slots.append(free[0])
            slot = free[0]
            slot.busy = True
            return slot

    def release(self, slot: Slot) -> None:
        with self.lock:
            slot.busy = False

    def discard(self, slot: Slot) -> None:
        """Forget ``slot`` (its memory goes back to the allocator)."""
        with self.lock:
            slot.drop()
            if slot in self.slots:
                self.slots.remove(slot)

    def _new_slot(self, max_len: int, private: bool = False) -> Slot:
        """A slot of ``max_len`` positions; a private one is busy already and never captures
        (no capture stream)."""
        from transformers import StaticCache
        loaded = self.loaded
        dev = loaded.device
        cache = StaticCache(config=loaded.model.config, max_cache_len=max_len)
        stream = torch.cuda.Stream(device=dev) if self.mode == "graph" and not private else None
        return Slot(cache, max_len, torch.zeros((1, 1), dtype=torch.long, device=dev),
                    torch.ones((1, max_len), dtype=torch.long, device=dev), stream,
                    busy=private, private=private)


def _unsupported(loaded) -> str | None:
    """Why this model cannot use fast decode (None: it can)."""
    from transformers import DynamicCache, StaticCache
    from transformers.cache_utils import DynamicLayer, StaticLayer
    cfg = loaded.model.config
    if loaded.device_map is not None:    # accelerate hooks, several devices
        return "a model placed by a device map (kernel_server.model.sharding)"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model"
    attn = getattr(cfg, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return f"attention implementation {attn!r} (fast decode supports sdpa and eager)"
    try:
        static = StaticCache(config=cfg, max_cache_len=8)
        dynamic = DynamicCache(config=cfg)
    except Exception as exc:  # an exotic config
        return f"no static cache for this model ({type(exc).__name__}: {exc})"
    if (len(static.layers) != loaded.num_layers or len(dynamic.layers) != loaded.num_layers
            or any(type(layer) is not StaticLayer for layer in static.layers)
            or any(type(layer) is not DynamicLayer for layer in dynamic.layers)):
        return "not a full-attention cache in every layer (sliding window, linear or hybrid)"
    return None


_decoders_lock = threading.Lock()


def decoder_for(loaded, mode: str) -> FastDecoder:
    """The fast decoder of ``loaded`` (``loaded.fast_decoder``) for ``mode``, made on first
    use and made again when the mode changed (idle slots of the old one are dropped)."""
    with _decoders_lock:
        dec = loaded.fast_decoder
        if dec is None or dec.mode != mode:
            if dec is not None:
                for s in dec.slots:
                    if not s.busy:
                        s.drop()
            dec = FastDecoder(loaded, mode)
            loaded.fast_decoder = dec
        return dec


def attach(run):
    """The fast path of a generation run, or None when fast decode is off (the run then
    decodes exactly as before)."""
    mode = effective_mode(run.loaded.device)
    if mode == "off":
        return None
    dec = decoder_for(run.loaded, mode)
    if dec.unsupported:
        return None
    return FastRun(run, dec)


# ---- one run's use of a slot -----------------------------------------------------------------
class FastRun:
    """Drives the decode steps of one GenerationRun on a slot. ``forward`` returns the
    step's logits, or None when the run's ordinary eager path should compute them (the
    prefill, and every step when no slot could be had)."""

    def __init__(self, run, decoder: FastDecoder):
        self.run = run
        self.decoder = decoder
        self.slot: Slot | None = None
        self.disabled: str | None = None
        self.stats = {"graph_steps": 0, "eager_steps": 0, "eager_reasons": {}, "captures": 0,
                      "segmented_steps": 0, "segmented_reasons": {}}

    # called by GenerationRun._decode_loop under the model's compute lock
    def forward(self, next_input: torch.Tensor):
        run = self.run
        if run.step == 0 or self.disabled:
            return None
        position = len(run.tokens) - 1
        plan = plan_step(run.interventions, run.step, position, run.ignore_breakpoints,
                         run.step_target)
        if self.slot is None and not self._promote():
            return None
        slot = self.slot
        slot.ids.copy_(next_input.view(1, 1))
        if plan.eager is not None:
            self._count("eager", plan.eager)
            return self._model(slot)           # the run's own hooks: pauses, edits, rules
        if plan.segmented is not None:
            self._count("segmented", plan.segmented)
            return self._segmented(position)
        entry = self._entry(plan)
        entry.buffers.bind(plan.rules)
        run.add_fired_rules(plan.fired)
        self.stats["graph_steps"] += 1
        if entry.graph is None and self._graphs_allowed():
            self._capture(entry, position)
        if entry.graph is None:                 # static mode: the graph's math, run eagerly
            return self._through_proxy(entry)
        with torch.cuda.device(self.run.loaded.device):
            entry.graph.replay()
        return entry.logits

    def _count(self, what: str, reason: str) -> None:
        reasons = self.stats[f"{what}_reasons"]
        reasons[reason] = reasons.get(reason, 0) + 1
        self.stats[f"{what}_steps"] += 1

    def _graphs_allowed(self) -> bool:
        return (self.decoder.mode == "graph" and not self.slot.private
                and not self.decoder.graphs_broken)

    def _segmented(self, position: int) -> torch.Tensor:
        """A step with a pause (or a rule the graph cannot hold): the step's graph in one
        segment per decoder block, the run's hooks (``hand_over``) called between two
        segments on the blocks it wants; without graphs the same through ``_SegmentProxy``."""
        slot, run = self.slot, self.run
        if slot.segments is None and self._graphs_allowed():
            self._capture_segments(position)
        seg = slot.segments
        if seg is None:
            with run.loaded.hooks.active(_SegmentProxy(run)):
                return self._model(slot)
        last = len(seg.boundaries)
        with torch.cuda.device(run.loaded.device):
            for layer, graph in enumerate(seg.graphs):
                graph.replay()
                if layer < last and layer in run.hot_layers:     # read live: a pause may change it
                    hand_over(run, layer, seg.boundaries[layer])
        return seg.logits

    def _model(self, slot: Slot) -> torch.Tensor:
        loaded = self.run.loaded
        out = loaded.model(input_ids=slot.ids, attention_mask=slot.mask, use_cache=True,
                           logits_to_keep=1, **{loaded.cache_kwarg: slot.cache})
        return out.logits[:, -1, :]

    def _through_proxy(self, entry: _Graph) -> torch.Tensor:
        with self.run.loaded.hooks.active(entry.buffers.proxy):
            return self._model(self.slot)

    def _entry(self, plan: StepPlan) -> _Graph:
        graphs, signature = self.slot.graphs, plan.signature
        entry = graphs.pop(signature, None)
        if entry is None:
            loaded = self.run.loaded
            entry = _Graph(RuleBuffers(signature, loaded.hidden_size, loaded.device, loaded.dtype,
                                       plan.rules))
            while len(graphs) >= MAX_GRAPHS_PER_SLOT:
                old = graphs.pop(next(iter(graphs)))
                if old.graph is not None:
                    old.graph.reset()
        graphs[signature] = entry          # most recently used last
        return entry

    def _capture(self, entry: _Graph, position: int) -> bool:
        """Capture one decode step into ``entry`` (inputs already in the slot). The warm-up
        forwards write this position's keys and values, then the length is rewound; the
        replay that follows writes them again."""
        slot, dec = self.slot, self.decoder
        device = self.run.loaded.device
        current = torch.cuda.current_stream(device)
        try:
            with torch.cuda.device(device):
                slot.stream.wait_stream(current)
                with torch.cuda.stream(slot.stream):
                    for _ in range(WARMUP_STEPS):
                        self._through_proxy(entry)
                        slot.set_length(position)
                current.wait_stream(slot.stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=slot.stream, capture_error_mode="thread_local"):
                    logits = self._through_proxy(entry)
            entry.graph, entry.logits = graph, logits
            dec.stats["captures"] += 1
            self.stats["captures"] += 1
            return True
        except Exception as exc:  # never fail a generation for the fast path: decode eagerly
            return self._capture_failed("CUDA graph", exc, (), position)

    def _capture_segments(self, position: int) -> bool:
        """Capture one decode step in per-layer segments into the slot (no rules inside;
        inputs already in the slot); warm-up and rewind as ``_capture``."""
        slot, dec, loaded = self.slot, self.decoder, self.run.loaded
        device = loaded.device
        current = torch.cuda.current_stream(device)
        plain = RuleBuffers((), loaded.hidden_size, device, loaded.dtype)
        capture = _SegmentCapture(loaded.num_layers, torch.cuda.graph_pool_handle())
        try:
            with torch.cuda.device(device):
                slot.stream.wait_stream(current)
                with torch.cuda.stream(slot.stream):
                    for _ in range(WARMUP_STEPS):
                        with loaded.hooks.active(plain.proxy):
                            self._model(slot)
                        slot.set_length(position)
                current.wait_stream(slot.stream)
                torch.cuda.synchronize(device)
                with torch.cuda.stream(slot.stream):
                    capture.begin()
                    try:
                        with loaded.hooks.active(capture):
                            logits = self._model(slot)
                    finally:
                        if capture.open:
                            capture.end()
            if len(capture.boundaries) != loaded.num_layers:
                raise RuntimeError(f"{len(capture.boundaries)} of {loaded.num_layers} block "
                                   "outputs seen while capturing")
            slot.segments = _Segments(capture.graphs, capture.boundaries, logits)
            dec.stats["captures"] += 1
            self.stats["captures"] += 1
            return True
        except Exception as exc:  # never fail a generation for the fast path: decode eagerly
            return self._capture_failed("segmented CUDA graph", exc, capture.graphs, position)

    def _capture_failed(self, what: str, exc: Exception, graphs, position: int) -> bool:
        """After a failed capture of ``what``: the model's decoder decodes without graphs
        from now on (``graphs_broken`` says why), the ``graphs`` made so far are reset, the
        device is waited for and the slot's length rewound to ``position``. False."""
        dec, loaded = self.decoder, self.run.loaded
        dec.stats["capture_failures"] += 1
        dec.graphs_broken = f"{type(exc).__name__}: {exc}"
        log.warning("%s capture failed for %s, decoding without graphs: %s: %s", what,
                    loaded.name, type(exc).__name__, exc)
        for graph in graphs:
            try:
                graph.reset()
            except Exception:   # (a graph whose capture never ended)
                pass
        torch.cuda.synchronize(loaded.device)
        self.slot.set_length(position)
        return False

    def _promote(self) -> bool:
        """Move the run's DynamicCache into a free slot's static cache."""
        run = self.run
        length = len(run.tokens) - 1
        need = length + (run.config.max_new_tokens - run.step)
        slot = self.decoder.acquire(need)
        try:
            layers = list(run.cache.layers)
            for i, (src, dst) in enumerate(zip(layers, slot.cache.layers)):
                keys, values = src.keys, src.values
                if not slot.initialized:
                    dst.lazy_initialization(keys[:, :, :1], values[:, :, :1])
                dst.keys[:, :, :length].copy_(keys)
                dst.values[:, :, :length].copy_(values)
                dst.keys[:, :, length:].zero_()
                dst.values[:, :, length:].zero_()
            slot.initialized = True
            slot.set_length(length)
        except torch.cuda.OutOfMemoryError:
            # no room for this static cache: drop the slot, decode this run eagerly
            self.decoder.discard(slot)
            torch.cuda.empty_cache()
            self.disabled = "out of GPU memory for a static cache"
            log.warning("fast decode: %s (%d positions); decoding eagerly", self.disabled, slot.max_len)
            return False
        except BaseException:
            self.decoder.release(slot)
            raise
        self.slot = slot
        run.cache = slot.cache
        self.decoder.stats["promotions"] += 1
        return True

    def close(self) -> None:
        """Give the slot back; the run keeps its keys and values in a DynamicCache (cut to
        the token boundary, as a checkpoint would)."""
        slot = self.slot
        if slot is None:
            return
        self.slot = None
        run = self.run
        try:
            from transformers import DynamicCache
            from transformers.cache_utils import DynamicLayer
            length = len(run.tokens) - 1 if run.step > 0 else 0
            cache = DynamicCache(config=run.loaded.model.config)
            if length > 0:
                for i, src in enumerate(slot.cache.layers):
                    keys = src.keys[:, :, :length].clone()
                    values = src.values[:, :, :length].clone()
                    layer = cache.layers[i] if i < len(cache.layers) else None
                    if type(layer) is DynamicLayer and not layer.is_initialized:
                        layer.lazy_initialization(keys, values)
                        layer.keys, layer.values = keys, values
                    else:
                        cache.update(keys, values, i)
            run.cache = cache
        except Exception as exc:  # keep the server up; this run's cache is lost
            log.error("fast decode: could not move the KV cache out of its slot: %s", exc)
            run.cache = None
        finally:
            self.decoder.release(slot)
