"""TransformerLens hook names, as the project's (layer, site) pairs; both ends read this table.

``blocks.6.hook_resid_post`` is block 6's output (site ``resid`` of layer 6),
``blocks.6.hook_resid_pre`` block 5's output (block 0's input: the embedding output),
``blocks.5.hook_attn_out`` / ``hook_mlp_out`` the sub-block outputs, ``blocks.5.attn.hook_z``
the per-head attention output (``heads``), ``blocks.5.attn.hook_pattern`` the attention
probabilities, ``blocks.5.hook_resid_mid`` the residual stream between the attention and
the MLP sub-blocks (``resid_mid``, read-only), ``hook_embed`` the token embedding and
``ln_final.hook_normalized`` the final norm's output.

Some names stand for one of the model's own modules, which the server resolves to a
``module:<path>`` site (``MODULE_SITES``): ``blocks.5.attn.hook_q`` / ``hook_k`` / ``hook_v``
(the outputs of the separate query/key/value projections, flat [positions, heads * head_dim],
before rotary embeddings, as TransformerLens's), ``blocks.5.ln1.hook_normalized`` /
``ln2.hook_normalized`` (the block's norms), ``hook_embed``, ``hook_pos_embed`` (learned
position embeddings: GPT-2's ``wpe``) and ``ln_final.hook_normalized``.
"""
from __future__ import annotations

import re

_BLOCK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_resid_mid|hook_attn_out|"
                    r"hook_mlp_out|attn\.hook_z|attn\.hook_pattern|attn\.hook_[qkv]|"
                    r"ln[12]\.hook_normalized)$")
_SITE = {"hook_resid_post": "resid", "hook_attn_out": "attn", "hook_mlp_out": "mlp",
         "attn.hook_z": "heads", "attn.hook_pattern": "attn_pattern", "hook_resid_mid": "resid_mid",
         "attn.hook_q": "q", "attn.hook_k": "k", "attn.hook_v": "v",
         "ln1.hook_normalized": "ln1", "ln2.hook_normalized": "ln2"}
_GLOBAL = {"hook_embed": "embed", "hook_pos_embed": "pos_embed", "ln_final.hook_normalized": "ln_final"}
#: the (pseudo-)sites ``parse`` gives that stand for a module of the model (a ``module:<path>``
#: site on the server; the client finds them in a cache by these last path components)
MODULE_SITES = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",),
                "ln1": ("input_layernorm", "ln_1"),
                "ln2": ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2"),
                "embed": ("embed_tokens", "drop", "embed_in", "wte"), "pos_embed": ("wpe", "embed_positions"),
                "ln_final": ("norm", "ln_f", "final_layer_norm", "norm_f", "final_layernorm")}


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
                         f"hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out, attn.hook_z, "
                         f"attn.hook_pattern, attn.hook_q/k/v, ln1/ln2.hook_normalized, hook_embed, "
                         f"hook_pos_embed, ln_final.hook_normalized)")
    layer, hook = int(m.group(1)), m.group(2)
    if hook == "hook_resid_pre":
        return (None, "embed") if layer == 0 else (layer - 1, "resid")
    return layer, _SITE[hook]
