"""Where a causal LM keeps its decoder blocks: one path walk for every supported family."""
from __future__ import annotations

import torch

from djinn_protocol.errors import UnsupportedModelError

# attribute paths to the list of decoder blocks, per family
_LAYER_PATHS = (
    "transformer.h",          # GPT-2, GPT-J, Bloom-like
    "model.layers",           # Llama, Mistral, Qwen, Gemma, Phi-3
    "gpt_neox.layers",        # GPT-NeoX, Pythia
    "model.decoder.layers",   # OPT
    "transformer.blocks",     # MPT
)



def layers_path(model: torch.nn.Module) -> str:
    """The attribute path of a causal LM's decoder blocks (one function for every family)."""
    for path in _LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return path
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for "
        f"{', '.join(_LAYER_PATHS)}. Supported families: GPT-2, Llama/Mistral/Qwen, GPT-NeoX, OPT, MPT.")


def find_layers(model: torch.nn.Module) -> list:
    """The decoder blocks of a causal LM, in order."""
    obj = model
    for part in layers_path(model).split("."):
        obj = getattr(obj, part)
    return list(obj)
