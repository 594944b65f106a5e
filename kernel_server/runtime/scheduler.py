"""The decode scheduler of a loaded model: one loop that runs the decode steps of every
active generation on the model (any client, any session) as rows of one batched step.

Exactness first. Every decode step of the engine runs in one fixed shape: ``ROWS`` rows
(a solo session too: the rows nobody uses are padding) over a *lane*, a key/value store
of ``ROWS`` rows by ``max_len`` positions, ``max_len`` chosen from the session's own
need only (prompt + max_new_tokens, rounded up to a power of two as fast decode's slots
are). Each row keeps its own positions from 0 (its own write position, its own position
ids, its own mask), so a row's numbers never depend on which row it sits in, who else is
in the lane or when they joined or left: no kernel sees another shape, and no reduction
sees the row's values at another offset. What this costs a solo session is measured in
bench/tenants_bench.py.

Who runs where:
- the prefill of a joining session runs eagerly in its own worker (the ordinary
  DynamicCache path, the same bits as without the engine), under the model's compute
  lock: it stalls the running sessions for one prefill (counted in ``stats``);
- then the session *joins* a lane row (its keys and values copied in) and each decode
  step is a request to the scheduler loop, which runs one forward for all rows that
  asked, applying each row's standing rules (any site) to that row's slice with the same
  ``apply_edit`` the eager hooks use (elementwise: the same bits on a slice);
- a step that may pause (a breakpoint or ``step()`` target on it) runs *outside* the
  batch, in the session's own worker, as a forward of the same fixed shape on the same
  lane that writes only the session's row: the session's hooks see its row, it pauses,
  edits and resumes as always, and its row gets the bits the batch would have given it.
  While it is paused (compute lock released) the loop keeps serving the other rows;
- when the run ends its row's keys and values move back into a DynamicCache and the row
  is free (checkpoints, forks and restores of a finished run never see a lane).

Modes (``set_mode`` / $DJINN_TENANTS): ``off`` (the default: every run decodes on its own,
as before; see README "Sharing one GPU" for why) and ``on``.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger("kernel_server.runtime.scheduler")

MODES = ("off", "on")
_mode = os.environ.get("DJINN_TENANTS", "off")
#: rows of every batched decode step (the fixed batch shape)
ROWS = int(os.environ.get("DJINN_TENANT_ROWS", "8"))


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
    ``values`` [1, heads, max_len, dim] are views into the lane (kv_slices cuts them)."""
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
    """The cache argument of one lane forward: ``update`` writes the new keys and values
    of the rows in ``write`` at each row's own position and returns the whole lane."""

    def __init__(self, lane: "Lane", write_rows: torch.Tensor, write_pos: torch.Tensor):
        self.lane = lane
        self.write_rows = write_rows
        self.write_pos = write_pos

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.lane.keys[layer_idx], self.lane.values[layer_idx]
        rows, pos = self.write_rows, self.write_pos
        keys[rows, :, pos] = key_states[rows, :, 0].to(keys.dtype)
        values[rows, :, pos] = value_states[rows, :, 0].to(values.dtype)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0          # never used: the lane forward passes position ids


class Lane:
    """``rows`` rows of keys and values, ``max_len`` positions each, per layer."""

    def __init__(self, loaded, rows: int, max_len: int, like: list):
        self.loaded = loaded
        self.rows = rows
        self.max_len = max_len
        self.keys, self.values = [], []
        for k, v in like:         # (keys, values) [1, heads, n, dim] of a joining run
            self.keys.append(torch.zeros((rows, k.shape[1], max_len, k.shape[3]),
                                         dtype=k.dtype, device=k.device))
            self.values.append(torch.zeros((rows, v.shape[1], max_len, v.shape[3]),
                                           dtype=v.dtype, device=v.device))
        self.members: list = [None] * rows
        device = loaded.device
        self._positions = torch.arange(max_len, device=device)
        self._pad = torch.zeros((1, 1), dtype=torch.long, device=device)
        eager = getattr(loaded.model.config, "_attn_implementation", None) == "eager"
        self._additive = eager       # eager attention adds its mask; sdpa takes a bool one

    def free_row(self) -> int | None:
        for r, m in enumerate(self.members):
            if m is None:
                return r
        return None

    def forward(self, inputs: dict, target) -> torch.Tensor:
        """One decode step of shape [rows, 1]: ``inputs`` maps row -> (token [1, 1], the
        row's length before the step); other rows are padding (a zero token at position
        0, attending to position 0, nothing written). Returns logits [rows, vocab]."""
        loaded, device = self.loaded, self.loaded.device
        ids = torch.cat([inputs[r][0].view(1, 1).to(device) if r in inputs else self._pad
                         for r in range(self.rows)])
        lengths = [inputs[r][1] if r in inputs else 0 for r in range(self.rows)]
        pos = torch.tensor(lengths, dtype=torch.long, device=device)
        mask = (self._positions[None, :] <= pos[:, None]).view(self.rows, 1, 1, self.max_len)
        if self._additive:
            mask = torch.zeros(mask.shape, dtype=loaded.dtype, device=device).masked_fill(
                ~mask, torch.finfo(loaded.dtype).min)
        write = sorted(inputs)
        cache = _StepCache(self, torch.tensor(write, dtype=torch.long, device=device),
                           torch.tensor([lengths[r] for r in write], dtype=torch.long, device=device))
        with loaded.hooks.active(target):
            out = loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos.view(-1, 1),
                               use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: cache})
        return out.logits[:, -1, :]


