"""The decode scheduler of a loaded model: one loop that runs the decode steps of every
active generation on the model (any client, any session) as rows of one batched step.

Exactness first. Every decode step of the engine runs in one fixed shape: ``ROWS`` rows
(a solo session too: the rows nobody uses are padding) over a *lane*, a key/value store
of ``ROWS`` rows by ``max_len`` positions, ``max_len`` chosen from the session's own
need only (prompt + max_new_tokens, rounded up to a power of two as fast decode's slots
are). Each row keeps its own positions from 0 (its own write position, its own position
ids, its own mask), so a row's numbers never depend on which row it sits in, who else is
in the lane or when they joined or left: no kernel sees another shape, and no reduction
sees the row's values at another offset (on CUDA the decode attention is the split-KV
kernel of kernel_server/model/exact_attention.py, batch-invariant; inside a lane step it
reads each row's attended range from the step's inputs and walks only that range's blocks,
so padding rows cost next to nothing; the norms of Llama-like models run as one per-row
Triton kernel, kernel_server/model/lane_kernels.py; on CPU the lane's attention runs row by
row, ``exact_attention.rows_apart``). What the fixed shape costs a solo session is measured
in bench/tenants_bench.py end to end and broken down by bench/tenants_profile.py (H200,
random Llama-7B bf16: the 8-row lane graph replays in 0.92x the time of the 1-row
fast-decode graph, 6.24 vs 6.76 ms: the fused norms more than pay for the 8 rows).

Who runs where:
- the prefill of a joining session runs eagerly in its own worker (the ordinary
  DynamicCache path) under the model's compute lock; a prompt longer than
  ``PREFILL_CHUNK`` tokens runs in chunks of that size with one batched step of the
  running rows between two chunks (``DecodeScheduler.prefill``), so it stalls them for one
  chunk, not one prompt. The chunking depends on the prompt alone: a session's bits never
  depend on who else runs (its solo run on the engine is chunked the same way);
- then the session *joins* a lane row (its keys and values copied in) and each decode
  step is a request to the scheduler; once every row expected in the batch has asked,
  the scheduler's loop thread runs one step for all of them (a session alone runs it in
  its own worker, no hand-off: the same program and shape): on CUDA the replay of
  the lane's CUDA graph for its *program* of rules, without graphs the same forward run
  eagerly. Each row's standing rules (scale / add / set at resid, attn and mlp,
  step-limited, on explicit positions, and expressions) live in per-row device buffers
  (kernel_server/runtime/lane_rules.py): a ``steer()`` that changes values rewrites its
  row's buffers, only a new kind of rule makes a new program (captured once per lane);
- a step that may pause (a breakpoint or ``step()`` target on it), or that has a rule a
  lane program cannot apply (a heads or ``module:`` site, a plugin, an expression that
  cannot be captured, a vector per position), runs *outside* the batch, in the session's
  own worker, as an eager forward of the same fixed shape on the same lane that writes
  only the session's row (padding rows write a scratch column): the session's hooks see
  its row, it pauses, edits and resumes as always, and its row gets the bits the batch
  would have given it. While it is paused (compute lock released) the others go on;
- when the run ends its row's keys and values move back into a DynamicCache and the row
  is free (checkpoints, forks and restores of a finished run never see a lane).

Modes (``set_mode`` / $DJINN_TENANTS): ``off`` (the default: every run decodes on its own,
as before; see README "Sharing one GPU" for why) and ``on``.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch

from kernel_server.model import exact_attention, lane_kernels
from kernel_server.runtime.lane_rules import (ProgramBuffers, build_program, covers,
                                              expression_capturable, row_sequences)

log = logging.getLogger("kernel_server.runtime.scheduler")

MODES = ("off", "on")
_mode = os.environ.get("DJINN_TENANTS", "off")
#: rows of every batched decode step (the fixed batch shape)
ROWS = int(os.environ.get("DJINN_TENANT_ROWS", "8"))
#: capture each lane program's batched step in a CUDA graph (on CUDA; "0": eager lane steps)
GRAPHS = os.environ.get("DJINN_TENANT_GRAPHS", "1") != "0"
MAX_PROGRAMS_PER_LANE = 8   # rule programs (each its buffers and graph) kept per lane
WARMUP_STEPS = 2            # eager forwards on the capture stream before capturing
#: a joining run's prompt is prefilled in chunks of this many tokens, each under the compute
#: lock, with the running rows' decode steps between them ("0": one forward, as before).
#: An eager forward of a 7B model on an H200 costs ~25 ms of kernel launches whatever its
#: length up to ~1k tokens (a 256-token chunk 23 ms, 900 tokens in one forward 28 ms:
#: bench/results/tenants_profile_cuda.json), so shorter chunks cut no stall, they only
#: slow the joiner down
PREFILL_CHUNK = int(os.environ.get("DJINN_PREFILL_CHUNK", "1024"))
PREFILL_YIELD_S = 5.0       # hang guard only: how long a chunk waits for the others' step
#: a member alone in the scheduler runs its batched step in its own thread ("0": always
#: hand the step to the loop thread)
INLINE_SOLO = os.environ.get("DJINN_TENANT_INLINE", "1") != "0"


def set_mode(mode: str) -> None:
    """Select whether runs started from now on decode through the scheduler."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"tenants mode must be one of {', '.join(MODES)}; got {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


_schedulers_lock = threading.Lock()


def scheduler_for(loaded) -> "DecodeScheduler | None":
    """The scheduler of ``loaded`` (``loaded.decode_scheduler``), made on first use; None
    when the engine is off or cannot serve this model (why: ``unsupported``)."""
    if _mode != "on":
        return None
    with _schedulers_lock:
        sched = getattr(loaded, "decode_scheduler", None)
        if sched is None:
            sched = DecodeScheduler(loaded, ROWS)
            loaded.decode_scheduler = sched
    return None if sched.unsupported else sched


def _bucket(need: int) -> int:
    from kernel_server.runtime.fast_decode import _bucket as bucket
    return bucket(need)


# ---- the key/value store of a lane, and the cache object one forward sees -----------------
def _row_layer(keys: torch.Tensor, values: torch.Tensor):
    """One layer of one row as a checkpoint reads it: a StaticLayer whose ``keys`` and
    ``values`` [1, heads, positions, dim] are views into the lane (kv_slices cuts them)."""
    from transformers.cache_utils import StaticLayer
    layer = StaticLayer(max_cache_len=keys.shape[-2])
    layer.keys, layer.values = keys, values
    layer.is_initialized = True
    return layer


class RowCache:
    """A run's cache while it holds a lane row: what ``run.cache`` is then (a checkpoint
    taken while paused reads ``layers``)."""

    def __init__(self, lane: "Lane", row: int):
        self.layers = [_row_layer(k[row:row + 1], v[row:row + 1])
                       for k, v in zip(lane.keys, lane.values)]


class _StepCache:
    """The cache argument of one lane forward: ``update`` writes every row's new keys and
    values at that row's write position (a padding row writes the scratch column) and
    returns the whole lane. No host value is read: a CUDA graph captures it."""

    def __init__(self, lane: "Lane", write: torch.Tensor):
        self.lane = lane
        # (row, head) -> the flat index of the row's write position in a [rows * heads *
        # width, dim] view: one index_copy_ per layer, as a static cache writes (an index_put
        # over (row, position) pairs took 1.6x its GPU time on the H200, tenants_profile)
        self.flat = {heads: (base + write[:, None]).reshape(-1)
                     for heads, base in lane.flat_base.items()}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        lane = self.lane
        keys, values = lane.keys[layer_idx], lane.values[layer_idx]
        rows, heads, _, dim = keys.shape
        flat = self.flat[heads]
        keys.view(-1, dim).index_copy_(0, flat, key_states.reshape(rows * heads, dim).to(keys.dtype))
        values.view(-1, values.shape[-1]).index_copy_(
            0, flat, value_states.reshape(rows * heads, values.shape[-1]).to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0          # never used: the lane forward passes position ids and a 4-D mask


@dataclass(eq=False)      # compared by identity (holds tensors)
class _LaneGraph:
    """One program of a lane: its rule buffers and, on CUDA, its captured step."""
    buffers: ProgramBuffers
    graph: object = None          # torch.cuda.CUDAGraph (None: the step runs eagerly)
    logits: torch.Tensor | None = None


class Lane:
    """``rows`` rows of keys and values, ``max_len`` positions each (plus one scratch
    column that padding rows write to), per layer; the static inputs of a batched step;
    the programs (rule buffers, graphs) captured for it."""

    def __init__(self, loaded, rows: int, max_len: int, like: list):
        self.loaded = loaded
        self.rows = rows
        self.max_len = max_len
        self.scratch = max_len          # the column padding rows write and attend to
        lane_kernels.install(loaded.model)      # (once per model: the norms of lane steps)
        width = max_len + 1
        self.keys, self.values = [], []
        for k, v in like:         # (keys, values) [1, heads, n, dim] of a joining run
            self.keys.append(torch.zeros((rows, k.shape[1], width, k.shape[3]),
                                         dtype=k.dtype, device=k.device))
            self.values.append(torch.zeros((rows, v.shape[1], width, v.shape[3]),
                                           dtype=v.dtype, device=v.device))
        self.members: list = [None] * rows
        device = loaded.device
        self._positions = torch.arange(width, device=device)
        #: kv heads -> [rows, heads] flat index of (row, head, position 0) in a layer
        self.flat_base = {h: (torch.arange(rows, device=device)[:, None] * h
                              + torch.arange(h, device=device)[None, :]) * width
                          for h in sorted({k.shape[1] for k, _ in like})}
        #: a batched step's inputs per row: token id, position id, write position, first
        #: attended position (a CUDA graph reads them here)
        self.inputs = torch.zeros((4, rows), dtype=torch.long, device=device)
        # their host side: pinned, written in place, copied without a host sync; the event
        # says the last copy has left it (checked before the next write)
        cuda = torch.device(device).type == "cuda"
        self._host = torch.zeros((4, rows), dtype=torch.long, pin_memory=cuda)
        self._host_np = self._host.numpy()
        self._copied = torch.cuda.Event() if cuda else None
        eager = getattr(loaded.model.config, "_attn_implementation", None) == "eager"
        self._additive = eager       # eager attention adds its mask; sdpa takes a bool one
        self.programs: dict = {}     # program -> _LaneGraph (insertion order = LRU)
        self.program: tuple | None = None
        self.stream = (torch.cuda.Stream(device=device)
                       if torch.device(device).type == "cuda" else None)

    def free_row(self) -> int | None:
        for r, m in enumerate(self.members):
            if m is None:
                return r
        return None

    def step_inputs(self, rows: dict) -> torch.Tensor:
        """The [4, rows] inputs of a step for ``rows`` (row -> (token id, the row's length
        before the step)) on the host; every other row is padding (token 0 at position 0,
        writing and attending to the scratch column only)."""
        ids, pos = [0] * self.rows, [0] * self.rows
        write, first = [self.scratch] * self.rows, [self.scratch] * self.rows
        for r, (token_id, length) in rows.items():
            ids[r], pos[r], write[r], first[r] = token_id, length, length, 0
        return torch.tensor([ids, pos, write, first], dtype=torch.long)

    def load_inputs(self, rows: dict) -> None:
        """Put ``step_inputs(rows)`` into ``self.inputs`` (what the batched step reads),
        through the pinned host buffer, without waiting for the device."""
        if self._copied is not None:
            self._copied.synchronize()        # (the last step's copy is long done by now)
        host = self._host_np
        host[0:2] = 0
        host[2:4] = self.scratch
        for r, (token_id, length) in rows.items():
            host[0, r], host[1, r], host[2, r], host[3, r] = token_id, length, length, 0
        self.inputs.copy_(self._host, non_blocking=self._copied is not None)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.inputs.device))

    def forward(self, inputs: torch.Tensor, target) -> torch.Tensor:
        """One decode step of shape [rows, 1] from ``inputs`` (``step_inputs`` on the
        device) with the model's hooks dispatched to ``target``; logits [rows, vocab]. A
        batched step reads ``self.inputs`` (captured once per program); a step outside the
        batch passes its own tensor, so a batched step meanwhile cannot change its inputs."""
        loaded = self.loaded
        ids, pos = inputs[0].view(self.rows, 1), inputs[1].view(self.rows, 1)
        write, first = inputs[2], inputs[3]
        ar = self._positions[None, :]
        mask = ((ar >= first[:, None]) & (ar <= write[:, None])).view(self.rows, 1, 1, -1)
        if self._additive:
            mask = torch.zeros(mask.shape, dtype=loaded.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(loaded.dtype).min)
        cache = _StepCache(self, write)
        # each row's attended range (first..write) to the fused attention, which then walks
        # only that range's blocks (the mask says the same positions; the paths without the
        # fused kernel read the mask); the lane's norms by the per-row fused kernel
        with loaded.hooks.active(target), exact_attention.rows_apart(first, write), \
                lane_kernels.fused_norms():
            out = loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: cache})
        return out.logits[:, -1, :]

    def entry(self, program: tuple) -> _LaneGraph:
        """The graph entry of ``program`` (made on first use; least recently used dropped)."""
        entry = self.programs.pop(program, None)
        if entry is None:
            loaded = self.loaded
            entry = _LaneGraph(ProgramBuffers(program, self.rows, loaded.hidden_size,
                                              loaded.device, loaded.dtype))
            while len(self.programs) >= MAX_PROGRAMS_PER_LANE:
                old = self.programs.pop(next(iter(self.programs)))
                if old.graph is not None:
                    old.graph.reset()
        self.programs[program] = entry
        return entry

    def drop(self) -> None:
        for entry in self.programs.values():
            if entry.graph is not None:
                entry.graph.reset()
        self.programs.clear()


