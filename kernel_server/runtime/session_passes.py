"""The one-shot passes of a server session (score, caches, lens, patching, gradients, steering
vectors, tokens): each checks its arguments through ``kernel_server.model.validation``, then
runs one pass of ``kernel_server.model.passes`` under the model's compute lock; none starts a
generation. ``Session`` (``kernel_server.runtime.session_state``) has them as a base class."""
from __future__ import annotations

import numpy as np

from djinn_protocol.errors import InvalidArgumentError, LimitExceededError
from kernel_server.model import sites, validation
from kernel_server.model import sites as site_names   # (where a parameter is named sites)
from kernel_server.runtime.states import FINISHED, IDLE, PAUSED, READY


class OneShotPasses:
    """Allowed whenever no forward pass of this session runs (idle, paused, finished, ready).
    Uses the session's ``_lock``, ``_require``, ``_site``, ``loaded``, ``limits`` and
    ``interventions``."""

    # ---- one-shot passes (no generation; allowed whenever no forward pass of ours runs) ---
    def score(self, tokens, start=None, steering="session", compare=True, top_k=5,
              return_logits=False) -> dict:
        """Teacher-forced log-probs of ``tokens[start:]`` in one pass (see analysis.score);
        a list of sequences runs as padded batches and gives a list (one ``start`` for all)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if validation.is_batch(tokens):
                seqs = self._prompts_arg(tokens, "tokens")
                if min(len(q) for q in seqs) < 2:
                    raise InvalidArgumentError("score needs at least 2 tokens in every sequence")
                first = 1 if start is None else validation.integer(
                    start, "start", 1, min(len(q) for q in seqs) - 1)
                return analysis.score_many(
                    self.loaded, seqs, [first] * len(seqs), self._rules_arg(steering),
                    validation.boolean(compare, "compare"), validation.integer(top_k, "top_k", 1, 100),
                    validation.boolean(return_logits, "return_logits"))
            ids = validation.prompt_ids(tokens, self.loaded.tokenizer, False, self.limits,
                               self.loaded.vocab_size)
            if len(ids) < 2:
                raise InvalidArgumentError("score needs at least 2 tokens (a context and a target)")
            start = 1 if start is None else validation.integer(start, "start", 1, len(ids) - 1)
            rules = self._rules_arg(steering)
            return analysis.score(self.loaded, ids, start, rules, validation.boolean(compare, "compare"),
                                  validation.integer(top_k, "top_k", 1, 100),
                                  validation.boolean(return_logits, "return_logits"))

    def steering_vector(self, positive, negative, layer, reduce="last") -> np.ndarray:
        """mean(block ``layer`` output | positive prompts) - mean(| negative prompts)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            tok, lim, vocab = self.loaded.tokenizer, self.limits, self.loaded.vocab_size
            pos = validation.prompt_list(positive, "positive", tok, lim, vocab)
            neg = validation.prompt_list(negative, "negative", tok, lim, vocab)
            return analysis.steering_vector(self.loaded, pos, neg,
                                            validation.layer(layer, self.loaded.num_layers),
                                            validation.choice(reduce, "reduce", ("last", "mean")))

    def _prompts_arg(self, value, name: str) -> list:
        """Token ids of each prompt of a batch (a list of texts / id lists), at most 256."""
        return validation.prompt_list(value, name, self.loaded.tokenizer, self.limits,
                                      self.loaded.vocab_size)

    def _rules_arg(self, steering) -> list:
        if steering == "session":
            return list(self.interventions.rules)
        if steering is None:
            return []
        if isinstance(steering, list):        # SAEs named in expressions: their weights inline
            from kernel_server.model.sae import resolve_names
            steering = [{**d, "edit": resolve_names(d["edit"], self.saes)}
                        if isinstance(d, dict) and "edit" in d else d for d in steering]
        rules = validation.rules(steering, self.loaded, self.limits)
        for r in rules:
            if r.site in sites.READ_ONLY:
                raise InvalidArgumentError(f"site {r.site!r} is read-only: no steering rule there")
            self.loaded.hooks.install_site(sites.resolve(self.loaded, r.layer, r.site))
        return rules

    def _layers_arg(self, layers) -> list:
        n = self.loaded.num_layers
        if layers is None:
            return list(range(n))
        if isinstance(layers, int) and type(layers) is not bool:
            layers = [layers]
        if not isinstance(layers, list) or not layers or len(layers) > n:
            raise InvalidArgumentError("layers must be None (all), an int or a list of layer indices")
        return sorted({validation.layer(x, n) for x in layers})

    def tokenize(self, text) -> list:
        """Token ids of ``text`` (no special tokens), as ``generate`` would see it."""
        with self._lock:
            if not isinstance(text, str):
                raise InvalidArgumentError("text must be a str")
            return validation.prompt_ids(text, self.loaded.tokenizer, False, self.limits, self.loaded.vocab_size)

    def decode(self, tokens) -> str:
        with self._lock:
            ids = validation.prompt_ids(tokens, self.loaded.tokenizer, False, self.limits, self.loaded.vocab_size)
            return self.loaded.tokenizer.decode(ids)

    def cache(self, prompt, sites=("resid",), layers=None, reduce=None, steering=None) -> dict:
        """One forward pass over ``prompt``; the activations of ``sites`` x ``layers``,
        reduced on the server (see analysis.cache); a list of prompts runs as padded
        batches and gives a list of caches."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            batch = self._prompts_arg(prompt, "prompt") if validation.is_batch(prompt) else None
            ids = max(batch, key=len) if batch else validation.prompt_ids(
                prompt, self.loaded.tokenizer, False, self.limits, self.loaded.vocab_size)
            if isinstance(sites, str):
                sites = [sites]
            if not isinstance(sites, (list, tuple)) or not sites or len(sites) > 16:
                raise InvalidArgumentError("sites must be a site name or a list of 1..16 of them")
            if reduce is not None:
                validation.choice(reduce, "reduce", ("last", "mean", "norm"))
            layers = self._layers_arg(layers)
            keys = []
            for name in sites:
                for layer in ([None] if isinstance(name, str) and name.startswith("module:") else layers):
                    resolved, _, _, _ = self._site(layer, name, writable=False)
                    if resolved.key not in keys:        # (a hook name holds its one layer)
                        keys.append(resolved.key)
            per_row = self.loaded.hidden_size * 4 * (len(ids) if reduce in (None, "norm") else 1)
            if reduce is None and len(keys) * per_row * len(ids) * len(batch or [1]) > 2**30:
                raise LimitExceededError("this cache would be over 1 GiB: ask for fewer layers or "
                                         "sites, or a reduce= ('last', 'mean', 'norm')")
            if batch:
                return analysis.cache_many(self.loaded, batch, keys, reduce, self._rules_arg(steering))
            return analysis.cache(self.loaded, ids, keys, reduce, self._rules_arg(steering))

    def lens(self, prompt, layers=None, k=10, target=None) -> dict:
        """Logit lens of the prompt's last position after each of ``layers``, one pass (a
        list of prompts: padded batches, a list of results)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            if target is not None:
                target = validation.integer(target, "target", 0, self.loaded.vocab_size - 1)
            if validation.is_batch(prompt):
                return analysis.lens_many(self.loaded, self._prompts_arg(prompt, "prompt"),
                                          self._layers_arg(layers), validation.integer(k, "k", 1, 1000),
                                          target)
            ids = validation.prompt_ids(prompt, self.loaded.tokenizer, False, self.limits,
                               self.loaded.vocab_size)
            return analysis.lens_layers(self.loaded, ids, self._layers_arg(layers),
                                        validation.integer(k, "k", 1, 1000), target)

    def patch(self, clean, corrupted, layer, answer, positions=None, site="resid", head=None) -> dict:
        """Activation patching of one layer, its positions as the rows of one batch (see
        kernel_server.model.patching.patch_row)."""
        from kernel_server.model import patching
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            clean_ids, bad_ids, name, layers, positions, answer, head = self._patch_args(
                clean, corrupted, layer, answer, positions, site, head)
            return patching.patch_row(self.loaded, clean_ids, bad_ids, layers[0], name,
                                      positions, answer, head)

    def patch_sweep(self, clean, corrupted, answer, layers=None, positions=None, site="resid",
                    head=None, batch=64) -> dict:
        """Activation patching of every layer x position cell in one call, ``batch`` cells
        as the rows of one forward (see kernel_server.model.patching)."""
        from kernel_server.model import patching
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            clean_ids, bad_ids, name, layers, positions, answer, head = self._patch_args(
                clean, corrupted, layers, answer, positions, site, head, many=True)
            if len(layers) * len(positions) > 4096:
                raise LimitExceededError(f"{len(layers) * len(positions)} patching cells in one call "
                                         "is over the limit of 4096: split the layers")
            return patching.patch_cells(self.loaded, clean_ids, bad_ids, name, layers, positions,
                                        answer, head, validation.integer(batch, "batch", 1, 256))

    def attribution_patch(self, clean, corrupted, answer, layers=None, site="resid") -> dict:
        """Attribution patching: the first-order estimate of the patching grid from one
        clean forward and one corrupted forward + backward (see analysis.attribution_patch)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            clean_ids, bad_ids, name, layers, _, answer, _ = self._patch_args(
                clean, corrupted, layers, answer, None, site, None, many=True)
            if name not in ("resid", "attn", "mlp", "heads"):
                raise InvalidArgumentError(f"attribution patching works on resid, attn, mlp, heads; "
                                           f"not {name!r}")
            self._check_grad_memory(len(bad_ids))
            return analysis.attribution_patch(self.loaded, clean_ids, bad_ids, name, layers, answer)

    def grad(self, prompt, metric="logit_diff", answer=None, target=None, start=None,
             sites=("resid",), layers=None, reduce=None) -> dict:
        """d(metric)/d(activation) at ``sites`` x ``layers`` (see analysis.grad)."""
        from kernel_server.model import passes as analysis
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            vocab = self.loaded.vocab_size
            ids = validation.prompt_ids(prompt, self.loaded.tokenizer, False, self.limits, vocab)
            kind = validation.choice(metric, "metric", ("logit_diff", "logprob", "loss"))
            spec: dict = {"kind": kind}
            if kind == "logit_diff":
                if not isinstance(answer, list) or len(answer) != 2:
                    raise InvalidArgumentError("metric='logit_diff' needs answer=[correct, wrong] token ids")
                spec["answer"] = tuple(validation.integer(a, "answer token", 0, vocab - 1) for a in answer)
            elif kind == "logprob":
                if target is None:
                    raise InvalidArgumentError("metric='logprob' needs target= (a token id)")
                spec["target"] = validation.integer(target, "target", 0, vocab - 1)
            else:
                if len(ids) < 2:
                    raise InvalidArgumentError("metric='loss' needs at least 2 tokens")
                spec["start"] = 1 if start is None else validation.integer(start, "start", 1, len(ids) - 1)
            if reduce is not None:
                validation.choice(reduce, "reduce", ("last", "mean", "norm"))
            if isinstance(sites, str):
                sites = [sites]
            if not isinstance(sites, (list, tuple)) or not sites or len(sites) > 16:
                raise InvalidArgumentError("sites must be a site name or a list of 1..16 of them")
            keys = []
            for name in sites:
                for layer in self._layers_arg(layers):
                    resolved, _, _, _ = self._site(layer, name, writable=False)
                    if resolved.layer < 0 or resolved.name in site_names.READ_ONLY:
                        # (resid_mid: a gradient there would miss the residual path)
                        raise InvalidArgumentError("gradients are taken at block sites (resid, attn, "
                                                   f"mlp, heads), not {name!r:.80}")
                    if resolved.key not in keys:
                        keys.append(resolved.key)
            self._check_grad_memory(len(ids))
            return analysis.grad(self.loaded, ids, keys, spec, reduce)

    def _check_grad_memory(self, n: int) -> None:
        from kernel_server.model import passes as analysis
        need = analysis.grad_bytes(self.loaded, n)
        if need > analysis.GRAD_BYTES:
            raise LimitExceededError(
                f"a gradient pass over {n} tokens would hold about {need / 2**30:.1f} GiB for its "
                f"backward, over the limit of {analysis.GRAD_BYTES / 2**30:.0f} GiB: use a shorter prompt")

    def _patch_args(self, clean, corrupted, layers, answer, positions, site, head, many=False):
        """Checked arguments of a patching call: (clean ids, corrupted ids, site name,
        layers, positions, answer, head)."""
        tok, lim, vocab = self.loaded.tokenizer, self.limits, self.loaded.vocab_size
        clean_ids = validation.prompt_ids(clean, tok, False, lim, vocab)
        bad_ids = validation.prompt_ids(corrupted, tok, False, lim, vocab)
        if len(clean_ids) != len(bad_ids):
            raise InvalidArgumentError(
                f"clean and corrupted prompts must have the same number of tokens "
                f"({len(clean_ids)} vs {len(bad_ids)}) so that positions line up")
        layer_list = self._layers_arg(layers) if many else [layers]
        names = set()
        for i, layer in enumerate(layer_list):
            resolved, head_i, _, _ = self._site(layer, site, head)
            if resolved.layer < 0:
                raise InvalidArgumentError("patching works on block sites (resid, attn, mlp, heads)")
            layer_list[i] = resolved.layer
            names.add(resolved.name)
        head = head_i
        if not isinstance(answer, list) or len(answer) != 2:
            raise InvalidArgumentError("answer must be two token ids [correct, wrong]")
        answer = tuple(validation.integer(a, "answer token", 0, vocab - 1) for a in answer)
        n = len(clean_ids)
        positions = list(range(n)) if positions is None else \
            [validation.integer(p, "position", 0, n - 1) for p in (positions if isinstance(positions, list) else [positions])]
        return clean_ids, bad_ids, names.pop(), layer_list, positions, answer, head

    def to_str_tokens(self, text) -> list:
        """The text of each token of ``text`` (TransformerLens's ``to_str_tokens``)."""
        with self._lock:
            ids = validation.prompt_ids(text, self.loaded.tokenizer, False, self.limits,
                                        self.loaded.vocab_size)
            return [self.loaded.tokenizer.decode([t]) for t in ids]

    # ---- sparse autoencoders --------------------------------------------------------------
    def load_sae(self, path, layer=None, site=None, sae=None) -> dict:
        """Load the SAE saved (SAELens's format) in the server directory ``path`` for the site
        it reads: ``layer``/``site`` (a site name or a TransformerLens hook name), by default
        the ``hook_name`` of its cfg.json. Checked against the site's width; kept by this
        session under the name ``sae`` (default: the directory's name)."""
        from pathlib import Path

        from kernel_server.model import sae as saes
        with self._lock:
            self._require(IDLE, PAUSED, FINISHED, READY)
            cfg, tensors = saes.read_files(path)
            name = sae
            if name is None:
                name = Path(path).name or "sae"
            if not isinstance(name, str) or not 0 < len(name) <= 64:
                raise InvalidArgumentError("name must be a str of 1..64 characters")
            if name not in self.saes and len(self.saes) >= saes.MAX_SAES_PER_SESSION:
                raise LimitExceededError(f"a session holds at most {saes.MAX_SAES_PER_SESSION} SAEs")
            if site is None:
                site = saes.hook_name_of(cfg)
                if site is None:
                    raise InvalidArgumentError("the SAE's cfg.json names no hook_name: give layer= "
                                               "and site=")
                if layer is None and not site.startswith("blocks."):
                    raise InvalidArgumentError(f"the SAE's hook_name {site!r:.80} is not a block "
                                               "site: give layer= and site=")
            elif layer is None and not site.startswith("blocks."):
                raise InvalidArgumentError("give layer= (or a hook name such as "
                                           "'blocks.6.hook_resid_post' as site=)")
            resolved, _, width, device = self._site(layer, site, writable=False)
            if resolved.name not in saes.SAE_SITES:
                raise InvalidArgumentError(f"an SAE reads a block site ({', '.join(saes.SAE_SITES)}), "
                                           f"not {resolved.name!r:.80}")
            sae = saes.build(cfg, tensors, name, resolved.layer, resolved.name, width, device)
            self.saes[name] = sae
            return sae.info()

    def _sae_arg(self, name):
        if not isinstance(name, str) or name not in self.saes:
            raise InvalidArgumentError(f"no SAE named {str(name)[:64]!r} is loaded in this session "
                                       f"(loaded: {', '.join(self.saes) or 'none'}; s.load_sae(path))")
        return self.saes[name]

    def sae_features(self, sae, prompt=None, k=10, features=None, steering=None) -> dict:
        """The SAE's top-``k`` features at each position (and ``features``' activations),
        reduced on the server: over ``prompt`` (one forward pass), or with no prompt at the
        paused activation, which must be the SAE's layer and site."""
        import torch

        from kernel_server.model import passes as analysis
        from kernel_server.model.sae import top_features
        with self._lock:
            spec = self._sae_arg(sae)
            k = validation.integer(k, "k", 1, min(1000, spec.d_sae))
            if features is not None:
                if not isinstance(features, list) or not 0 < len(features) <= 1024:
                    raise InvalidArgumentError("features must be a list of 1..1024 feature indices")
                features = [validation.integer(f, "feature", 0, spec.d_sae - 1) for f in features]
            if prompt is None:
                self._require(PAUSED)
                point = self.run.pause
                if (point.layer, point.site) != (spec.layer, spec.site):
                    raise InvalidArgumentError(
                        f"SAE {spec.name!r} reads layer {spec.layer} site {spec.site!r}; the session "
                        f"is paused at layer {point.layer} site {point.site!r}")
                if steering is not None:
                    raise InvalidArgumentError("steering= applies to a prompt's pass, not a pause")
                x = point.hidden[0]
                out = top_features(spec, x, k, features)
                out["positions"] = list(range(point.start, point.start + int(x.shape[0])))
                out["step"] = point.step
            else:
                self._require(IDLE, PAUSED, FINISHED, READY)
                ids = validation.prompt_ids(prompt, self.loaded.tokenizer, False, self.limits,
                                            self.loaded.vocab_size)
                raw = analysis.cache(self.loaded, ids, [(spec.layer, spec.site)], None,
                                     self._rules_arg(steering))
                x = torch.from_numpy(raw[spec.site][str(spec.layer)])
                out = top_features(spec, x, k, features)
                out["positions"] = list(range(len(ids)))
                out["tokens"] = [self.loaded.tokenizer.decode([t]) for t in ids]
            out.update(sae=spec.name, layer=spec.layer, site=spec.site, k=k,
                       features=features)
            return out
