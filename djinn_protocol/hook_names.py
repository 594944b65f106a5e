"""TransformerLens hook names, as the project's (layer, site) pairs; both ends read this table.

``blocks.6.hook_resid_post`` is block 6's output (site ``resid`` of layer 6),
``blocks.6.hook_resid_pre`` block 5's output (block 0's input: the embedding output),
``blocks.5.hook_attn_out`` / ``hook_mlp_out`` the sub-block outputs, ``blocks.5.attn.hook_z``
the per-head attention output (``heads``), ``blocks.5.attn.hook_pattern`` the attention
probabilities, ``blocks.5.hook_resid_mid`` the residual stream between the attention and
the MLP sub-blocks (``resid_mid``, read-only), ``hook_embed`` the token embedding and
``ln_final.hook_normalized`` the final norm's output.

``blocks.5.hook_attn_in`` / ``hook_mlp_in`` are the inputs of the norms before the attention
and the MLP (``attn_in`` / ``mlp_in``: one vector for all heads, an edit reaches only that
sub-block), ``blocks.5.mlp.hook_post`` the MLP's hidden activations, the input of its down
projection (``mlp_post``).

Some names stand for one of the model's own modules, which the server resolves to a
``module:<path>`` site (``MODULE_SITES``): ``blocks.5.attn.hook_q`` / ``hook_k`` / ``hook_v``
(the outputs of the separate query/key/value projections, flat [positions, heads * head_dim],
before rotary embeddings, as TransformerLens's), ``blocks.5.ln1.hook_normalized`` /
``ln2.hook_normalized`` (the block's norms), ``blocks.5.mlp.hook_pre`` (the MLP's input
projection: GPT-2's ``c_fc``, for gated MLPs the gate projection, before the activation),
``blocks.5.mlp.hook_pre_linear`` (gated MLPs: the up projection), ``hook_embed``,
``hook_pos_embed`` (learned position embeddings: GPT-2's ``wpe``) and ``ln_final.hook_normalized``.

TransformerLens names of tensors that a Hugging Face model never forms at a module boundary
are refused with the reason (``UNMAPPED``).
"""
from __future__ import annotations

import re

_BLOCK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_resid_mid|hook_attn_out|"
                    r"hook_mlp_out|attn\.hook_z|attn\.hook_pattern|attn\.hook_[qkv]|"
                    r"ln[12]\.hook_normalized|hook_attn_in|hook_mlp_in|"
                    r"mlp\.hook_pre|mlp\.hook_pre_linear|mlp\.hook_post)$")
_SITE = {"hook_resid_post": "resid", "hook_attn_out": "attn", "hook_mlp_out": "mlp",
         "attn.hook_z": "heads", "attn.hook_pattern": "attn_pattern", "hook_resid_mid": "resid_mid",
         "attn.hook_q": "q", "attn.hook_k": "k", "attn.hook_v": "v",
         "ln1.hook_normalized": "ln1", "ln2.hook_normalized": "ln2",
         "hook_attn_in": "attn_in", "hook_mlp_in": "mlp_in", "mlp.hook_post": "mlp_post",
         "mlp.hook_pre": "mlp_pre", "mlp.hook_pre_linear": "mlp_pre_linear"}
#: TransformerLens names with no honest equivalent here, and why (the refusal says it)
UNMAPPED = (
    (re.compile(r"^blocks\.\d+\.attn\.hook_rot_[qk]$"),
     "rotary embeddings are applied inside the attention's forward by a function "
     "(apply_rotary_pos_emb), not by a module: the rotated queries/keys cross no module "
     "boundary to hook; attn.hook_q/k give them before the rotation"),
    (re.compile(r"^blocks\.\d+\.attn\.hook_attn_scores$"),
     "the pre-softmax scores stay inside the attention kernel (SDPA or the eager function) "
     "and cross no module boundary; attn.hook_pattern gives the probabilities"),
    (re.compile(r"^blocks\.\d+\.attn\.hook_result$"),
     "Hugging Face models never form the per-head outputs after W_O (one product of all "
     "heads with the output projection): take attn.hook_z (site heads) times each head's "
     "slice of the output projection's weight"),
    (re.compile(r"^(blocks\.\d+\.ln[12]|ln_final)\.hook_scale$"),
     "the norm's scale (1 / RMS or 1 / std) is computed inside its forward and not returned; "
     "the norm's input (hook_attn_in, hook_mlp_in, hook_resid_post) and output "
     "(ln*.hook_normalized) give it"),
    (re.compile(r"^blocks\.\d+\.hook_[qkv]_input$"),
     "the query/key/value projections of a Hugging Face block read one normalised input: "
     "there are no separate per-projection inputs (TransformerLens's use_split_qkv_input); "
     "ln1.hook_normalized is that input"),
)
_GLOBAL = {"hook_embed": "embed", "hook_pos_embed": "pos_embed", "ln_final.hook_normalized": "ln_final"}
#: the (pseudo-)sites ``parse`` gives that stand for a module of the model (a ``module:<path>``
#: site on the server; the client finds them in a cache by these last path components)
MODULE_SITES = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",),
                "ln1": ("input_layernorm", "ln_1"),
                "ln2": ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2"),
                "mlp_pre": ("gate_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "w1"),
                "mlp_pre_linear": ("up_proj",),
                "embed": ("embed_tokens", "drop", "embed_in", "wte"), "pos_embed": ("wpe", "embed_positions"),
                "ln_final": ("norm", "ln_f", "final_layer_norm", "norm_f", "final_layernorm")}


def is_hook_name(name) -> bool:
    return isinstance(name, str) and (name in _GLOBAL or name.startswith(("blocks.", "ln_final.")))


def parse(name: str) -> tuple:
    """(layer, site) of a TransformerLens hook name; layer None for ``embed`` / ``ln_final``.
    ``blocks.0.hook_resid_pre`` is (None, "embed"). ValueError for names not in the table."""
    if name in _GLOBAL:
        return None, _GLOBAL[name]
    m = _BLOCK.match(name)
    if not m:
        why = next((why for pattern, why in UNMAPPED if pattern.match(name)), None)
        if why is not None:
            raise ValueError(f"{name} is not mapped: {why}")
        raise ValueError(f"{name!r:.80} is not a TransformerLens hook name djinn_nb maps (blocks.L."
                         f"hook_resid_pre/mid/post, hook_attn_in, hook_mlp_in, hook_attn_out, "
                         f"hook_mlp_out, attn.hook_z, attn.hook_pattern, attn.hook_q/k/v, "
                         f"mlp.hook_pre, mlp.hook_pre_linear, mlp.hook_post, "
                         f"ln1/ln2.hook_normalized, hook_embed, hook_pos_embed, "
                         f"ln_final.hook_normalized)")
    layer, hook = int(m.group(1)), m.group(2)
    if hook == "hook_resid_pre":
        return (None, "embed") if layer == 0 else (layer - 1, "resid")
    return layer, _SITE[hook]
