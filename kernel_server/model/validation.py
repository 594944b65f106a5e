"""The one place that checks user input arriving at the server.

Every exposed call passes its arguments through these functions before any state
changes, so a bad value is refused with a typed error and nothing else happens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from djinn_protocol.errors import (InvalidArgumentError, InvalidEditError,
                             LimitExceededError)
from kernel_server.model import sites
from kernel_server.model.interventions import EditOp, SteeringRule

PHASES = ("prefill", "decode", "both")


@dataclass
class Limits:
    """Server limits; each refusal names the limit and the server option that sets it."""
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    max_sessions_per_client: int = 64
    max_step_list: int = 100_000
    checkpoint_budget_mb: float = 4096.0
    pinned_pool_mb: float = 512.0          # pinned host memory allocated at start (CUDA)
    pause_timeout_s: float = 3600.0        # a generation paused longer is stopped
    max_upload_mb: float = 16384.0
    # one rpyc request with all its arguments (a float32 set= of [4096, 4096] is 64 MiB)
    max_request_mb: float = 128.0
    reconnect_grace_s: float = 0.0         # keep a disconnected client's sessions this long
    max_models: int = 4                    # models loaded at once, the default one included
    max_batch: int = 64                    # prompts in one batched generate()
    # caps that keep one client from holding what the server has (issue 17)
    max_breakpoints: int = 64              # breakpoints per session
    max_rules: int = 64                    # steering rules per session
    max_steps_listed: int = 100_000        # steps listed over a session's breakpoints and rules
    max_logits_mb: float = 256.0           # logit rows a return_logits run may keep
    max_offers_per_client: int = 4         # bulk downloads waiting to be fetched, per principal
    max_sessions_per_peer: int = 256       # sessions of one host + credentials, any owner keys
    max_offers_per_peer: int = 16          # bulk downloads waiting, per host + credentials
    max_connections: int = 512             # client connections at once
    max_unauthenticated: int = 64          # connections waiting to authenticate at once
    handshake_timeout_s: float = 10.0      # the whole opening (TLS, token) of a connection


def intervention_caps(interventions, limits: Limits, breakpoint=None, rule=None) -> None:
    """``LimitExceededError`` when adding ``breakpoint`` or ``rule`` to a session's
    ``interventions`` would pass the caps on breakpoints, rules or listed steps."""
    bps = list(interventions.breakpoints) + ([breakpoint] if breakpoint is not None else [])
    rules = list(interventions.rules) + ([rule] if rule is not None else [])
    if len(bps) > limits.max_breakpoints:
        raise LimitExceededError(f"a session holds at most {limits.max_breakpoints} breakpoints "
                                 "(--max-breakpoints); clear some first")
    if len(rules) > limits.max_rules:
        raise LimitExceededError(f"a session holds at most {limits.max_rules} steering rules "
                                 "(--max-rules); clear some first")
    listed = sum(len(x.steps) for x in [*bps, *rules] if x.steps is not None)
    if listed > limits.max_steps_listed:
        raise LimitExceededError(f"the session's breakpoints and rules would list {listed} steps, "
                                 f"over the server limit of {limits.max_steps_listed} "
                                 "(--max-steps-listed)")


def logits_cap(return_logits: bool, max_new_tokens: int, vocab_size: int, limits: Limits) -> None:
    """``LimitExceededError`` when a run's kept logit rows could pass ``--max-logits-mb``."""
    need = max_new_tokens * vocab_size * 4
    if return_logits and need > limits.max_logits_mb * 2**20:
        raise LimitExceededError(f"return_logits for {max_new_tokens} tokens would keep "
                                 f"{need / 2**20:.0f} MiB of logits, over the server limit of "
                                 f"{limits.max_logits_mb:g} MiB (--max-logits-mb); ask for fewer "
                                 "tokens or score() the run afterwards")


