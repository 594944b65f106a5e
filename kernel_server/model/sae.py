"""Sparse autoencoders on the server: read from SAELens's on-disk format, checked against the
model's site, encoded and decoded with plain torch.

An SAE directory holds ``cfg.json`` (``d_in``, ``d_sae``, ``architecture``, ``hook_name``,
``apply_b_dec_to_input``, ``normalize_activations``; SAELens 6 may nest the hook under
``metadata``) and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae],
``W_dec`` [d_sae, d_in], ``b_dec`` [d_in], and ``threshold`` [d_sae] for ``jumprelu``).
They are read directly with safetensors (SAELens itself is not needed). The encoder is

    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    f   = where(pre > threshold, pre, 0)        (standard ReLU SAE: threshold 0)
    x^  = f @ W_dec + b_dec

``resolve_names`` turns the ``sae_encode`` / ``sae_decode`` nodes of an expression that name
a loaded SAE into the inline form (the weights as constants, ``djinn_protocol.expressions``),
so a rule built on an SAE needs nothing of the session that made it (checkpoints, files).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from djinn_protocol.errors import InvalidArgumentError, InvalidEditError, LimitExceededError
from djinn_protocol.expressions import SAE_ARGS, check

ARCHITECTURES = ("standard", "jumprelu")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
MAX_CFG_BYTES = 1 << 20
MAX_WEIGHT_BYTES = 4 << 30       # the whole weights file, checked before it is read
MAX_SAES_PER_SESSION = 8
#: sites an SAE may read (block sites; heads as the flat [positions, heads * head_dim] z)
SAE_SITES = ("resid", "attn", "mlp", "heads", "resid_mid")


@dataclass(eq=False)
class SAE:
    """One loaded SAE, its weights float32 on the device of the site it reads."""
    name: str
    layer: int
    site: str
    d_in: int
    d_sae: int
    architecture: str
    hook_name: str | None
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    b_dec_in: torch.Tensor       # what the encoder subtracts first (b_dec, or zeros)
    threshold: torch.Tensor
    apply_b_dec_to_input: bool = True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of ``x`` [..., d_in] (computed in float32)."""
        x = x.to(device=self.W_enc.device, dtype=torch.float32)
        pre = (x - self.b_dec_in) @ self.W_enc + self.b_enc
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(device=self.W_dec.device, dtype=torch.float32) @ self.W_dec + self.b_dec

    def direction(self, feature: int) -> np.ndarray:
        """Feature ``feature``'s decoder row, float32 [d_in]."""
        return self.W_dec[feature].cpu().numpy().copy()

    def inline_args(self, op: str) -> list:
        """The constant arguments of an inline ``op`` node (``SAE_ARGS``), as numpy arrays."""
        arrays = {"W_enc": self.W_enc, "b_enc": self.b_enc, "threshold": self.threshold,
                  "W_dec": self.W_dec,
                  "b_dec": self.b_dec_in if op == "sae_encode" else self.b_dec}
        return [{"op": "const", "value": arrays[k].cpu().numpy()} for k in SAE_ARGS[op]]

    def info(self) -> dict:
        return {"name": self.name, "layer": self.layer, "site": self.site, "d_in": self.d_in,
                "d_sae": self.d_sae, "architecture": self.architecture, "hook_name": self.hook_name,
                "apply_b_dec_to_input": self.apply_b_dec_to_input}


def _not_an_sae(path: str) -> InvalidArgumentError:
    # the same words whatever the reason (missing, unreadable, not an SAE), so that the answer
    # does not tell a client what exists on the server (as for model paths)
    return InvalidArgumentError(
        f"no SAE at {path!r:.300}: load_sae takes an absolute path on the server to a directory "
        f"holding {CFG_FILE} and {WEIGHTS_FILE} (SAELens's format)")


def read_files(path) -> tuple[dict, dict]:
    """(cfg, tensors by name) of the SAE directory ``path``, checked for size and format."""
    if not isinstance(path, str) or not 0 < len(path) <= 4096 or "\x00" in path:
        raise InvalidArgumentError("path must be a non-empty str (a directory on the server)")
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise InvalidArgumentError(f"path {path!r:.300} must be absolute: it is read by the server, "
                                   "whose working directory is not the notebook's")
    cfg_file, weights_file = p / CFG_FILE, p / WEIGHTS_FILE
    try:
        if not (cfg_file.is_file() and weights_file.is_file()):
            raise _not_an_sae(path)
        if cfg_file.stat().st_size > MAX_CFG_BYTES:
            raise _not_an_sae(path)
        size = weights_file.stat().st_size
        if size > MAX_WEIGHT_BYTES:
            raise LimitExceededError(f"the SAE's weights file is {size / 2**30:.1f} GiB, over the "
                                     f"limit of {MAX_WEIGHT_BYTES / 2**30:.0f} GiB")
        cfg = json.loads(cfg_file.read_text())
        if not isinstance(cfg, dict):
            raise _not_an_sae(path)
        from safetensors import safe_open
        with safe_open(os.fspath(weights_file), framework="pt") as f:
            names = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
                       if k in names}
    except (InvalidArgumentError, LimitExceededError):
        raise
    except Exception:             # unreadable, not JSON, not safetensors: one answer
        raise _not_an_sae(path) from None
    return cfg, tensors


