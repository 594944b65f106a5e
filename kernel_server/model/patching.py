"""Activation patching on the server: the exact grid of (layer, position) cells of a site,
each cell the corrupted prompt with the clean run's activation set at that one place.

The exact sweep does less work than one pass per cell (``incremental_sweep``). A patch at
(layer L, position p) leaves every activation before block L, and every position before p
at every layer, as the corrupted run has them (the model is causal). So the clean and the
corrupted prompt run once (one two-row forward), keeping each block's input and output and
the corrupted keys and values; a cell then runs only blocks L.. (L+1.. for the residual
stream, whose patch is block L's output) over positions p..n-1, attending over the corrupted
run's keys and values of positions < p, and reads the metric from its last position.

Many cells share one block call: their suffix tokens are laid end to end as one sequence
(up to ``CALL_TOKENS`` tokens, so the matmuls have hundreds of rows), with explicit
position ids and a 4-D attention mask over [the n corrupted keys | the flat tokens' own
keys] that lets a token of cell c at position q see the corrupted positions < p_c and its
own cell's tokens p_c..q; a cell's tokens join its call as the block loop reaches its
layer. The model's own decoder blocks do the work, called with the arguments the model
itself gives them for those flat tokens (captured from a forward whose blocks pass their
input through), and a fresh cache holding the corrupted keys and values: nothing of a
family's attention or position encoding is rewritten here (the mask is a boolean for
``sdpa``, additive for ``eager``; other attention implementations fall back). Every sweep
checks itself against the corrupted run (one unpatched cell must give the corrupted
metric); where that fails, or a family's blocks cannot be called this way, the sweep runs
as before (``rows_sweep``: every cell a row of a whole-prompt forward) and says so in its
reply (``method``).

A cell whose clean activation equals the corrupted one bit for bit (a position before the
prompts' first different token) is the corrupted metric, not computed. The metric reads only
the two answer rows of the unembedding. For SmolLM2-135M (30 blocks) and a 9-token prompt
the sweep computes 27% of the block-positions of one pass per cell (72,900), 22% when the
first token is shared; the dense mask adds attention over other cells' keys (zero weight),
which bounds the useful size of one call.
"""
from __future__ import annotations

import torch

from kernel_server.model import sites
from kernel_server.model.passes import BATCH_TOKENS, ForwardPass, run_batch
from kernel_server.model.registry import LoadedModel
from kernel_server.runtime.hooks import output_tensor

#: a sweep's self-check: the unpatched row's metric within this of the corrupted run's
#: (relative to max(1, |metric|)) in float32, where the grid itself agrees with one pass per
#: cell to ~1e-5; in 16-bit types ``SELF_CHECK_EPS`` units of the type's rounding (bfloat16:
#: 0.125), since there two computations of one cell by different shapes already differ by
#: rounding (H200, random Llama-7B bf16: bench/sweep_exact_check.py). A mistake in the
#: mask or positions moves a metric by about its own size, far over either.
SELF_CHECK_TOL = 1e-3
SELF_CHECK_EPS = 16


def self_check_tol(dtype: torch.dtype) -> float:
    """The self-check's relative tolerance for a model computing in ``dtype``."""
    if dtype in (torch.float32, torch.float64):
        return SELF_CHECK_TOL
    return max(SELF_CHECK_TOL, SELF_CHECK_EPS * torch.finfo(dtype).eps)
#: about the most bytes the cells' hidden states may hold at once (a long prompt's sweep runs
#: its cells in several passes)
MAX_STATE_BYTES = 2**30


def _metric(logits: torch.Tensor, answer) -> list:
    """logit[answer[0]] - logit[answer[1]] of each row of [rows, vocab]."""
    return (logits[:, answer[0]] - logits[:, answer[1]]).tolist()


