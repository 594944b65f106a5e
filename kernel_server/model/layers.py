"""Where a causal LM keeps its decoder blocks: the known paths first, else the one
``nn.ModuleList`` of decoder blocks found by structure (one function for every family)."""
from __future__ import annotations

import torch

from djinn_protocol.errors import UnsupportedModelError

# attribute paths to the list of decoder blocks of the common families (tried first: cheap,
# and unambiguous where a model holds several block lists)
_LAYER_PATHS = (
    "transformer.h",          # GPT-2, GPT-J, Bloom-like
    "model.layers",           # Llama, Mistral, Mixtral, Qwen(-MoE), Gemma, Phi-3 and most newer families
    "gpt_neox.layers",        # GPT-NeoX, Pythia
    "model.decoder.layers",   # OPT
    "transformer.blocks",     # MPT
)
# a block list under one of these names belongs to another tower of the model (a vision or
# audio encoder, or a BERT-style encoder run in decoder mode), never to the text decoder
_NOT_DECODER = ("vision", "visual", "image", "audio", "speech", "encoder", "mtp")


def _walk(model: torch.nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _num_layers(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    try:
        cfg = cfg.get_text_config()
    except Exception:           # (configs without sub-configs)
        pass
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        try:
            n = getattr(cfg, attr, None)
        except Exception:       # per-layer configs refuse some global reads
            n = None
        if isinstance(n, int) and n > 0:
            return n
    return None


def _block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """Every outermost ModuleList of one block class (lists nested in a block, such as the
    experts of a mixture-of-experts MLP, are not candidates)."""
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue
        found.append((name, mod))
    return found


def layers_path(model: torch.nn.Module) -> str:
    """The attribute path of a causal LM's decoder blocks: a known path, else the one
    outermost list of same-class blocks, outside vision/audio/encoder towers, as long as the
    config's layer count. ``UnsupportedModelError`` naming what was found otherwise."""
    for path in _LAYER_PATHS:
        obj = _walk(model, path)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return path
    lists = _block_lists(model)
    decoder = [(p, m) for p, m in lists
               if not any(w in part.lower() for part in p.split(".") for w in _NOT_DECODER)]
    n = _num_layers(model)
    fits = [(p, m) for p, m in decoder if n is None or len(m) == n]
    if len(fits) == 1:
        return fits[0][0]
    arch = type(model).__name__
    if len(fits) > 1:
        raise UnsupportedModelError(
            f"cannot tell which block list of {arch} is its decoder: "
            f"{', '.join(f'{p} ({len(m)} x {type(m[0]).__name__})' for p, m in fits)} all fit")
    seen = ", ".join(f"{p} ({len(m)} x {type(m[0]).__name__})" for p, m in lists) or "none"
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {arch}: no path among {', '.join(_LAYER_PATHS)}, and "
        f"no list of {n or 'its'} decoder blocks outside vision/audio/encoder towers "
        f"(block lists found: {seen})")


def find_layers(model: torch.nn.Module) -> list:
    """The decoder blocks of a causal LM, in order."""
    return list(_walk(model, layers_path(model)))
