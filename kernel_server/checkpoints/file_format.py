"""Checkpoint files: the checkpoint as safetensors plus JSON metadata and a hash, and back,
every field checked against the model it is loaded into as if it came through the API."""
from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import torch

from djinn_protocol import __version__
from djinn_protocol.expressions import join_constants, split_constants
from djinn_protocol.checkpoint_file import FORMAT, read_header
from djinn_protocol.errors import CheckpointError, DjinnError
from kernel_server.runtime.generation import GenerationConfig, GenState
from kernel_server.model.interventions import Breakpoint, Interventions
from kernel_server.model.registry import LoadedModel
from kernel_server.checkpoints.snapshot import Checkpoint, tensor_nbytes


# ---- the file format ---------------------------------------------------------------------
def _model_identity(loaded: LoadedModel) -> dict:
    return {"model": loaded.name, "architecture": type(loaded.model).__name__,
            "layers": loaded.num_layers, "hidden_size": loaded.hidden_size,
            "vocab_size": loaded.vocab_size, "dtype": str(loaded.dtype).removeprefix("torch.")}


def content_digest(meta_json: str, tensors: dict) -> str:
    h = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes()
                 if tensors[key].numel() else b"")
    return h.hexdigest()


def to_bytes(ck: Checkpoint, loaded: LoadedModel) -> bytes:
    """The checkpoint as a safetensors file whose metadata holds the rest, plus a hash."""
    import safetensors.torch
    import transformers
    ck.wait()
    s = ck.state
    tensors = {}
    for i, (k, v) in enumerate(ck.kv):
        tensors[f"kv.{i}.keys"], tensors[f"kv.{i}.values"] = k.contiguous(), v.contiguous()
    if s.rng_state is not None:
        tensors["rng_state"] = s.rng_state.contiguous()
    if s.logits:
        tensors["logits"] = torch.from_numpy(np.stack(s.logits))
    rules = []
    for index, r in enumerate(ck.interventions.rules):
        if r.op.vector is not None:
            tensors[f"rule.{index}.vector"] = r.op.vector.detach().to("cpu").contiguous()
        edit = None
        if r.op.expr is not None:            # an expression: its tree, constants as tensors
            edit, arrays = split_constants(r.op.expr.tree)
            for j, array in enumerate(arrays):
                tensors[f"rule.{index}.const.{j}"] = torch.from_numpy(np.array(array, dtype=np.float32))
        rules.append({"id": r.id, "layer": r.layer, "phase": r.phase, "site": r.site, "edit": edit,
                      "head": r.op.head, "rows": None if r.rows is None else list(r.rows),
                      "steps": None if r.steps is None else sorted(r.steps), "kind": r.op.kind,
                      "scale": r.op.scale, "alpha": r.op.alpha,
                      "positions": list(r.op.positions) if isinstance(r.op.positions, tuple)
                      else r.op.positions})
    meta = {
        "format": FORMAT, "identity": _model_identity(loaded), "kv_layers": len(ck.kv),
        "versions": {"djinn_nb": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "created": ck.created, "step": s.step, "prompt_ids": s.prompt_ids, "tokens": s.tokens,
        "records": s.records, "config": vars(s.config), "seed": s.seed,
        "breakpoints": [b.describe() for b in ck.interventions.breakpoints], "rules": rules,
    }
    meta_json = json.dumps(meta, sort_keys=True)
    return safetensors.torch.save(tensors, metadata={"djinn": meta_json,
                                                     "sha256": content_digest(meta_json, tensors)})


def from_bytes(data, loaded: LoadedModel, owner: str, limits=None) -> Checkpoint:
    """Parse and verify a checkpoint file; refuses another model or any damage, whole.

    The hash catches damage, not a forger (it has no key): every field is also checked
    as if it came through the API, against this model and this server's limits."""
    import safetensors.torch
    meta_raw = read_header(data).get("__metadata__") or {}
    if not isinstance(meta_raw.get("djinn"), str) or not isinstance(meta_raw.get("sha256"), str):
        raise CheckpointError("not a djinn checkpoint: no djinn metadata in the file")
    try:
        tensors = safetensors.torch.load(bytes(data))
    except Exception as exc:
        raise CheckpointError(f"damaged checkpoint file (truncated?): {str(exc)[:300]}") from None
    if content_digest(meta_raw["djinn"], tensors) != meta_raw["sha256"]:
        raise CheckpointError("damaged or tampered checkpoint: its content hash does not match")
    try:
        meta = json.loads(meta_raw["djinn"])
    except (ValueError, RecursionError):
        raise CheckpointError("not a djinn checkpoint: unreadable metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format {meta.get('format')!r}")
    want, have = meta.get("identity"), _model_identity(loaded)
    if want != have:
        diff = {k: ((want or {}).get(k), have[k]) for k in have if (want or {}).get(k) != have[k]}
        raise CheckpointError(f"checkpoint is from another model or setup: (file, this session) "
                              f"differ in {diff}")
    try:
        return _checked_checkpoint(meta, tensors, loaded, owner, limits)
    except CheckpointError:
        raise
    except (DjinnError, KeyError, TypeError, ValueError, AttributeError, RuntimeError,
            IndexError, OverflowError, RecursionError) as exc:
        raise CheckpointError(f"invalid checkpoint contents: {type(exc).__name__}: {exc}") from None


def _checked_checkpoint(meta: dict, tensors: dict, loaded: LoadedModel, owner: str, limits):
    from kernel_server.model import validation
    limits = limits or validation.Limits()
    n_layers, vocab = loaded.num_layers, loaded.vocab_size
    dtype = loaded.dtype
    config_fields = set(GenerationConfig.__dataclass_fields__)
    if not isinstance(meta["config"], dict) or set(meta["config"]) - config_fields:
        raise CheckpointError("invalid checkpoint contents: unknown generation settings")
    config = GenerationConfig(**meta["config"])
    validation.integer(config.max_new_tokens, "max_new_tokens", 1, limits.max_new_tokens)
    validation.number(config.temperature, "temperature", 0.0, 100.0)
    validation.integer(config.record_top_k, "record_top_k", 1, 100)
    prompt, tokens, step = meta["prompt_ids"], meta["tokens"], validation.integer(meta["step"], "step", 0)
    for name, ids in (("prompt", prompt), ("tokens", tokens)):
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
            raise CheckpointError(f"invalid checkpoint contents: {name} are not token ids of this model")
    if (not prompt or len(prompt) > limits.max_prompt_tokens or tokens[:len(prompt)] != prompt
            or len(tokens) != len(prompt) + step or step > config.max_new_tokens):
        raise CheckpointError("invalid checkpoint contents: prompt, tokens and step disagree")
    # the positions it has plus the tokens it may still make must fit this model's context
    if loaded.max_positions is not None and len(prompt) + config.max_new_tokens > loaded.max_positions:
        raise CheckpointError(f"invalid checkpoint contents: {len(prompt)} prompt positions and "
                              f"max_new_tokens={config.max_new_tokens} pass {loaded.name}'s "
                              f"context of {loaded.max_positions} positions")
    validation.logits_cap(config.return_logits, config.max_new_tokens, vocab, limits)
    records = meta["records"]
    if not isinstance(records, list) or len(records) != step or not all(
            isinstance(r, dict) and set(r) == _RECORD_KEYS for r in records):
        raise CheckpointError("invalid checkpoint contents: step records")
    bps = []
    for b in meta["breakpoints"]:
        site, _, _ = validation.site(loaded, b["layer"], b.get("site", "resid"))   # files before sites: resid
        bps.append(Breakpoint(site.layer, validation.choice(b["phase"], "phase", validation.PHASES),
                              validation.steps(b["steps"], limits), site=site.name))
    rules = []
    for index, r in enumerate(meta["rules"]):
        # the keywords steer() takes, checked by the same code as a steer() call
        spec = {"layer": r["layer"], "site": r.get("site", "resid"), "head": r.get("head"),
                "positions": r["positions"], "phase": r["phase"], "steps": r["steps"],
                "rows": r.get("rows")}
        if r["kind"] == "scale":
            spec["scale"] = r["scale"]
        elif r["kind"] == "expr":
            arrays = [tensors[k].numpy() for k in sorted(
                (k for k in tensors if k.startswith(f"rule.{index}.const.")),
                key=lambda k: int(k.rsplit(".", 1)[1]))]
            spec["edit"] = join_constants(r.get("edit"), arrays)
        else:
            vec = tensors.get(f"rule.{index}.vector")
            if vec is None:
                raise CheckpointError(f"invalid checkpoint contents: rule {index} has no vector")
            spec[validation.choice(r["kind"], "kind", ("add", "set"))] = vec.float().numpy()
            spec["alpha"] = r["alpha"]
        rules.append(validation.steering_rule(loaded, spec, limits, validation.integer(r["id"], "rule id", 0)))
    kv_len = len(tokens) - 1 if step > 0 else 0
    n_kv = validation.integer(meta["kv_layers"], "kv_layers", 0, n_layers)
    if n_kv != (n_layers if kv_len else 0):
        raise CheckpointError("invalid checkpoint contents: KV cache layer count")
    validation.intervention_caps(Interventions(bps, rules), limits)
    kv = [(tensors[f"kv.{i}.keys"], tensors[f"kv.{i}.values"]) for i in range(n_kv)]
    want = (1, *_kv_heads(loaded))
    for k, v in kv:
        if (k.dtype != dtype or v.dtype != dtype or k.dim() != 4 or v.dim() != 4
                or (k.shape[0], k.shape[1], k.shape[3]) != want or k.shape[2] != kv_len
                or v.shape != k.shape):
            raise CheckpointError(f"invalid checkpoint contents: KV cache shapes or dtype (this "
                                  f"model keeps [1, {want[1]}, positions, {want[2]}] {dtype})")
    rows = tensors.get("logits")
    if rows is not None and (rows.dtype != torch.float32 or tuple(rows.shape) != (step, vocab)
                             or not config.return_logits):
        raise CheckpointError("invalid checkpoint contents: logit rows")
    logits = list(rows.numpy()) if rows is not None and step else []
    if config.return_logits and len(logits) != step:
        raise CheckpointError("invalid checkpoint contents: logit rows")
    rng = tensors.get("rng_state")
    if rng is not None and (rng.dtype != torch.uint8 or tuple(rng.shape) != _rng_shape(loaded)):
        raise CheckpointError("invalid checkpoint contents: RNG state (not this device's "
                              "generator state)")
    state = GenState(prompt, tokens, step, records, logits, config,
                     validation.integer(meta["seed"], "seed", 0, 2**63 - 1), rng)
    kv_nbytes = sum(tensor_nbytes(k) + tensor_nbytes(v) for k, v in kv)
    return Checkpoint(uuid.uuid4().hex[:12], owner, loaded.name, state, Interventions(bps, rules),
                      kv, kv_nbytes + sum(r.nbytes for r in logits),
                      created=float(meta.get("created", 0.0)), kv_nbytes=kv_nbytes)


def _kv_heads(loaded: LoadedModel) -> tuple[int, int]:
    """(KV heads, head dim) of the model's attention, from its config."""
    cfg = loaded.model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or loaded.hidden_size // heads
    return int(kv_heads), int(head_dim)


def _rng_shape(loaded: LoadedModel) -> tuple:
    """The shape of the state of a sampling generator on the model's device."""
    return tuple(torch.Generator(device=loaded.device).get_state().shape)


_RECORD_KEYS = {"step", "token_id", "text", "top_ids", "top_probs", "forward_ms", "paused_ms",
                "breakpoints", "rules"}
