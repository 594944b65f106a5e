"""The ``Session`` proxy: one server-side generation state, driven from the notebook.

Nothing heavy lives here: every method is one call to the kernel server, which keeps
the KV cache, the paused hidden state and the steering rules.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from .results import Finished, GenerationInterrupted, Paused, event_from_wire

Positions = Union[str, int, Sequence[int]]   # "all" | "last" | absolute token positions
Event = Union[Paused, Finished]


def _checkpoint_id(ck):
    """A ``Checkpoint`` or its id (a typo'd id is the server's ``CheckpointError``)."""
    return ck if isinstance(ck, str) else getattr(ck, "id", ck)


def _positions(p: Positions):
    return p if isinstance(p, str) else [int(x) for x in np.atleast_1d(p)]


def _expression(edit):
    """An intervention expression (``dj.ops``) as its wire tree."""
    return edit.to_wire() if hasattr(edit, "to_wire") else edit


def _rule_dicts(steering):
    """One-shot ``steering=[{...}]`` with any ``edit`` expression as its wire tree."""
    if isinstance(steering, list):
        return [{k: _expression(v) if k == "edit" else v for k, v in d.items()}
                if isinstance(d, dict) else d for d in steering]
    return steering


class Session:
    """Generation state on the server: token ids, KV cache, breakpoints, steering rules.

    States: idle -> running -> paused <-> running -> finished, and closed; after
    ``restore()`` / ``fork()`` / ``load_checkpoint()``: ready (``resume()`` continues)."""

    def __init__(self, client, info: dict):
        self.client = client
        self.id: str = info["id"]
        self.model: str = info["model"]
        self.layers: int = info["layers"]
        self.hidden_size: int = info["hidden_size"]
        self.vocab_size: int = info["vocab_size"]
        self.device: str = info["device"]
        self.dtype: str = info["dtype"]
        self.architecture: str = info["architecture"]
        # a model over several devices: all of them, and where each decoder layer computes
        self.devices: list = info.get("devices", [self.device])
        self.layer_devices: list = info.get("layer_devices", [self.device] * self.layers)
        self.last_event: Optional[Event] = None
        self._closed = False
        #: the SAEs loaded through this proxy (``load_sae``), name -> description
        self.saes: dict = {}

    def _request(self, name: str, **kwargs):
        if self._closed:
            from djinn_protocol.errors import SessionClosedError
            raise SessionClosedError(f"session {self.id} is closed; open another with "
                                     "client.session()")
        return self.client.call(name, session=self.id, **kwargs)

    def _run(self, name: str, **kwargs) -> Event:
        """A call that runs the model until a pause or the end. Ctrl-C while it waits ends
        the server's run at its next step boundary and raises ``GenerationInterrupted``
        (a KeyboardInterrupt) holding the event, the tokens so far."""
        try:
            return self._event(self._request(name, **kwargs))
        except KeyboardInterrupt:
            reply = self.client._end_interrupted(self.id)
            if reply is None:
                raise
            raise GenerationInterrupted(self._event(reply)) from None

    def _event(self, wire_event: dict) -> Event:
        self.last_event = event_from_wire(wire_event)
        return self.last_event

    # ---- state -------------------------------------------------------------------------
    def info(self) -> dict:
        """State, model facts, breakpoints and steering rules, as the server sees them."""
        return self._request("session_info")

    @property
    def state(self) -> str:
        return self.info()["state"]

    # ---- breakpoints and steering ------------------------------------------------------
    def breakpoint(self, layer: Optional[int] = None, phase: str = "decode",
                   steps: Optional[Sequence[int]] = None, site: str = "resid") -> dict:
        """Pause at ``site`` of decoder block ``layer`` (0-based) on ``phase`` "decode"
        (steps 1..), "prefill" (step 0) or "both"; on every step, or only on ``steps``.

        ``site``: "resid" (the block output, default), "attn" / "mlp" (the sub-block
        output before the residual add), "heads" (per-head attention output, read as
        [positions, heads, head_dim]) or "module:<dotted.path>" (any module's output;
        ``layer`` is then not needed)."""
        return self._request("set_breakpoint", layer=layer, phase=phase, site=site,
                          steps=None if steps is None else list(np.atleast_1d(steps).tolist()))

    def clear_breakpoints(self, layer: Optional[int] = None, site: Optional[str] = None) -> int:
        """Remove all breakpoints (or those at ``layer`` / ``site``); returns how many."""
        return self._request("clear_breakpoints", layer=layer, site=site)

    def steer(self, layer: Optional[int] = None, *, scale: Optional[float] = None, add=None,
              alpha: float = 1.0, set=None, edit=None, positions: Positions = "all", phase: str = "both",
              steps: Optional[Sequence[int]] = None, site: str = "resid",
              head: Optional[int] = None, rows: Optional[Sequence[int]] = None,
              sae: Optional[str] = None, feature: Optional[int] = None,
              clamp: Optional[float] = None) -> dict:
        """A standing edit of block ``layer``'s output on every step (no pause):
        ``scale`` (h <- s*h), ``add`` (h <- h + alpha*v, v of shape [hidden]) or ``set``
        (patching: ``set=cached_rows, positions=[...]``). ``site`` as in ``breakpoint``;
        ``site="heads", head=3, scale=0.0`` zero-ablates head 3 (vectors are then
        [head_dim]). ``rows``: in a batched generation, only these prompts (default all).
        ``edit``: an expression over the activation ``h`` (``dj.ops``), evaluated on the server,
        e.g. ``edit=dj.ops.ablate(dj.ops.h, v)`` (direction ablation).

        ``sae=name, feature=i``: steer by a feature of a loaded SAE (``load_sae``), at the
        SAE's layer and site: add ``alpha`` x its decoder direction, or with ``clamp=c`` set
        its activation to ``c`` and add the SAE's reconstruction error back
        (``decode(f with f[i]=c) + (h - decode(f))``, an expression over ``dj.ops.sae_encode``)."""
        return self._request("steer", layer=layer, scale=scale, add=add, alpha=alpha, set=set,
                             edit=_expression(edit), sae=sae,
                             feature=None if feature is None else int(feature),
                             clamp=None if clamp is None else float(clamp),
                          positions=_positions(positions), phase=phase, site=site, head=head,
                          rows=None if rows is None else [int(r) for r in np.atleast_1d(rows)],
                          steps=None if steps is None else list(np.atleast_1d(steps).tolist()))

    def clear_steering(self, rule_id: Optional[int] = None) -> int:
        """Remove all steering rules (or the one with ``rule_id``)."""
        return self._request("clear_steering", rule_id=rule_id)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 20, *, chat: bool = False,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None, stop_at_eos: bool = True, record_top_k: int = 5,
                 return_logits: bool = False) -> Event:
        """Start generating from ``prompt`` (raw text, token ids, or chat messages; ``chat=True``
        applies the chat template to a text). Runs until a breakpoint pauses it (``Paused``)
        or it ends (``Finished``). Greedy unless ``temperature > 0`` (seeded sampling).

        A list of prompts (texts or token-id lists) runs them as one batch, left-padded
        with attention masks: the result is a ``BatchFinished`` with one result per
        prompt, each greedy row the same tokens as its prompt alone. Breakpoints pause the
        whole batch; ``steer(..., rows=[i])`` steers chosen rows."""
        return self._run(
            "generate", prompt=prompt, max_new_tokens=max_new_tokens, chat=chat,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos,
            record_top_k=record_top_k, return_logits=return_logits)

    def resume(self, ignore_breakpoints: bool = False) -> Event:
        """Continue to the next pause or the end (``ignore_breakpoints=True``: to the end)."""
        return self._run("resume", ignore_breakpoints=ignore_breakpoints)

    def step(self, to: str = "layer") -> Event:
        """Continue and pause again at the next layer (``to="layer"``) or at the same layer
        of the next token (``to="token"``)."""
        return self._run("step", to=to)

    def stop(self) -> Finished:
        """Abandon the paused generation; the result holds the tokens made so far."""
        return self._event(self._request("stop"))

    def interrupt(self) -> bool:
        """Ask this session's running ``generate`` / ``resume`` / ``step`` (waiting on another
        thread) to end at its next step boundary; that call then returns an ``Interrupted``
        event with the tokens so far. True if a running generation was asked. Safe from any
        thread: it goes over the client's rpyc connection, beside the waiting call."""
        if self._closed:
            return False
        return self.client.call_aside("interrupt", session=self.id)

    # ---- one-shot passes --------------------------------------------------------------------
    def score(self, tokens, *, start: Optional[int] = None, steering="session",
              compare: bool = True, top_k: int = 5, return_logits: bool = False) -> "ScoreResult":
        """Teacher-forced scoring in one server pass: the log-prob of every token of
        ``tokens[start:]`` (token ids, or a text) given the tokens before it, under
        ``steering``: "session" (this session's standing rules), None, or a list of rule
        dicts with ``steer()``'s keywords (``[{"layer": 6, "scale": 0.9}]``). Rules are
        applied as in a generation whose prompt is ``tokens[:start]`` (``start`` defaults
        to 1; pass ``len(result.prompt_tokens)`` to score a generation's own tokens).

        ``compare=True`` also runs the sequence unsteered on the server and returns per
        position KL(unsteered || steered), total variation, top-1 agreement and relative
        logit change, with no full-vocabulary logits on the wire (``return_logits=True``
        sends the steered ones, [positions, vocab])."""
        from .results import ScoreResult
        res = getattr(tokens, "result", tokens)
        if hasattr(res, "prompt_tokens"):               # a GenerationResult / Finished
            start = len(res.prompt_tokens) if start is None else start
            tokens = list(res.prompt_tokens) + list(res.tokens)
        if isinstance(tokens, np.ndarray):
            tokens = [int(t) for t in tokens]
        if isinstance(steering, dict):
            steering = [steering]
        reply = self._request(
            "score", tokens=tokens, start=start, steering=_rule_dicts(steering), compare=compare,
            top_k=top_k,
            return_logits=return_logits)
        if isinstance(reply, list):                     # a list of sequences: one each
            return [ScoreResult.from_wire(r) for r in reply]
        return ScoreResult.from_wire(reply)

    def steering_vector(self, positive: Sequence, negative: Sequence, layer: int,
                        reduce: str = "last") -> np.ndarray:
        """A steering vector from contrastive prompts: the mean of block ``layer``'s output
        over ``positive`` minus its mean over ``negative`` (each prompt reduced to its last
        position, or with ``reduce="mean"`` the mean over its positions). float32
        ``[hidden]``; use it with ``steer(layer, add=v, alpha=...)``, save it with ``np.save``."""
        return np.asarray(self._request("steering_vector", positive=list(positive),
                                     negative=list(negative), layer=layer, reduce=reduce))

    def tokenize(self, text: str) -> list:
        """Token ids of ``text`` as the server's tokenizer makes them (no special tokens)."""
        return self._request("tokenize", text=text)

    def decode(self, tokens) -> str:
        return self._request("decode", tokens=[int(t) for t in tokens])

    def cache(self, prompt, sites: Union[str, Sequence[str]] = "resid",
              layers: Optional[Union[int, Sequence[int]]] = None, reduce: Optional[str] = None,
              steering=None) -> "ActivationCache":
        """Run one forward pass over ``prompt`` and return the activations of every site x
        layer (all layers by default), reduced on the server: ``reduce=None`` (every
        position), "last", "mean" or "norm" (a 30-layer cache of norms is a few KB).
        Sites as in ``breakpoint`` plus "attn_pattern" ([heads, query, key], computed
        with eager attention). ``steering``: None (default), "session" or rule dicts."""
        from .analysis import ActivationCache
        raw = self._request("cache", prompt=prompt, sites=[sites] if isinstance(sites, str) else list(sites),
                         layers=None if layers is None else [int(x) for x in np.atleast_1d(layers)],
                         reduce=reduce, steering=_rule_dicts(steering))
        if isinstance(raw, list):             # a list of prompts (padded batches): one cache each
            return [ActivationCache(r, reduce) for r in raw]
        return ActivationCache(raw, reduce)

    def lens(self, prompt, layers: Optional[Sequence[int]] = None, k: int = 10,
             target: Optional[Union[int, str]] = None) -> dict:
        """Logit lens over layers in one pass: the top-k next tokens read from the last
        position after each layer (and, with ``target``, that token's probability per
        layer next to the model's own). ``target`` may be a token id or a one-token text."""
        if isinstance(target, str):
            ids = self.tokenize(target)
            if len(ids) != 1:
                raise ValueError(f"target {target!r} is {len(ids)} tokens; give one token")
            target = ids[0]
        return self._request("lens", prompt=prompt, k=k, target=target,
                          layers=None if layers is None else [int(x) for x in np.atleast_1d(layers)])

    def patch(self, clean, corrupted, answer, layers: Optional[Sequence[int]] = None,
              positions: Optional[Sequence[int]] = None, site: str = "resid",
              head: Optional[int] = None, progress: bool = True,
              batch: int = 64) -> "PatchingResult":
        """Activation patching sweep: for every layer x position, run ``corrupted`` with
        the clean run's activation at that site and position, and measure the logit
        difference ``logit[answer[0]] - logit[answer[1]]`` at the last position.
        Prompts must have the same token count; ``answer`` is two token ids or texts.
        The cells run on the server as the rows of batched forwards, ``batch`` cells per
        forward; one call per group of layers feeds the progress bar (interrupting the
        notebook stops the sweep between groups)."""
        from tqdm.auto import tqdm
        from .analysis import PatchingResult
        answer = [a if isinstance(a, int) else self._one_token(a) for a in answer]
        layers = list(range(self.layers)) if layers is None else [int(x) for x in np.atleast_1d(layers)]
        width = len(positions) if positions is not None else len(
            clean if isinstance(clean, list) else self.tokenize(clean))
        per_call = max(1, batch // max(1, width)) if progress else len(layers)
        grids = []
        with tqdm(total=len(layers), desc=f"patching {site}", disable=not progress, leave=False) as bar:
            for i in range(0, len(layers), per_call):
                group = layers[i:i + per_call]
                grids.append(self._request(
                    "patch_sweep", clean=clean, corrupted=corrupted, answer=answer, layers=group,
                    site=site, head=head, batch=batch,
                    positions=None if positions is None else [int(p) for p in positions]))
                bar.update(len(group))
        return PatchingResult.from_grids(grids, answer)

    def attribution_patch(self, clean, corrupted, answer, layers: Optional[Sequence[int]] = None,
                          site: str = "resid") -> "PatchingResult":
        """Attribution patching: the first-order (gradient) estimate of ``patch``'s grid, from
        one clean forward and one corrupted forward + backward on the server:
        ``corrupted + (clean act - corrupted act) . d(logit diff)/d(act)`` per layer x position."""
        from .analysis import PatchingResult
        answer = [a if isinstance(a, int) else self._one_token(a) for a in answer]
        return PatchingResult.from_grids([self._request(
            "attribution_patch", clean=clean, corrupted=corrupted, answer=answer, site=site,
            layers=None if layers is None else [int(x) for x in np.atleast_1d(layers)])], answer)

    def grad(self, prompt, metric: str = "logit_diff", *, answer=None, target=None,
             start: Optional[int] = None, sites: Union[str, Sequence[str]] = "resid",
             layers: Optional[Union[int, Sequence[int]]] = None,
             reduce: Optional[str] = None) -> "ActivationCache":
        """d(metric)/d(activation) at every site x layer for ``prompt``, in one forward +
        backward on the server (no KV cache, under the model's compute lock), reduced there
        as ``cache`` reduces. ``metric``: "logit_diff" (``answer`` = [correct, wrong], ids or
        one-token texts; at the last position), "logprob" (``target``: log p at the last
        position) or "loss" (mean next-token cross-entropy of the prompt's tokens from
        ``start``, default 1). An ``ActivationCache`` of gradients; ``.metric`` its value."""
        from .analysis import ActivationCache
        if answer is not None:
            answer = [a if isinstance(a, int) else self._one_token(a) for a in answer]
        if isinstance(target, str):
            target = self._one_token(target)
        raw = self._request("grad", prompt=prompt, metric=metric, answer=answer, target=target,
                            start=start, sites=[sites] if isinstance(sites, str) else list(sites),
                            layers=None if layers is None else [int(x) for x in np.atleast_1d(layers)],
                            reduce=reduce)
        return ActivationCache(raw["grads"], reduce, metric=float(raw["metric"]))

    # ---- sparse autoencoders ---------------------------------------------------------------
    def load_sae(self, path: str, layer: Optional[int] = None, site: Optional[str] = None,
                 name: Optional[str] = None) -> dict:
        """Load a sparse autoencoder saved in SAELens's format (a directory with cfg.json and
        sae_weights.safetensors: W_enc, b_enc, W_dec, b_dec[, threshold]) from ``path`` on the
        *server* (absolute). It reads ``site`` of ``layer`` (a site name, or a TransformerLens
        hook name such as "blocks.6.hook_resid_post"; default: its cfg.json's ``hook_name``);
        ``d_in`` must be that site's width. Kept by this session as ``name`` (default: the
        directory's name); returns its description (name, layer, site, d_in, d_sae, ...)."""
        info = self._request("load_sae", path=str(path), layer=layer, site=site, sae=name)
        self.saes[info["name"]] = info
        return info

    def sae_features(self, prompt=None, *, sae: str, k: int = 10,
                     features: Optional[Sequence[int]] = None, steering=None) -> "SAEFeatures":
        """The top-``k`` features of SAE ``sae`` at each position, computed and reduced on the
        server: over ``prompt`` (one forward pass; ``steering`` as in ``cache``), or with no
        prompt at the current pause (which must be at the SAE's layer and site).
        ``features``: also those features' activations at every position."""
        from .analysis import SAEFeatures
        return SAEFeatures(self._request(
            "sae_features", sae=sae, prompt=prompt, k=k, steering=_rule_dicts(steering),
            features=None if features is None else [int(f) for f in np.atleast_1d(features)]))

    def to_str_tokens(self, text) -> list:
        """The text of each token of ``text`` as the server's tokenizer splits it."""
        return self._request("to_str_tokens", text=text)

    def _one_token(self, text: str) -> int:
        ids = self.tokenize(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens; give one token (or its id)")
        return ids[0]

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint(self, row: Union[int, str, None] = None):
        """Snapshot the generation state now (at once; the copy runs in the background).
        While paused mid-forward it captures the start of the current token.

        A checkpoint holds one sequence. After a batch call (``generate([p1, ...])``,
        paused or finished) ``row=b`` checkpoints row b: its own prompt and tokens, KV
        cache, sampling RNG and the rules that act on it; restored or forked it continues
        as the row would have. ``row="all"``: a list, one ``Checkpoint`` per row (all taken
        or none). Without ``row`` a batch session's checkpoint is a ``CheckpointError``."""
        from .checkpoint import Checkpoint
        out = self._request("checkpoint", row=row)
        if isinstance(out, list):
            return [Checkpoint(self.client, d) for d in out]
        return Checkpoint(self.client, out)

    def restore(self, ck) -> None:
        """Rewind this session to ``ck``; it is then "ready": ``resume()`` continues."""
        self._request("restore", checkpoint=_checkpoint_id(ck))
        self.last_event = None

    def fork(self, ck) -> "Session":
        """A new, independent session starting from ``ck`` (state "ready")."""
        return Session(self.client, self.client.call("fork", checkpoint=_checkpoint_id(ck)))

    # ---- while paused ----------------------------------------------------------------------
    def activation(self, positions: Positions = "all", reduce: Optional[str] = None,
                   row: Optional[int] = None) -> np.ndarray:
        """The paused layer's output, float32 ``[positions, hidden]`` (with ``reduce="norm"``:
        ``[positions]``; ``"mean"``: ``[hidden]``). Edits made so far are included."""
        return self._request("activation", positions=_positions(positions), reduce=reduce, row=row)

    def edit(self, *, scale: Optional[float] = None, add=None, alpha: float = 1.0, set=None,
             edit=None, positions: Positions = "all", head: Optional[int] = None) -> dict:
        """Rewrite the paused hidden state before the forward pass goes on (``head``: only
        that head, when paused at site "heads")."""
        return self._request("edit", scale=scale, add=add, alpha=alpha, set=set,
                             edit=_expression(edit), head=head,
                          positions=_positions(positions))

    def logit_lens(self, k: int = 10, positions: Positions = "last") -> dict:
        """The paused hidden state read through the final norm and the unembedding:
        ``top_ids`` / ``top_probs`` [positions, k] and ``top_tokens`` (texts)."""
        return self._request("logit_lens", k=k, positions=_positions(positions))

    # ---- lifetime ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once the session was closed (``close()``) or lost with its server."""
        return self._closed

    def move(self, target="least-loaded") -> dict:
        """Continue this (paused) session on another replica of its cluster: ``"least-loaded"``
        or a replica's name (see :func:`djinn_nb.move`; needs a ``cluster://`` connection)."""
        cluster = getattr(self.client, "cluster", None)
        if cluster is None:
            from djinn_protocol.errors import InvalidArgumentError
            raise InvalidArgumentError("move() needs a session opened through "
                                       "dj.connect('cluster://...')")
        return cluster.move(self, target)

    def close(self) -> None:
        """Release the session (and its KV cache) on the server; later calls raise
        ``SessionClosedError``. Closing twice is a no-op."""
        if self._closed:
            return
        self.client.call("close_session", session=self.id)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.client.closed:
            self.close()

    def __repr__(self):
        return (f"<djinn_nb.Session {self.id} {self.model}: {self.layers} layers, hidden "
                f"{self.hidden_size}, {self.device}/{self.dtype}>")