def build(cfg: dict, tensors: dict, name: str, layer: int, site: str, width: int,
          device) -> SAE:
    """An ``SAE`` from its files' contents, checked against the site's ``width``."""
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise InvalidArgumentError(f"SAE architecture {str(arch)[:40]!r} is not supported "
                                   f"(supported: {', '.join(ARCHITECTURES)})")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise InvalidArgumentError(f"SAEs with normalize_activations={str(norm)[:40]!r} are not "
                                   "supported (only 'none')")
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in tensors]
    if arch == "jumprelu" and "threshold" not in tensors:
        missing.append("threshold")
    if missing:
        raise InvalidArgumentError(f"the SAE's weights file has no {', '.join(missing)}")
    for k, t in tensors.items():
        if not t.dtype.is_floating_point:
            raise InvalidArgumentError(f"the SAE's {k} is {t.dtype}, not floating point")
    W_enc = tensors["W_enc"]
    if W_enc.dim() != 2:
        raise InvalidArgumentError(f"the SAE's W_enc must be [d_in, d_sae], got {list(W_enc.shape)}")
    d_in, d_sae = (int(n) for n in W_enc.shape)
    for key in ("d_in", "d_sae"):
        if key in cfg and cfg[key] != {"d_in": d_in, "d_sae": d_sae}[key]:
            raise InvalidArgumentError(f"cfg.json says {key}={cfg[key]!r:.40} but W_enc is "
                                       f"{list(W_enc.shape)}")
    want = {"b_enc": [d_sae], "W_dec": [d_sae, d_in], "b_dec": [d_in], "threshold": [d_sae]}
    for k, shape in want.items():
        if k in tensors and list(tensors[k].shape) != shape:
            raise InvalidArgumentError(f"the SAE's {k} is {list(tensors[k].shape)}, expected {shape} "
                                       f"(from W_enc [{d_in}, {d_sae}])")
    if d_in != width:
        raise InvalidArgumentError(f"the SAE reads vectors of {d_in} (d_in) but site {site!r} of "
                                   f"layer {layer} has width {width}")
    if d_sae > 1 << 20:
        raise LimitExceededError(f"an SAE of {d_sae} features is over the limit of {1 << 20}")
    out = {k: t.to(device=device, dtype=torch.float32).contiguous() for k, t in tensors.items()}
    for k, t in out.items():
        if not torch.isfinite(t).all():
            raise InvalidArgumentError(f"the SAE's {k} holds NaN or infinite values")
    subtract = bool(cfg.get("apply_b_dec_to_input", True))
    return SAE(name=name, layer=layer, site=site, d_in=d_in, d_sae=d_sae, architecture=arch,
               hook_name=hook_name_of(cfg), W_enc=out["W_enc"], b_enc=out["b_enc"],
               W_dec=out["W_dec"], b_dec=out["b_dec"],
               b_dec_in=out["b_dec"] if subtract else torch.zeros_like(out["b_dec"]),
               threshold=out.get("threshold", torch.zeros_like(out["b_enc"])),
               apply_b_dec_to_input=subtract)


def hook_name_of(cfg: dict):
    """The TransformerLens hook name the SAE was trained on (SAELens: ``hook_name``, older
    ``hook_point``, SAELens 6 under ``metadata``), or None."""
    for d in (cfg, cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}):
        for key in ("hook_name", "hook_point"):
            if isinstance(d.get(key), str):
                return d[key]
    return None


def resolve_names(tree, saes: dict):
    """``tree`` with every ``sae_encode`` / ``sae_decode`` node that names an SAE (one
    argument) given that SAE's weights inline; ``InvalidEditError`` for a name not in
    ``saes``. Anything that is not an expression comes back unchanged (checked later)."""
    if not isinstance(tree, dict):
        return tree
    check(tree)                   # (bounded depth and size before this recursion)
    return _resolve(tree, saes)


def _resolve(tree: dict, saes: dict) -> dict:
    op = tree.get("op")
    args = tree.get("args")
    if isinstance(args, list):
        args = [_resolve(a, saes) for a in args]
    if op in SAE_ARGS and isinstance(args, list) and len(args) == 1:
        sae = saes.get(tree.get("sae")) if isinstance(tree.get("sae"), str) else None
        if sae is None:
            raise InvalidEditError(f"no SAE named {str(tree.get('sae'))[:64]!r} is loaded in this "
                                   f"session (loaded: {', '.join(saes) or 'none'}; s.load_sae(path))")
        args = args + sae.inline_args(op)
    if args is None:
        return tree
    return {**tree, "args": args}


def top_features(sae: SAE, x: torch.Tensor, k: int, features=None) -> dict:
    """Top-k features per row of ``x`` [positions, d_in] (reduced here: only k per position
    travel), with each row's L0, its relative reconstruction error and, for ``features``, those
    features' activations [positions, len(features)]."""
    with torch.inference_mode():
        x32 = x.to(device=sae.W_enc.device, dtype=torch.float32).reshape(-1, sae.d_in)
        f = sae.encode(x32)
        values, indices = f.topk(min(k, sae.d_sae), dim=-1)
        err = torch.linalg.vector_norm(sae.decode(f) - x32, dim=-1) / \
            torch.linalg.vector_norm(x32, dim=-1).clamp_min(1e-12)
        out = {"indices": indices.cpu().numpy().astype(np.int64), "values": values.cpu().numpy(),
               "l0": (f > 0).sum(-1).cpu().numpy().astype(np.int64),
               "recon_error": err.cpu().numpy()}
        if features is not None:
            out["activations"] = f[:, list(features)].cpu().numpy()
        return out