def _answer_metric(loaded: LoadedModel, hidden: torch.Tensor, answer) -> list:
    """The metric of final hidden rows [rows, hidden]: through the final norm and only the
    two answer rows of a plain linear unembedding (a whole-vocabulary row costs as much as
    a few decoder-block positions), else through the whole unembedding."""
    head = loaded.model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return _metric(sites.unembed(loaded, hidden), answer)
    w = head.weight
    h = sites.final_norm(loaded)(hidden.to(device=w.device, dtype=w.dtype))
    idx = torch.tensor(list(answer), device=w.device)
    two = torch.nn.functional.linear(h, w[idx], None if head.bias is None else head.bias[idx]).float()
    return (two[:, 0] - two[:, 1]).tolist()


class PatchRows:
    """The hook target of a batch of patching cells: row b is the corrupted prompt with the
    clean run's activation at (``cells[b]`` = (layer, position)) of ``site`` set in (only
    head ``head`` of it for site "heads"), the same values a one-cell "set" rule writes."""

    def __init__(self, site: str, cells: list, clean: dict, head=None, head_dim: int = 0):
        self.site, self.cells, self.clean, self.head, self.head_dim = site, cells, clean, head, head_dim
        layers = {layer for layer, _ in cells}
        self.hot_layers = frozenset(layers) if site == "resid" else frozenset()
        self.hot_sites = frozenset() if site == "resid" else frozenset((l, site) for l in layers)

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        rows = [b for b, (l, _) in enumerate(self.cells) if l == layer]
        if not rows or site != self.site:
            return None
        new = hidden.clone()
        for b in rows:
            p = self.cells[b][1]
            src = self.clean[layer][p].reshape(-1)
            if self.head is None:
                new[b, p] = src
            else:
                sl = slice(self.head * self.head_dim, (self.head + 1) * self.head_dim)
                new[b, p, sl] = src[sl]
        return new


def patch_cells(loaded: LoadedModel, clean: list[int], corrupted: list[int], site: str,
                layers: list[int], positions: list[int], answer: tuple[int, int], head=None,
                rows: int = 64) -> dict:
    """Activation patching of every (layer, position) cell at ``site``; the metric is the
    logit difference ``logit[answer[0]] - logit[answer[1]]`` at the last position. Also
    the clean and corrupted metrics (no patch). ``metric[i][j]`` is the cell (``layers[i]``,
    ``positions[j]``); ``method`` says how it ran ("incremental", else "rows")."""
    out = incremental_sweep(loaded, clean, corrupted, site, layers, positions, answer, head, rows)
    method = "incremental"
    if out is None:
        fp = ForwardPass(capture=[(layer, site) for layer in layers], loaded=loaded)
        clean_metric = _metric(run_batch(loaded, [clean], fp)[:, -1], answer)[0]
        acts = {layer: fp.captured[(layer, site)][0] for layer in layers}   # [n, width]
        values, method = rows_sweep(loaded, corrupted, site, layers, positions, answer, acts,
                                    head, rows), "rows"
    else:
        values, clean_metric = out[:2], out[2]
    grid, corrupted_metric = values
    n = len(positions)
    return {"layers": list(layers), "site": site, "positions": list(positions),
            "metric": [grid[i * n:(i + 1) * n] for i in range(len(layers))],
            "clean": clean_metric, "corrupted": corrupted_metric, "method": method}