# ---- chunked prefill ----------------------------------------------------------------------------
def chunkable(run) -> str | None:
    """Why ``run``'s prefill must run in one forward (None: it may run in chunks). A chunk's
    hooks see [1, chunk, width]; what they do is the same per position only for rules on
    every position with one vector, and no pause: anything else keeps the one forward."""
    if run.step_target is not None and run.step_target[1] == 0:
        return "a step() target in the prefill"
    if not run.ignore_breakpoints and any(b.phase in ("prefill", "both")
                                          for b in run.interventions.breakpoints):
        return "a breakpoint in the prefill"
    for rule in run.interventions.rules:
        if not rule.matches(rule.layer, 0, "prefill"):
            continue
        op = rule.op
        if op.kind not in ("scale", "add", "set") or op.positions != "all":
            return f"prefill rule {rule.id} ({op.kind} on {op.positions!r})"
        if op.vector is not None and not (op.vector.dim() == 1 or op.vector.shape[0] == 1):
            return f"prefill rule {rule.id} has a vector per position"
        if rule.site.startswith("module:"):
            return f"prefill rule {rule.id} on {rule.site}"
    return None


# ---- the hook target of a step outside the batch ---------------------------------------------
class _RowTarget:
    """The run's own hooks (rules, breakpoints, pauses) on its row's slice (a [1, 1, width]
    copy, as a lane program's expression sees it)."""

    def __init__(self, run, row: int):
        self.run, self.row = run, row

    # read through on every hook call: a step() while paused moves the run's hot layers
    @property
    def hot_layers(self) -> frozenset:
        return self.run.hot_layers

    @property
    def hot_sites(self) -> frozenset:
        return self.run.hot_sites

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        r = self.row
        mine = hidden[r:r + 1].clone()
        new = self.run.on_site(layer, site, mine)
        if new is None:
            return None
        out = hidden.clone()
        out[r:r + 1] = new
        return out


