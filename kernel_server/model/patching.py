"""Activation patching on the server: the exact grid of (layer, position) cells of a site,
each cell the corrupted prompt with the clean run's activation set at that one place.

The exact sweep does less work than one pass per cell (``incremental_sweep``). A patch at
(layer L, position p) leaves every activation before block L, and every position before p
at every layer, as the corrupted run has them (the model is causal). So the corrupted
prompt runs once, keeping each block's input and output and its keys and values; a cell
then runs only blocks L.. (L+1.. for the residual stream, whose patch is block L's output)
over positions p..n-1, attending over the corrupted run's keys and values of positions < p,
and reads the metric from its last position. Cells of one position are the rows of one
batch, each row joining as the block loop reaches its layer. The model's own decoder
blocks do the work, called with the arguments the model itself gives them (captured from
a forward over the same positions whose blocks pass their input through), and a fresh
cache holding the corrupted prefix: nothing of a family's attention, masks or position
encoding is rewritten here. Every sweep checks itself against the corrupted run (one
unpatched row must give the corrupted metric); where that fails, or a family's blocks
cannot be called this way, the sweep runs as before (``rows_sweep``: every cell a row of a
whole-prompt forward) and says so in its reply (``method``).

A cell whose clean activation equals the corrupted one bit for bit (a position before the
prompts' first different token) is the corrupted metric, not computed. The metric reads only
the two answer rows of the unembedding. For SmolLM2-135M (30 blocks) and a 9-token prompt
the sweep computes 27% of the block-positions of one pass per cell (72,900), 22% when the
first token is shared.
"""
from __future__ import annotations

import torch

from kernel_server.model import sites
from kernel_server.model.passes import BATCH_TOKENS, ForwardPass, run_batch
from kernel_server.model.registry import LoadedModel
from kernel_server.runtime.hooks import output_tensor

#: a sweep's self-check: the unpatched row's metric within this of the corrupted run's
#: (relative to max(1, |metric|)); the grid itself agrees with one pass per cell to ~1e-5
SELF_CHECK_TOL = 1e-3
#: the most bytes the rows of one position may hold; a larger sweep runs as whole-prompt rows
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
    fp = ForwardPass(capture=[(layer, site) for layer in layers], loaded=loaded)
    clean_metric = _metric(run_batch(loaded, [clean], fp)[:, -1], answer)[0]
    acts = {layer: fp.captured[(layer, site)][0] for layer in layers}   # [n, width]
    values = incremental_sweep(loaded, corrupted, site, layers, positions, answer, acts,
                               head, rows)
    method = "incremental"
    if values is None:
        values, method = rows_sweep(loaded, corrupted, site, layers, positions, answer, acts,
                                    head, rows), "rows"
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


class _CorruptedRun:
    """One forward of the corrupted prompt through a cache of our own: each block's input
    and output hidden state [n, hidden], its keys and values, and what a block returns
    (a tensor or a tuple); the last position's logits."""

    def __init__(self, loaded: LoadedModel, ids: list[int], capture=(), keep=()):
        self.inputs, self.outputs, self.tuple_out = {}, {}, {}
        self.fp = ForwardPass(capture=capture, loaded=loaded)
        self.keep = frozenset(keep)           # the blocks whose hidden states are kept
        handles = []
        for i, block in enumerate(loaded.layers):
            handles.append(block.register_forward_pre_hook(
                lambda m, a, k, i=i: self._input(i, a, k), with_kwargs=True))
            handles.append(block.register_forward_hook(
                lambda m, a, out, i=i: self._output(i, out)))
        self.cache = _new_cache()
        try:
            with torch.inference_mode(), loaded.hooks.active(self.fp):
                out = loaded.model(input_ids=torch.tensor([ids], device=loaded.device),
                                   use_cache=True, logits_to_keep=1,
                                   **{loaded.cache_kwarg: self.cache})
        finally:
            for h in handles:
                h.remove()
        self.logits = out.logits[0, -1].float()
        n, layers = len(ids), getattr(self.cache, "layers", None)
        if layers is None or len(layers) != len(loaded.layers) or len(self.inputs) != len(loaded.layers):
            raise _Unsupported("the model did not fill one cache layer per decoder block")
        self.kv = []
        for layer in layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[-2] != n:
                raise _Unsupported("the cache does not hold [batch, heads, positions, dim] keys")
            self.kv.append((k, v))

    def _input(self, i, args, kwargs):
        h = _hidden_arg(args, kwargs)
        self.inputs[i] = h[0] if i in self.keep else None

    def _output(self, i, out):
        self.tuple_out[i] = isinstance(out, tuple)
        if i in self.keep:
            self.outputs[i] = output_tensor(out)[0]