def rows_sweep(loaded, corrupted, site, layers, positions, answer, acts, head, rows) -> tuple:
    """(cell metrics in layer-major order, corrupted metric): every cell a row of a forward
    over the whole corrupted prompt, ``rows`` rows at most per forward."""
    corrupted_metric = _metric(run_batch(loaded, [corrupted], ForwardPass())[:, -1], answer)[0]
    head_dim = sites.head_geometry(loaded)[1] if head is not None else 0
    cells = [(layer, p) for layer in layers for p in positions]
    rows = max(1, min(rows, BATCH_TOKENS // len(corrupted)))
    values = []
    for i in range(0, len(cells), rows):
        chunk = cells[i:i + rows]
        target = PatchRows(site, chunk, acts, head, head_dim)
        values += _metric(run_batch(loaded, [corrupted] * len(chunk), target)[:, -1], answer)
    return values, corrupted_metric


# ---- the incremental sweep -------------------------------------------------------------
class _Unsupported(Exception):
    """This model's blocks cannot be driven one by one here (the sweep falls back)."""


def _new_cache():
    from transformers import DynamicCache
    return DynamicCache()


def _hidden_arg(args, kwargs) -> torch.Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise _Unsupported("a decoder block's first argument is not the hidden state")
    return h


class _PromptRuns:
    """One forward of the clean and the corrupted prompt as two rows (the weights read once)
    through a cache of our own: the captured sites of both rows (``fp.captured[key][row]``,
    row 0 clean, row 1 corrupted), and of the corrupted row each kept block's input and
    output hidden state [n, hidden], its keys and values, and what a block returns (a tensor
    or a tuple); the last position's logits of both rows [2, vocab]."""

    def __init__(self, loaded: LoadedModel, clean: list[int], corrupted: list[int], capture=(),
                 keep=()):
        self.inputs, self.outputs, self.tuple_out = {}, {}, {}
        self.fp = ForwardPass(capture=capture, loaded=loaded, pads=(0, 0))
        self.keep = frozenset(keep)           # the blocks whose hidden states are kept
        loaded.hooks.install_layers()
        handles = []
        for i, block in enumerate(loaded.layers):
            handles.append(block.register_forward_pre_hook(
                lambda m, a, k, i=i: self._input(i, a, k), with_kwargs=True))
            handles.append(block.register_forward_hook(
                lambda m, a, out, i=i: self._output(i, out)))
        self.cache = _new_cache()
        try:
            with torch.inference_mode(), loaded.hooks.active(self.fp):
                out = loaded.model(input_ids=torch.tensor([clean, corrupted], device=loaded.device),
                                   use_cache=True, logits_to_keep=1,
                                   **{loaded.cache_kwarg: self.cache})
        finally:
            for h in handles:
                h.remove()
        self.logits = out.logits[:, -1].float()
        n, layers = len(corrupted), getattr(self.cache, "layers", None)
        if layers is None or len(layers) != len(loaded.layers) or len(self.inputs) != len(loaded.layers):
            raise _Unsupported("the model did not fill one cache layer per decoder block")
        self.kv = []
        for layer in layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[-2] != n or k.shape[0] != 2:
                raise _Unsupported("the cache does not hold [batch, heads, positions, dim] keys")
            self.kv.append((k[1:], v[1:]))

    def _input(self, i, args, kwargs):
        h = _hidden_arg(args, kwargs)
        self.inputs[i] = h[1] if i in self.keep else None

    def _output(self, i, out):
        self.tuple_out[i] = isinstance(out, tuple)
        if i in self.keep:
            self.outputs[i] = output_tensor(out)[1]


class _TemplateDone(Exception):
    """Raised by the last decoder block of a template forward: its arguments are captured and
    nothing after the blocks (final norm, unembedding) needs computing."""


class _PassThrough:
    """A decoder block's forward that computes nothing and returns its input as the block
    would return its output (the block calls of a template forward); the last block ends
    the forward."""

    def __init__(self, as_tuple: bool, last: bool):
        self.as_tuple, self.last = as_tuple, last

    def __call__(self, *args, **kwargs):
        if self.last:
            raise _TemplateDone
        h = _hidden_arg(args, kwargs)
        return (h,) if self.as_tuple else h


class _Cell:
    """One patching cell of the sweep: (``layer``, ``p``) with ``layer`` None for the
    self-check (no patch); it enters the block loop at block ``join`` with its suffix of
    ``n - p`` token positions."""
    __slots__ = ("layer", "p", "join", "tokens")

    def __init__(self, layer, p: int, join: int, n: int):
        self.layer, self.p, self.join, self.tokens = layer, p, join, n - p


def _mask_kind(loaded: LoadedModel):
    """How this model's attention takes a ready 4-D mask: a boolean (sdpa: True attends) or
    an additive float (eager); None for any other attention (the sweep falls back)."""
    impl = getattr(loaded.model.config, "_attn_implementation", None)
    return {"sdpa": "bool", "eager": "float"}.get(impl)


def _flat_inputs(loaded: LoadedModel, ids: list[int], cells: list, kind: str) -> tuple:
    """(input ids [1, m], position ids [1, m], 4-D mask [1, 1, m, n + m]) of the cells' suffix
    tokens laid end to end after a cache of the ``n`` corrupted positions: a token of cell c
    at position q attends the corrupted positions j < p_c and its own cell's tokens p_c..q."""
    n, dev = len(ids), loaded.device
    first = torch.tensor([c.p for c in cells], device=dev)
    length = torch.tensor([c.tokens for c in cells], device=dev)
    owner = torch.repeat_interleave(torch.arange(len(cells), device=dev), length)      # [m]
    start = torch.cumsum(length, 0) - length
    q = first[owner] + torch.arange(len(owner), device=dev) - start[owner]           # positions
    tok = torch.tensor(ids, device=dev)[q]
    prefix = torch.arange(n, device=dev)[None, :] < first[owner][:, None]            # [m, n]
    own = (owner[:, None] == owner[None, :]) & (q[None, :] <= q[:, None])           # [m, m]
    allowed = torch.cat([prefix, own], dim=1)[None, None]
    if kind == "float":
        dtype = loaded.dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(
            ~allowed, torch.finfo(dtype).min)
    return tok[None], q[None], allowed


def _template_cache(run: _PromptRuns):
    """A cache holding the corrupted prompt's keys and values, for template forwards (whose
    blocks pass their input through and never write it)."""
    template = _new_cache()
    for i, (k, v) in enumerate(run.kv):
        template.update(k, v, i)
    return template


def _block_calls(loaded: LoadedModel, run: _PromptRuns, template, flat: tuple, m: int) -> dict:
    """{block: (args, kwargs)} the model gives its blocks in a forward of the first ``m`` of
    the flat tokens ``flat`` (``_flat_inputs``) after ``template``, the corrupted prompt's
    cache: captured with every block passing its input through, the forward ended at the
    last block (the caller holds the compute lock, so no other pass sees the stand-ins)."""
    tokens, positions, mask = flat
    n = mask.shape[-1] - mask.shape[-2]
    tokens, positions, mask = tokens[:, :m], positions[:, :m], mask[..., :m, :n + m].contiguous()
    calls, handles, last = {}, [], len(loaded.layers) - 1
    for i, block in enumerate(loaded.layers):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, i=i: calls.__setitem__(i, (a, dict(k))), with_kwargs=True))
        block.forward = _PassThrough(run.tuple_out[i], i == last)
    try:
        with torch.inference_mode():
            loaded.model(input_ids=tokens, position_ids=positions, attention_mask=mask,
                         use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: template})
    except _TemplateDone:
        pass
    finally:
        for i, block in enumerate(loaded.layers):
            del block.forward                        # the class's forward again
        for h in handles:
            h.remove()
    if len(calls) != len(loaded.layers):
        raise _Unsupported("the model skipped some decoder blocks")
    return calls