# ---- members and the loop ----------------------------------------------------------------------
class Member:
    """A run's hold on a lane row, from its first decode step to its end."""

    def __init__(self, scheduler: "DecodeScheduler", run, lane: Lane, row: int, length: int):
        self.scheduler, self.run, self.lane, self.row = scheduler, run, lane, row
        self.length = length              # positions in the row's cache
        self.done = threading.Event()
        self.logits = None
        self.error: BaseException | None = None
        self.seqs: dict = {}              # this step's rules as lane program slots
        self._own = None                  # logits of a step run outside the batch

    def forward(self, next_input: torch.Tensor) -> torch.Tensor:
        """This step's logits [1, vocab]: in the batch, or outside it when the step may
        pause or has a rule a lane step cannot apply. Called by the run's worker without
        the compute lock; ``next_input`` is ``run.tokens[-1]``."""
        self.scheduler.submit([self])
        return self.collect()

    def own_step(self) -> torch.Tensor:
        """This step outside the batch (same shape, only this row written), with the run's
        own hooks: it may pause; the compute lock is released while it is paused."""
        run, sched = self.run, self.scheduler
        with sched.cond:
            sched.counters["own_steps"] += 1
        with run.loaded.compute_lock:
            inputs = self.lane.step_inputs({self.row: (int(run.tokens[-1]), self.length)})
            logits = self.lane.forward(inputs.to(run.loaded.device),
                                       _RowTarget(run, self.row))[self.row:self.row + 1]
        self.length += 1
        return logits

    def collect(self) -> torch.Tensor:
        """Wait for the step ``DecodeScheduler.submit`` asked for; its logits [1, vocab]."""
        if self._own is not None:
            logits, self._own = self._own, None
            return logits
        self.done.wait()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        self.length += 1
        return self.logits