class _PassThrough:
    """A decoder block's forward that computes nothing and returns its input as the block
    would return its output (the block calls of a template forward)."""

    def __init__(self, as_tuple: bool):
        self.as_tuple = as_tuple

    def __call__(self, *args, **kwargs):
        h = _hidden_arg(args, kwargs)
        return (h,) if self.as_tuple else h


def _block_calls(loaded: LoadedModel, run: _CorruptedRun, ids: list[int], p: int) -> tuple:
    """(the cache object, {block: (args, kwargs)}) the model gives its blocks in a forward of
    ``ids[p:]`` after a cache of ``p`` positions: captured with every block passing its input
    through (the caller holds the compute lock, so no other pass sees the stand-ins)."""
    template = _new_cache()
    for i, (k, v) in enumerate(run.kv):
        template.update(k[:, :, :p], v[:, :, :p], i)
    calls, handles = {}, []
    for i, block in enumerate(loaded.layers):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, i=i: calls.__setitem__(i, (a, dict(k))), with_kwargs=True))
        block.forward = _PassThrough(run.tuple_out[i])
    try:
        with torch.inference_mode():
            loaded.model(input_ids=torch.tensor([ids[p:]], device=loaded.device), use_cache=True,
                         logits_to_keep=1, **{loaded.cache_kwarg: template})
    finally:
        for i, block in enumerate(loaded.layers):
            del block.forward                        # the class's forward again
        for h in handles:
            h.remove()
    if len(calls) != len(loaded.layers):
        raise _Unsupported("the model skipped some decoder blocks")
    return template, calls


class _JoinPatch:
    """The hook target of a block call whose rows ``rows`` join the sweep at this block at a
    site inside it: position 0 of each of those rows (the cell's position) gets the clean
    activation ``values[r]`` (only head ``head``'s slice for site "heads")."""

    def __init__(self, layer: int, site: str, rows: list, values: list, head, head_dim: int):
        self.layer, self.site, self.rows, self.values = layer, site, rows, values
        self.head, self.head_dim = head, head_dim
        self.hot_layers = frozenset()
        self.hot_sites = frozenset([(layer, site)])

    def on_site(self, layer: int, site: str, hidden: torch.Tensor):
        if (layer, site) != (self.layer, self.site):
            return None
        new = hidden.clone()
        for b, src in zip(self.rows, self.values):
            src = src.reshape(-1).to(device=hidden.device, dtype=hidden.dtype)
            if self.head is None:
                new[b, 0] = src
            else:
                sl = slice(self.head * self.head_dim, (self.head + 1) * self.head_dim)
                new[b, 0, sl] = src[sl]
        return new


def _call_block(loaded, l: int, call: tuple, template, kv: tuple, p: int, hidden: torch.Tensor,
                target) -> torch.Tensor:
    """Block ``l`` over ``hidden`` [rows, n - p, hidden] after the corrupted prefix of
    ``p`` positions, with the arguments the model gave it in the template forward."""
    rows = hidden.shape[0]
    cache = _new_cache()
    k, v = kv
    cache.update(k[:, :, :p].expand(rows, -1, -1, -1), v[:, :, :p].expand(rows, -1, -1, -1), l)
    args, kwargs = call
    swap = lambda x: cache if x is template else x       # noqa: E731
    args = (hidden,) + tuple(swap(a) for a in args[1:]) if args else ()
    kwargs = {key: swap(val) for key, val in kwargs.items()}
    if not args:
        kwargs["hidden_states"] = hidden
    with loaded.hooks.active(target):
        return output_tensor(loaded.layers[l](*args, **kwargs))