class _JoinPatch:
    """The hook target of a block call whose cells join the sweep at this block at a site
    inside it: flat token ``index[r]`` (the cell's own position) gets the clean activation
    ``values[r]`` (only head ``head``'s slice for site "heads")."""

    def __init__(self, layer: int, site: str, index: list, values: list, head, head_dim: int):
        self.layer, self.site, self.index, self.values = layer, site, index, values
        self.head, self.head_dim = head, head_dim
        self.hot_layers = frozenset()
        self.hot_sites = frozenset([(layer, site)])

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        if (layer, site) != (self.layer, self.site):
            return None
        new = hidden.clone()
        for t, src in zip(self.index, self.values):
            src = src.reshape(-1).to(device=hidden.device, dtype=hidden.dtype)
            if self.head is None:
                new[0, t] = src
            else:
                sl = slice(self.head * self.head_dim, (self.head + 1) * self.head_dim)
                new[0, t, sl] = src[sl]
        return new


def _call_block(loaded, l: int, call: tuple, template, kv: tuple, hidden: torch.Tensor,
                target) -> torch.Tensor:
    """Block ``l`` over the flat tokens ``hidden`` [1, m, hidden] after the corrupted
    prompt's keys and values, with the arguments the model gave it in the template forward."""
    cache = _new_cache()
    cache.update(kv[0], kv[1], l)
    args, kwargs = call
    swap = lambda x: cache if x is template else x       # noqa: E731
    args = (hidden,) + tuple(swap(a) for a in args[1:]) if args else ()
    kwargs = {key: swap(val) for key, val in kwargs.items()}
    if not args:
        kwargs["hidden_states"] = hidden
    with loaded.hooks.active(target):
        return output_tensor(loaded.layers[l](*args, **kwargs))