def needs_own_step(run) -> bool:
    """Whether decode step ``run.step`` may pause (a breakpoint or a ``step()`` target on
    it): it then runs outside the batch with the run's own hooks."""
    target = run.step_target
    if target is not None and target[1] == run.step:
        return True
    if run.ignore_breakpoints:
        return False
    return any(b.matches(b.layer, run.step, "decode") for b in run.interventions.breakpoints)


class DecodeScheduler:
    """Per model: its lanes and the loop thread that runs their batched decode steps."""

    def __init__(self, loaded, rows: int):
        from kernel_server.runtime.fast_decode import _unsupported
        self.loaded = loaded
        self.rows = rows
        self.unsupported = _unsupported(loaded)
        self.lanes: list[Lane] = []
        self.cond = threading.Condition()
        self.pending: dict = {}           # Member -> next input token id
        self.expected: set = set()        # members whose next step is a batch request
        #: event counters (``stats()`` adds the rows held now); updated under ``cond``
        self.counters = {"batched_steps": 0, "rows_stepped": 0, "own_steps": 0, "joins": 0,
                         "max_rows": 0, "graph_steps": 0, "captures": 0, "capture_failures": 0,
                         "prefill_chunks": 0}
        cuda = torch.device(loaded.device).type == "cuda"
        self.use_graphs = cuda and GRAPHS
        self.graphs_broken: str | None = None     # a capture failed: lane steps run eagerly
        self._expr_ok: dict = {}          # expression structure -> None (capturable) or why not
        self._thread: threading.Thread | None = None

    def graphable(self, seqs: dict) -> bool:
        """Whether every expression slot of ``seqs`` can be captured (CPU: always: nothing is
        captured there); probed once per expression structure."""
        if not self.use_graphs:
            return True
        for seq in seqs.values():
            for kind, rule in seq:
                if kind[0] != "expr":
                    continue
                key = kind[2]
                if key not in self._expr_ok:
                    with self.loaded.compute_lock:
                        why = expression_capturable(rule.op.expr, self.loaded.hidden_size,
                                                    self.loaded.device, self.loaded.dtype)
                    if why is not None:
                        log.info("expression %s steps outside the batch: %s",
                                 rule.op.expr.describe()[:120], why)
                    self._expr_ok[key] = why
                if self._expr_ok[key] is not None:
                    return False
        return True

    def submit(self, members: list) -> None:
        """Ask for the next step of each of ``members`` (their runs' last token is the
        input); ``Member.collect`` gets each one's logits. Steps that may pause or have a
        rule a lane step cannot apply run outside the batch, here, one by one; the others
        join the batch together (one batched step for a batch call's rows)."""
        batched = []
        for m in members:
            run = m.run
            seqs = None if needs_own_step(run) else row_sequences(run, m.row)
            if seqs is not None and not self.graphable(seqs):
                seqs = None
            if seqs is None:
                with self.cond:                 # not expected in the batch meanwhile
                    self.expected.discard(m)
                    self.cond.notify_all()
                m._own = m.own_step()
            else:
                m.seqs, m._own = seqs, None
                m.done.clear()
                batched.append(m)
        if not batched:
            return
        with self.cond:
            # nobody else expected and nothing waiting: this thread runs the step itself (no
            # hand-off to the loop thread; the same program, graph and shape, so the same
            # bits). The members stay expected: one who asks meanwhile waits for them
            inline = INLINE_SOLO and not self.pending and self.expected.issubset(batched)
            for m in batched:
                self.expected.add(m)
                if not inline:
                    self.pending[m] = int(m.run.tokens[-1])
            if not inline:
                self.cond.notify_all()
        if inline:
            self._run_batch({m: int(m.run.tokens[-1]) for m in batched})

    # ---- joining and leaving (run workers) ---------------------------------------------
    def join(self, run) -> Member:
        """Give ``run`` (after its prefill, at a token boundary, holding a DynamicCache) a
        lane row: its keys and values are copied in; ``run.cache`` becomes the row."""
        length = len(run.tokens) - 1
        need = length + (run.config.max_new_tokens - run.step)
        size = _bucket(need)
        like = [(layer.keys, layer.values) for layer in run.cache.layers]
        with self.loaded.compute_lock, self.cond:
            lane = next((l for l in self.lanes if l.max_len == size and l.free_row() is not None),
                        None)
            if lane is None:
                lane = Lane(self.loaded, self.rows, size, like)
                self.lanes.append(lane)
            row = lane.free_row()
            for (k, v), dk, dv in zip(like, lane.keys, lane.values):
                dk[row].zero_()
                dv[row].zero_()
                dk[row, :, :length] = k[0]
                dv[row, :, :length] = v[0]
            member = Member(self, run, lane, row, length)
            lane.members[row] = member
            self.counters["joins"] += 1
            self.cond.notify_all()          # (stats() readers waiting for a join)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=f"djinn-scheduler-{self.loaded.name}")
                self._thread.start()
        run.cache = RowCache(lane, row)
        return member

    def leave(self, member: Member) -> None:
        """Free the member's row; its run keeps its keys and values in a DynamicCache."""
        from transformers import DynamicCache
        run, lane, row = member.run, member.lane, member.row
        with self.loaded.compute_lock, self.cond:
            self.expected.discard(member)
            self.pending.pop(member, None)
            length = len(run.tokens) - 1 if run.step > 0 else 0
            cache = DynamicCache(config=self.loaded.model.config)
            for i, (k, v) in enumerate(zip(lane.keys, lane.values)):
                cache.update(k[row:row + 1, :, :length].clone(), v[row:row + 1, :, :length].clone(), i)
            run.cache = cache
            lane.members[row] = None
            if all(m is None for m in lane.members) and sum(
                    1 for l in self.lanes if l.max_len == lane.max_len) > 1:
                self.lanes.remove(lane)         # keep one empty lane per size for the next run
                lane.drop()
            self.cond.notify_all()

    # ---- the loop ------------------------------------------------------------------------
    def _ready(self) -> bool:
        # every member expected in the batch has asked: waiting for the others is only for
        # throughput; whoever runs outside the batch (a pause) is not expected
        return bool(self.pending) and self.expected.issubset(self.pending)

    # ---- prefill (run workers) ---------------------------------------------------------------
    def prefill(self, run, ids: torch.Tensor) -> torch.Tensor | None:
        """The prefill of ``run`` (``ids`` [1, n] its prompt, ``run.cache`` empty) in chunks of
        ``PREFILL_CHUNK`` tokens with the run's hooks, each chunk under the compute lock and,
        between two chunks, one batched step of the running rows: a long prompt stalls them
        for one chunk, not for the whole prompt. The chunking depends on the prompt only
        (never on who else runs), so the run's bits are those of its solo run on the engine.
        Its last position's logits [1, vocab], or None: one forward, the caller's own
        (a prompt of one chunk or less, or ``chunkable`` says why not)."""
        n = ids.shape[1]
        if PREFILL_CHUNK <= 0 or n <= PREFILL_CHUNK or chunkable(run) is not None:
            return None
        loaded = self.loaded
        fired: list = []
        for start in range(0, n, PREFILL_CHUNK):
            if start:
                self._yield_to_decode()
            end = min(n, start + PREFILL_CHUNK)
            with loaded.compute_lock, loaded.hooks.active(run):
                run._fired_rules = []
                out = loaded.model(input_ids=ids[:, start:end],
                                   attention_mask=torch.ones((1, end), dtype=torch.long, device=ids.device),
                                   use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: run.cache})
                fired += run._fired_rules
            with self.cond:
                self.counters["prefill_chunks"] += 1
        run._fired_rules = list(dict.fromkeys(fired))     # each rule once, as in one forward
        return out.logits[:, -1, :]

    def _yield_to_decode(self) -> None:
        """Wait for one batched step when some row expects one (between two prefill chunks)."""
        with self.cond:
            if not self.expected:
                return
            target = self.counters["batched_steps"] + 1
            self.cond.wait_for(lambda: self.counters["batched_steps"] >= target or not self.expected,
                               timeout=PREFILL_YIELD_S)

    def stats(self) -> dict:
        """Rows held now (``rows_active`` stepping, ``rows_paused`` at a pause) and the
        counters: ``steps`` decode steps run (batched + outside the batch), ``tokens`` decode
        tokens they made (prefill not counted), and the event counters. Cheap, any thread."""
        with self.cond:
            members = [m for lane in self.lanes for m in lane.members if m is not None]
            c = dict(self.counters)
        paused = sum(1 for m in members if m.run.pause is not None)
        return {"rows_active": len(members) - paused, "rows_paused": paused,
                "steps": c["batched_steps"] + c["own_steps"],
                "tokens": c["rows_stepped"] + c["own_steps"], **c}

    def _loop(self) -> None:
        # (a variant where the *last* member to ask ran every step in its own thread
        # measured slower with 8 clients on the H200, 311 vs 390 tokens/s:
        # docs/results/gpu_runs/2026-11-30_h200_tenants_inline_variant.log; only a member
        # alone runs its step inline now, ``submit``)
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self._ready():
                        self.cond.wait()
                    batch, self.pending = self.pending, {}
                self._run_batch(batch)

    def _run_batch(self, batch: dict) -> None:
        """One batched step per lane for the members of ``batch`` (Member -> token id)."""
        by_lane: dict = {}
        for member in batch:
            by_lane.setdefault(member.lane, {})[member.row] = member
        for lane, members in by_lane.items():
            try:
                with self.loaded.compute_lock:
                    logits = self._step(lane, members, batch)
                for r, m in members.items():
                    m.logits = logits[r:r + 1]
            except BaseException as exc:      # fail the rows of this step, keep serving
                log.exception("batched decode step failed")
                for m in members.values():
                    m.error = exc
            with self.cond:
                self.counters["batched_steps"] += 1
                self.counters["rows_stepped"] += len(members)
                self.counters["max_rows"] = max(self.counters["max_rows"], len(members))
                self.cond.notify_all()      # (a prefill waiting between two chunks)
            for m in members.values():
                m.done.set()

    def _step(self, lane: Lane, members: dict, tokens: dict) -> torch.Tensor:
        """One batched step of ``members`` (row -> Member) on ``lane``: the program that
        covers their rules, their values and flags bound, the inputs copied, the graph
        replayed (captured first when new) or, without graphs, the same step run eagerly."""
        needs = [m.seqs for m in members.values()]
        program = lane.program
        if program is None or not covers(program, needs):
            # a new program for the rows of the lane now (new kinds of rules joined)
            program = build_program(needs + [m.seqs for m in lane.members
                                             if m is not None and m.row not in members])
            lane.program = program
        entry = lane.entry(program)
        for m in lane.members:          # rows not in this step: their values, for a capture
            if m is not None and m.row not in members:
                entry.buffers.prepare(m.row, m.seqs)
        for r, m in members.items():
            m.run.add_fired_rules(entry.buffers.bind(r, m.seqs, m.run.step, m.length))
        lane.load_inputs({r: (tokens[m], m.length) for r, m in members.items()})
        if entry.graph is None and self.use_graphs and not self.graphs_broken:
            self._capture(lane, entry)
        if entry.graph is not None:
            with torch.cuda.device(self.loaded.device):
                entry.graph.replay()
            self.counters["graph_steps"] += 1
            logits = entry.logits
        else:
            logits = lane.forward(lane.inputs, entry.buffers.proxy)
        return logits.clone()       # the graph's output is overwritten by the next replay

    def _capture(self, lane: Lane, entry: _LaneGraph) -> None:
        """Capture one batched step of ``entry``'s program (inputs already bound). The
        warm-up forwards write this step's keys and values, which the replay that follows
        writes again, the same."""
        device = self.loaded.device
        current = torch.cuda.current_stream(device)
        try:
            with torch.cuda.device(device):
                lane.stream.wait_stream(current)
                with torch.cuda.stream(lane.stream):
                    for _ in range(WARMUP_STEPS):
                        lane.forward(lane.inputs, entry.buffers.proxy)
                current.wait_stream(lane.stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=lane.stream, capture_error_mode="thread_local"):
                    logits = lane.forward(lane.inputs, entry.buffers.proxy)
            entry.graph, entry.logits = graph, logits
            self.counters["captures"] += 1
        except Exception as exc:  # never fail a generation for the fast path: step eagerly
            self.counters["capture_failures"] += 1
            self.graphs_broken = f"{type(exc).__name__}: {exc}"
            log.warning("lane CUDA graph capture failed for %s, stepping eagerly: %s",
                        self.loaded.name, self.graphs_broken)
            torch.cuda.synchronize(device)