# ---- the hook targets of a lane forward ----------------------------------------------------
class _BatchTarget:
    """The hook target of a batched step: each row's standing rules on that row's slice."""

    def __init__(self, members: dict):
        self.members = members          # row -> Member
        layers, sites = set(), set()
        for m in members.values():
            for rule in m.run.interventions.rules:
                if rule.site == "resid":
                    layers.add(rule.layer)
                else:
                    sites.add((rule.layer, rule.site))
        self.hot_layers = frozenset(layers)
        self.hot_sites = frozenset(sites)

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        out = None
        for row, member in self.members.items():
            sub = hidden[row:row + 1]
            new = member.run.apply_rules(layer, site, sub)
            if new is not sub:
                if out is None:
                    out = hidden.clone()
                out[row] = new[0]
        return out


class _RowTarget:
    """The hook target of a step outside the batch: the run's own hooks (rules, breakpoints,
    pauses) on its row's slice."""

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
        new = self.run.on_site(layer, site, hidden[r:r + 1])
        if new is None:
            return None
        out = hidden.clone()
        out[r] = new[0]
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

    def forward(self, next_input: torch.Tensor) -> torch.Tensor:
        """This step's logits [1, vocab]: in the batch, or outside it when the step may
        pause. Called by the run's worker without the compute lock."""
        run, sched = self.run, self.scheduler
        if needs_own_step(run):
            sched.stats["own_steps"] += 1
            with sched.cond:                 # not expected in the batch meanwhile
                sched.expected.discard(self)
                sched.cond.notify_all()
            with run.loaded.compute_lock:
                logits = self.lane.forward({self.row: (next_input, self.length)},
                                           _RowTarget(run, self.row))[self.row:self.row + 1]
            self.length += 1
            return logits
        self.done.clear()
        with sched.cond:
            sched.expected.add(self)
            sched.pending[self] = next_input
            sched.cond.notify_all()
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
        self.pending: dict = {}           # Member -> next input token
        self.expected: set = set()        # members whose next step is a batch request
        self.stats = {"batched_steps": 0, "rows_stepped": 0, "own_steps": 0, "joins": 0,
                      "max_rows": 0}
        self._thread: threading.Thread | None = None

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
            self.stats["joins"] += 1
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
            self.cond.notify_all()

    # ---- the loop ------------------------------------------------------------------------
    def _ready(self) -> bool:
        # every member expected in the batch has asked: waiting for the others is only for
        # throughput; whoever runs outside the batch (a pause) is not expected
        return bool(self.pending) and self.expected.issubset(self.pending)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self._ready():
                        self.cond.wait()
                    batch, self.pending = self.pending, {}
                by_lane: dict = {}
                for member, token in batch.items():
                    by_lane.setdefault(member.lane, {})[member.row] = member
                for lane, members in by_lane.items():
                    try:
                        with self.loaded.compute_lock:
                            logits = lane.forward({r: (batch[m], m.length) for r, m in members.items()},
                                                  _BatchTarget(members))
                        for r, m in members.items():
                            m.logits = logits[r:r + 1]
                    except BaseException as exc:      # fail the rows of this step, keep serving
                        log.exception("batched decode step failed")
                        for m in members.values():
                            m.error = exc
                    self.stats["batched_steps"] += 1
                    self.stats["rows_stepped"] += len(members)
                    self.stats["max_rows"] = max(self.stats["max_rows"], len(members))
                    for m in members.values():
                        m.done.set()