def integer(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if type(value) is not int:          # bool is refused too
        raise InvalidArgumentError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise InvalidArgumentError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidArgumentError(f"{name} must be <= {hi}, got {value}")
    return value


def number(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if type(value) not in (int, float):
        raise InvalidArgumentError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be finite, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidArgumentError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def boolean(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")
    return value


def choice(value: Any, name: str, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def layer(value: Any, num_layers: int) -> int:
    return sites.layer_index(value, num_layers)


def steps(value: Any, limits: Limits) -> frozenset | None:
    if value is None:
        return None
    if isinstance(value, int) and type(value) is not bool:
        value = [value]
    if not isinstance(value, list) or len(value) > limits.max_step_list:
        raise InvalidArgumentError(f"steps must be None, an int or a list of ints, got {value!r:.80}")
    return frozenset(integer(v, "step", 0) for v in value)


def positions(value: Any) -> str | tuple:
    if isinstance(value, str) and value in ("all", "last"):
        return value
    if isinstance(value, int) and type(value) is not bool:
        value = [value]
    if isinstance(value, list) and value and len(value) <= 1_000_000:
        out = tuple(integer(v, "position", 0) for v in value)
        if len(set(out)) != len(out):
            raise InvalidArgumentError("positions must not repeat")
        return out
    raise InvalidArgumentError(f"positions must be 'all', 'last' or a non-empty list of ints, "
                               f"got {value!r:.80}")


def vector(value: Any, hidden_size: int, name: str, device, dtype) -> torch.Tensor:
    """A steering/set vector: [hidden] or [n, hidden], finite, as a tensor on the model device."""
    if not isinstance(value, np.ndarray):
        if isinstance(value, list):
            try:
                value = np.asarray(value, dtype=np.float64)
            except (ValueError, TypeError):
                raise InvalidEditError(f"{name} must be an array of numbers") from None
        else:
            raise InvalidEditError(f"{name} must be an array, got {type(value).__name__}")
    if value.dtype.kind not in "fiu":
        raise InvalidEditError(f"{name} must hold numbers, got dtype {value.dtype}")
    if value.ndim not in (1, 2) or (hidden_size is not None and value.shape[-1] != hidden_size):
        raise InvalidEditError(f"{name} must have shape [{hidden_size}] or [positions, {hidden_size}] "
                               f"(the model's hidden size), got {list(value.shape)}")
    if not np.all(np.isfinite(value)):
        raise InvalidEditError(f"{name} contains NaN or infinite values")
    tensor = torch.as_tensor(np.array(value, dtype=np.float32), device=device).to(dtype)
    if not bool(torch.isfinite(tensor).all()):      # finite in float64, not in the model's dtype
        raise InvalidEditError(f"{name} has values too large for the model's dtype ({dtype})")
    return tensor


def edit_op(args: dict, hidden_size: int, device, dtype, standing: bool = False) -> EditOp:
    """One edit from keyword arguments: exactly one of scale=, add= (with alpha=), set=,
    edit= (an expression, ``djinn_protocol.expressions``). A ``standing`` rule (steer) meets
    chunks of any length: its per-position vector needs explicit positions."""
    given = [k for k in ("scale", "add", "set", "edit") if args.get(k) is not None]
    if len(given) != 1:
        raise InvalidEditError("give exactly one of scale=, add=, set= or edit= "
                               f"(got {', '.join(given) or 'none'})")
    pos = positions(args.get("positions", "all"))
    kind = given[0]
    if kind == "edit":
        from kernel_server.model.expressions import compile_expression
        return EditOp("expr", expr=compile_expression(args["edit"], hidden_size, dtype, device),
                      positions=pos)
    if kind == "scale":
        return EditOp("scale", scale=number(args["scale"], "scale", -1e6, 1e6), positions=pos)
    alpha = number(args.get("alpha", 1.0), "alpha", -1e6, 1e6)
    vec = vector(args[kind], hidden_size, kind, device, dtype)
    if vec.dim() == 2:
        n = 1 if pos == "last" else (len(pos) if isinstance(pos, tuple) else None)
        if n is None and standing:
            raise InvalidEditError(f"a steering rule's {kind} must be one vector [{hidden_size}], "
                                   "or one row per position with positions=[...]")
        if n is not None and vec.shape[0] != n:
            raise InvalidEditError(f"{kind} has {vec.shape[0]} rows but {n} positions are selected")
    return EditOp(kind, alpha=alpha, vector=vec, positions=pos)


def positions_in_chunk(pos, chunk_start: int, chunk_len: int) -> None:
    """Explicit positions must all lie in the paused chunk."""
    if isinstance(pos, tuple):
        outside = [p for p in pos if not chunk_start <= p < chunk_start + chunk_len]
        if outside:
            raise InvalidArgumentError(
                f"positions {outside[:5]} are not in the paused chunk "
                f"(positions {chunk_start}..{chunk_start + chunk_len - 1})")


def check_rows_fit(op: EditOp, chunk_start: int, chunk_len: int) -> None:
    """For an edit while paused: the positions must lie in the paused chunk and a
    per-position vector must have one row per selected position."""
    positions_in_chunk(op.positions, chunk_start, chunk_len)
    if op.vector is not None and op.vector.dim() == 2 and op.positions == "all" \
            and op.vector.shape[0] != chunk_len:
        raise InvalidEditError(f"the vector has {op.vector.shape[0]} rows but the paused "
                               f"chunk has {chunk_len} positions")


def _chat(tokenizer, messages: list):
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgumentError(f"cannot apply this model's chat template: {exc}") from None


def prompt_ids(prompt: Any, tokenizer, chat: bool, limits: Limits, vocab_size: int) -> list[int]:
    """Token ids of a prompt: raw text, a list of ids, or a list of chat messages."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidArgumentError("prompt is empty")
        if len(prompt) > limits.max_prompt_tokens * 64:
            raise LimitExceededError(f"prompt of {len(prompt)} characters is over the limit")
        if chat:
            ids = _chat(tokenizer, [{"role": "user", "content": prompt}])
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if set(m) - {"role", "content"} or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise InvalidArgumentError("chat messages must be dicts with str 'role' and 'content'")
        ids = _chat(tokenizer, prompt)
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgumentError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})")
        ids = list(prompt)
    else:
        raise InvalidArgumentError("prompt must be a non-empty str, a list of token ids, or a list "
                                   f"of chat messages; got {type(prompt).__name__}")
    if hasattr(ids, "get") and not isinstance(ids, list):   # BatchEncoding from chat templates
        ids = ids["input_ids"]
    ids = [int(t) for t in ids]
    if not ids:
        raise InvalidArgumentError("the prompt tokenises to nothing")
    if len(ids) > limits.max_prompt_tokens:
        raise LimitExceededError(f"prompt has {len(ids)} tokens; the server limit is "
                                 f"{limits.max_prompt_tokens} (--max-prompt-tokens)")
    return ids


RULE_KEYS = {"layer", "scale", "add", "alpha", "set", "edit", "positions", "phase", "steps", "site",
             "head"}


def steering_rule(loaded, spec: dict, limits: Limits, rule_id: int) -> SteeringRule:
    """The one way a ``SteeringRule`` is made from outside data (``steer()``, a one-shot
    pass's ``steering=[...]``, a checkpoint file). ``spec`` holds the keywords of
    ``steer()``: ``layer``, exactly one of ``scale`` / ``add`` (with ``alpha``) / ``set``,
    and optionally ``positions``, ``phase`` (default "both"), ``steps``, ``site`` (default
    "resid"), ``head``, ``rows``; other keys are the caller's to refuse. Every value is
    checked; the vector is put on the device where the site computes. No hook is installed
    here: the caller hooks the site (``loaded.hooks.install_site``)."""
    resolved, head, width = site(loaded, spec.get("layer"), spec.get("site", "resid"),
                                 spec.get("head"))
    op = edit_op(spec, width, sites.device_of(loaded, resolved), loaded.dtype, standing=True)
    if head is not None:
        op = dataclasses.replace(op, head=head, head_dim=resolved.head_dim)
    return SteeringRule(layer=resolved.layer, op=op,
                        phase=choice(spec.get("phase", "both"), "phase", PHASES),
                        steps=steps(spec.get("steps"), limits), id=rule_id, site=resolved.name,
                        rows=rows(spec.get("rows"), limits))


def rules(value: Any, loaded, limits: Limits, first_id: int = 1) -> list:
    """Steering rules given as a list of dicts (``{"layer": 6, "scale": 0.9}``, the same
    keywords as ``steer()`` but ``rows``) for a one-shot pass; at most 64."""
    if not isinstance(value, list) or len(value) > 64:
        raise InvalidArgumentError("steering must be 'session', None, or a list of at most 64 "
                                   "rule dicts like {'layer': 6, 'scale': 0.9}")
    out = []
    for i, d in enumerate(value):
        if not isinstance(d, dict) or "layer" not in d:
            raise InvalidArgumentError(f"steering[{i}] must be a dict with a 'layer' key")
        unknown = set(d) - RULE_KEYS
        if unknown:
            raise InvalidArgumentError(f"steering[{i}] has unknown keys {sorted(unknown)}; "
                                       f"allowed: {sorted(RULE_KEYS)}")
        out.append(steering_rule(loaded, d, limits, first_id + i))
    return out


def prompt_list(value: Any, name: str, tokenizer, limits: Limits, vocab_size: int) -> list:
    """A non-empty list (at most 256) of prompts, each as ``prompt_ids`` accepts."""
    if not isinstance(value, list) or not value or len(value) > 256:
        raise InvalidArgumentError(f"{name} must be a list of 1..256 prompts")
    return [prompt_ids(p, tokenizer, False, limits, vocab_size) for p in value]


def site(loaded, layer_value: Any, name: Any, head: Any = None, writable: bool = True):
    """(resolved ``sites.Site``, head index or None, width of one row of an edit vector or
    None when unknown (module sites)) for a breakpoint / rule / edit / read at a site."""
    if not isinstance(name, str):
        raise InvalidArgumentError(f"site must be a str, got {type(name).__name__}")
    if name.startswith(sites.MODULE_PREFIX):
        if layer_value is not None:
            layer(layer_value, loaded.num_layers)
        resolved = sites.resolve(loaded, -1, name)
    else:
        resolved = sites.resolve(loaded, layer(layer_value, loaded.num_layers), name)
    if name == "attn_pattern" and writable:
        raise InvalidArgumentError(
            "attn_pattern is read-only and is not formed by the decode loop's fused attention: "
            "read attention patterns with s.cache(prompt, sites=['attn_pattern'])")
    width = None if name.startswith(sites.MODULE_PREFIX) else (resolved.width or loaded.hidden_size)
    if name == "heads":
        width = resolved.heads * resolved.head_dim
    if head is not None:
        if name != "heads":
            raise InvalidArgumentError("head= is only meaningful with site='heads'")
        head = integer(head, "head", 0, resolved.heads - 1)
        width = resolved.head_dim
    return resolved, head, width


def is_batch(prompt: Any) -> bool:
    """A list of prompts (texts, token-id lists or chat-message lists), not one prompt."""
    return (isinstance(prompt, list) and bool(prompt)
            and all(isinstance(p, str) or (isinstance(p, list) and p and not isinstance(p[0], int)
                                           and all(isinstance(m, dict) for m in p))
                    or (isinstance(p, list) and p and all(type(t) is int for t in p))
                    for p in prompt)
            and not all(type(t) is int for t in prompt))


def rows(value: Any, limits: Limits) -> tuple | None:
    """Batch rows a steering rule acts on (None: every row)."""
    if value is None:
        return None
    if isinstance(value, int) and type(value) is not bool:
        value = [value]
    if not isinstance(value, list) or not value or len(value) > limits.max_batch:
        raise InvalidArgumentError(f"rows must be None, an int or a list of row indices, got {value!r:.80}")
    out = tuple(sorted({integer(v, "row", 0, limits.max_batch - 1) for v in value}))
    return out