#: the most flat tokens one block call takes: the matmuls are efficient from a few hundred
#: rows on, while the attention over the dense 4-D mask grows with the square
CALL_TOKENS = 512


def _chunks(cells: list, budget: int) -> list:
    """The cells (in order) packed into groups of at most ``budget`` tokens (one cell at
    least)."""
    out, cur, tokens = [], [], 0
    for c in cells:
        if cur and tokens + c.tokens > budget:
            out.append(cur)
            cur, tokens = [], 0
        cur.append(c)
        tokens += c.tokens
    return out + ([cur] if cur else [])


def _passes(cells: list, limit: int) -> list:
    """The cells (in position order) split into passes of at most ``limit`` tokens held at
    once (one cell at least): a long prompt's cells do not all live together."""
    return _chunks(sorted(cells, key=lambda c: (c.p, c.join)), limit)


def incremental_sweep(loaded: LoadedModel, clean: list[int], corrupted: list[int], site: str,
                      layers: list[int], positions: list[int], answer, head, rows: int):
    """(cell metrics in layer-major order, corrupted metric, clean metric) computed
    incrementally (see the module's docstring), or None where this model's blocks cannot be
    driven so or the self-check fails (the caller then runs ``rows_sweep``). A block call
    takes at most the tokens of ``rows`` whole-prompt rows (and ``CALL_TOKENS``)."""
    n = len(corrupted)
    head_dim = sites.head_geometry(loaded)[1] if head is not None else 0
    joins_after = site == "resid"         # a resid patch is block L's output: join at L + 1
    kind = _mask_kind(loaded)
    if kind is None:
        return None
    results: dict = {}
    with torch.inference_mode(), loaded.compute_lock:
        try:
            run = _PromptRuns(loaded, clean, corrupted, [(layer, site) for layer in layers], keep=layers)
        except _Unsupported:
            return None
        clean_metric, corrupted_metric = _metric(run.logits, answer)
        acts = {layer: run.fp.captured[(layer, site)][0] for layer in layers}   # [n, width]
        # a cell whose clean activation equals the corrupted one bit for bit (a position
        # before the prompts' first different token) patches nothing: its value is the
        # corrupted run's, as one pass for it would compute
        for layer in layers:
            a, b = acts[layer], run.fp.captured[(layer, site)][1]
            if head is not None:
                sl = slice(head * head_dim, (head + 1) * head_dim)
                a, b = a.reshape(a.shape[0], -1)[:, sl], b.reshape(b.shape[0], -1)[:, sl]
            for p in positions:
                if torch.equal(a[p], b[p]):
                    results[(layer, p)] = corrupted_metric
        join = (lambda layer: layer + 1) if joins_after else (lambda layer: layer)   # noqa: E731
        cells = [_Cell(layer, p, join(layer), n) for layer in dict.fromkeys(layers)
                 for p in dict.fromkeys(positions) if (layer, p) not in results]
        if cells:
            # the self-check cell: the lowest layer at a middle position of the busy ones, unpatched
            busy = sorted({c.p for c in cells})
            cells.append(_Cell(None, busy[len(busy) // 2], join(min(layers)), n))
        # the state of a pass: its cells' flat hidden states, a few per block call
        limit = max(n, MAX_STATE_BYTES // (4 * loaded.hidden_size * loaded.dtype.itemsize))
        for group in _passes(cells, limit):
            try:
                values = _sweep_pass(loaded, run, corrupted, site, group, acts, head, head_dim,
                                     kind, min(CALL_TOKENS, max(1, rows) * n), joins_after, answer)
            except _Unsupported:
                return None
            for c, value in zip(group, values):
                if c.layer is None:
                    if abs(value - corrupted_metric) > self_check_tol(loaded.dtype) * max(1.0, abs(corrupted_metric)):
                        return None
                else:
                    results[(c.layer, c.p)] = value
    return ([results[(layer, p)] for layer in layers for p in positions], corrupted_metric,
            clean_metric)


def _sweep_pass(loaded, run, ids, site, cells, acts, head, head_dim, kind, call_tokens,
                joins_after, answer) -> list:
    """The metric of each of ``cells``: the block loop from the first join to the last
    block, each block one call per chunk of cells over their flat tokens; a cell's tokens
    are appended to its chunk as the loop reaches its join block."""
    num = loaded.num_layers
    order = sorted(cells, key=lambda c: (c.join, c.p, c.layer is None))
    chunks = _chunks(order, call_tokens)
    states, flats = [None] * len(chunks), [None] * len(chunks)
    joined = [0] * len(chunks)
    templates = [(0, None)] * len(chunks)          # (cells joined, their block arguments)
    template = _template_cache(run)
    for l in range(order[0].join, num + 1):
        for k, chunk in enumerate(chunks):
            new, index, values = [], [], []
            offset = 0 if states[k] is None else states[k].shape[1]
            while joined[k] < len(chunk) and chunk[joined[k]].join == l:
                c = chunk[joined[k]]
                joined[k] += 1
                if joins_after:              # block (l-1)'s output, the clean value at p
                    h = run.outputs[l - 1][c.p:].clone()
                    if c.layer is not None:
                        h[0] = acts[c.layer][c.p].reshape(-1).to(device=h.device, dtype=h.dtype)
                else:                        # block l's input; the site hook patches inside it
                    h = run.inputs[l][c.p:]
                    if c.layer is not None:
                        index.append(offset)
                        values.append(acts[c.layer][c.p])
                new.append(h)
                offset += c.tokens
            if new:
                flat = torch.cat(new)[None]
                states[k] = flat if states[k] is None else torch.cat([states[k], flat], dim=1)
            if l == num or states[k] is None:
                continue
            if flats[k] is None:
                flats[k] = _flat_inputs(loaded, ids, chunk, kind)
            if templates[k][0] != joined[k]:         # the chunk's tokens changed: new arguments
                templates[k] = (joined[k], _block_calls(loaded, run, template, flats[k],
                                                        states[k].shape[1]))
            calls = templates[k][1]
            target = _JoinPatch(l, site, index, values, head, head_dim) if index else None
            states[k] = _call_block(loaded, l, calls[l], template, run.kv[l], states[k], target)
    metrics = {}
    for chunk, state in zip(chunks, states):
        last = torch.tensor([c.tokens for c in chunk], device=state.device).cumsum(0) - 1
        for c, value in zip(chunk, _answer_metric(loaded, state[0, last], answer)):
            metrics[id(c)] = value
    return [metrics[id(c)] for c in cells]


def patch_row(loaded: LoadedModel, clean: list[int], corrupted: list[int], layer: int, site: str,
              positions: list[int], answer: tuple[int, int], head=None) -> dict:
    """Activation patching at (``layer``, ``site``): for each position p, ``corrupted`` with
    the clean run's activation set at p; the metric is the logit difference at the last
    position. Also the clean and corrupted metrics (no patch)."""
    out = patch_cells(loaded, clean, corrupted, site, [layer], positions, answer, head)
    return {"layer": layer, "site": site, "positions": list(positions), "metric": out["metric"][0],
            "clean": out["clean"], "corrupted": out["corrupted"], "method": out["method"]}
