"""TransformerLens hook names, as the project's (layer, site) pairs; both ends read this table.

``blocks.6.hook_resid_post`` is block 6's output (site ``resid`` of layer 6),
``blocks.6.hook_resid_pre`` block 5's output (block 0's input: the embedding output),
``blocks.5.hook_attn_out`` / ``hook_mlp_out`` the sub-block outputs, ``blocks.5.attn.hook_z``
the per-head attention output (``heads``), ``blocks.5.attn.hook_pattern`` the attention
probabilities, ``hook_embed`` the token embedding and ``ln_final.hook_normalized`` the
final norm's output (both the model's own modules: site ``embed`` / ``ln_final``, which the
server resolves to a ``module:<path>``).
"""
from __future__ import annotations

import re

_BLOCK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_attn_out|hook_mlp_out|"
                    r"attn\.hook_z|attn\.hook_pattern)$")
_SITE = {"hook_resid_post": "resid", "hook_attn_out": "attn", "hook_mlp_out": "mlp",
         "attn.hook_z": "heads", "attn.hook_pattern": "attn_pattern"}
_GLOBAL = {"hook_embed": "embed", "ln_final.hook_normalized": "ln_final"}


def is_hook_name(name) -> bool:
    return isinstance(name, str) and (name in _GLOBAL or name.startswith("blocks."))


def parse(name: str) -> tuple:
    """(layer, site) of a TransformerLens hook name; layer None for ``embed`` / ``ln_final``.
    ``blocks.0.hook_resid_pre`` is (None, "embed"). ValueError for names not in the table."""
    if name in _GLOBAL:
        return None, _GLOBAL[name]
    m = _BLOCK.match(name)
    if not m:
        raise ValueError(f"{name!r:.80} is not a TransformerLens hook name djinn_nb maps (blocks.L."
                         f"hook_resid_pre/post, hook_attn_out, hook_mlp_out, attn.hook_z, "
                         f"attn.hook_pattern, hook_embed, ln_final.hook_normalized)")
    layer, hook = int(m.group(1)), m.group(2)
    if hook == "hook_resid_pre":
        return (None, "embed") if layer == 0 else (layer - 1, "resid")
    return layer, _SITE[hook]