def incremental_sweep(loaded: LoadedModel, corrupted: list[int], site: str, layers: list[int],
                      positions: list[int], answer, acts: dict, head, rows: int):
    """(cell metrics in layer-major order, corrupted metric) computed incrementally (see the
    module's docstring), or None where this model's blocks cannot be driven so or the
    self-check fails (the caller then runs ``rows_sweep``). ``acts[layer]`` is the clean
    run's activation at ``site`` [n, width]."""
    n, num = len(corrupted), loaded.num_layers
    head_dim = sites.head_geometry(loaded)[1] if head is not None else 0
    joins_after = site == "resid"         # a resid patch is block L's output: join at L + 1
    results: dict = {}
    # the rows of one position live together (layers x positions x hidden): past a GiB the
    # whole-prompt rows, a bounded number per forward, are the better deal
    if len(layers) * n * loaded.hidden_size * loaded.dtype.itemsize > MAX_STATE_BYTES:
        return None
    with torch.inference_mode(), loaded.compute_lock:
        try:
            run = _CorruptedRun(loaded, corrupted, [(layer, site) for layer in layers], keep=layers)
        except _Unsupported:
            return None
        corrupted_metric = _metric(run.logits[None], answer)[0]
        # a cell whose clean activation equals the corrupted one bit for bit (a position
        # before the prompts' first different token) patches nothing: its value is the
        # corrupted run's, as one pass for it would compute
        same = {}
        for layer in layers:
            a, b = acts[layer], run.fp.captured[(layer, site)][0]
            if head is not None:
                sl = slice(head * head_dim, (head + 1) * head_dim)
                a, b = a.reshape(a.shape[0], -1)[:, sl], b.reshape(b.shape[0], -1)[:, sl]
            for p in positions:
                if torch.equal(a[p], b[p]):
                    same[(layer, p)] = corrupted_metric
        results.update(same)
        todo = {p: [layer for layer in layers if (layer, p) not in same] for p in positions}
        # the self-check row: the lowest layer's cell at a middle position, unpatched
        busy = sorted(p for p in set(positions) if todo[p])
        check_p = busy[len(busy) // 2] if busy else None
        for p in busy:
            # cells of position p, in the order they join: (join block, layer or None = check)
            joining = sorted([((l + 1 if joins_after else l), l) for l in todo[p]]
                             + ([((min(layers) + 1 if joins_after else min(layers)), None)]
                                if p == check_p else []),
                             key=lambda c: (c[0], c[1] is None, c[1] if c[1] is not None else -1))
            try:
                template, calls = _block_calls(loaded, run, corrupted, p)
            except _Unsupported:
                return None
            state, owners, j = None, [], 0
            budget = max(1, min(rows, BATCH_TOKENS // (n - p)))
            for l in range(joining[0][0], num + 1):
                new_rows, patch_rows, patch_vals = [], [], []
                while j < len(joining) and joining[j][0] == l:
                    _, layer = joining[j]
                    j += 1
                    if joins_after:          # block (l-1)'s output, the clean value at p
                        h = run.outputs[l - 1][p:].clone()
                        if layer is not None:
                            h[0] = acts[layer][p].reshape(-1).to(device=h.device, dtype=h.dtype)
                    else:                    # block l's input; the site hook patches inside it
                        h = run.inputs[l][p:].clone()
                        if layer is not None:
                            patch_rows.append(len(owners))
                            patch_vals.append(acts[layer][p])
                    new_rows.append(h)
                    owners.append(layer)
                if new_rows:
                    new = torch.stack(new_rows)
                    state = new if state is None else torch.cat([state, new])
                if l == num or state is None:
                    continue
                target = (_JoinPatch(l, site, patch_rows, patch_vals, head, head_dim)
                          if patch_rows else None)
                outs = []
                for a in range(0, state.shape[0], budget):
                    chunk_target = target
                    if target is not None:
                        inside = [(r - a, v) for r, v in zip(patch_rows, patch_vals) if a <= r < a + budget]
                        chunk_target = (_JoinPatch(l, site, [r for r, _ in inside], [v for _, v in inside],
                                                   head, head_dim) if inside else None)
                    try:
                        outs.append(_call_block(loaded, l, calls[l], template, run.kv[l], p,
                                                state[a:a + budget], chunk_target))
                    except _Unsupported:
                        return None
                state = torch.cat(outs) if len(outs) > 1 else outs[0]
            metric = _answer_metric(loaded, state[:, -1], answer)
            for layer, value in zip(owners, metric):
                if layer is None:
                    if abs(value - corrupted_metric) > SELF_CHECK_TOL * max(1.0, abs(corrupted_metric)):
                        return None
                else:
                    results[(layer, p)] = value
    return [results[(layer, p)] for layer in layers for p in positions], corrupted_metric


def patch_row(loaded: LoadedModel, clean: list[int], corrupted: list[int], layer: int, site: str,
              positions: list[int], answer: tuple[int, int], head=None) -> dict:
    """Activation patching at (``layer``, ``site``): for each position p, ``corrupted`` with
    the clean run's activation set at p; the metric is the logit difference at the last
    position. Also the clean and corrupted metrics (no patch)."""
    out = patch_cells(loaded, clean, corrupted, site, [layer], positions, answer, head)
    return {"layer": layer, "site": site, "positions": list(positions), "metric": out["metric"][0],
            "clean": out["clean"], "corrupted": out["corrupted"], "method": out["method"]}
