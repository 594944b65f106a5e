"""Intervention sites inside a decoder block, found by module structure (never by eval).

A site is where a breakpoint pauses, a steering rule edits and a cache reads:

- ``resid``: the block's output, the residual stream (the default);
- ``attn``: the attention sub-block's output, before the residual add;
- ``mlp``: the MLP sub-block's output, before the residual add;
- ``heads``: the per-head attention output, the input of the attention output
  projection, seen as [positions, heads, head_dim];
- ``resid_mid``: the residual stream between the attention and the MLP sub-blocks (the
  input of the norm before the MLP), read-only: the block keeps its own reference to that
  tensor for the residual add, so an edit there would reach the MLP only. Sequential
  blocks only (GPT-2, Llama, Gemma ...; not parallel attention + MLP: GPT-J, NeoX, Phi);
- ``attn_in`` / ``mlp_in``: the input of the norm before the attention / the MLP sub-block
  (TransformerLens's ``hook_attn_in`` / ``hook_mlp_in``): the same values as the residual
  stream there (``attn_in`` of layer L = ``resid`` of L-1; ``mlp_in`` = ``resid_mid``), but an
  edit reaches only that sub-block, as in TransformerLens (the block adds the residual from
  its own reference). [positions, hidden]: one vector for all heads. Sequential blocks only;
- ``mlp_post``: the MLP's hidden activations, the input of its down projection (after the
  activation function; for gated MLPs ``act(gate) * up``), [positions, d_mlp]
  (TransformerLens's ``mlp.hook_post``);
- ``attn_pattern``: attention probabilities [heads, query, key], read-only, from a
  one-shot pass run with the eager attention implementation (``cache``/``logit_lens``
  style calls only: the decode loop runs a fused kernel that never forms them);
- ``module:<path>``: the output of any module of the model, by its dotted name
  (``module:model.layers.5.mlp.down_proj``), checked against ``named_modules()``.

A resolved site is hooked, once per model, by ``loaded.hooks.install_site(site)``
(kernel_server.runtime.hooks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from djinn_protocol.errors import InvalidArgumentError, LayerOutOfRangeError, UnsupportedModelError

SITES = ("resid", "attn", "mlp", "heads", "attn_pattern", "resid_mid", "attn_in", "mlp_in",
         "mlp_post")
#: sites a breakpoint, a rule or an edit may not name (cache and grad read them)
READ_ONLY = ("attn_pattern", "resid_mid")
MODULE_PREFIX = "module:"

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")   # (the last two: MoE blocks)
_OUT_PROJ_NAMES = ("o_proj", "c_proj", "out_proj", "dense", "wo")
# the norm whose input is the residual stream between attention and MLP, by preference
# (Gemma's post_attention_layernorm normalises the attention output: its pre_feedforward one)
_MID_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")
_IN_NORM_NAMES = ("input_layernorm", "ln_1")       # the norm before the attention sub-block
# the MLP's down projection (its input: the hidden activations): Llama/Mistral/Qwen/Gemma,
# GPT-2, Phi, GPT-J, NeoX, T5-style
_DOWN_PROJ_NAMES = ("down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "wo")
_FINAL_NORMS = ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm",
                "model.decoder.final_layer_norm", "transformer.norm_f", "model.final_layernorm")


@dataclass(frozen=True)
class Site:
    """A resolved site: the module, how its tensor is reached, and the head geometry."""
    layer: int                 # -1 for module:<path> sites
    name: str                  # "resid" | "attn" | "mlp" | "heads" | "attn_pattern" | "module:..."
    module: torch.nn.Module
    pre: bool = False          # True: the module's first input (heads), else its output
    heads: int = 0
    head_dim: int = 0
    width: int = 0             # the tensor's last dimension when not the hidden size (mlp_post)

    @property
    def key(self) -> tuple:
        return (self.layer, self.name)


def _child(module, names):
    for n in names:
        sub = getattr(module, n, None)
        if isinstance(sub, torch.nn.Module):
            return sub
    return None


def head_geometry(loaded) -> tuple[int, int]:
    cfg = loaded.model.config
    heads = next((getattr(cfg, a) for a in ("num_attention_heads", "n_head", "num_heads")
                  if isinstance(getattr(cfg, a, None), int)), None)
    if not heads:
        raise UnsupportedModelError(f"{type(loaded.model).__name__} has no attention heads in its "
                                    "config (num_attention_heads, n_head, num_heads): no head geometry")
    head_dim = int(getattr(cfg, "head_dim", None) or loaded.hidden_size // heads)
    return int(heads), head_dim


def resolve(loaded, layer: int, name: str) -> Site:
    """The site ``name`` of decoder block ``layer`` (``layer`` is ignored for module paths)."""
    if not isinstance(name, str):
        raise InvalidArgumentError(f"site must be a str, got {type(name).__name__}")
    if name.startswith(MODULE_PREFIX):
        path = name[len(MODULE_PREFIX):]
        modules = loaded.module_index
        if path not in modules:
            near = [p for p in modules if path.rsplit(".", 1)[-1] in p][:3]
            raise InvalidArgumentError(f"the model has no module {path!r}"
                                       + (f"; did you mean {near}?" if near else ""))
        return Site(-1, name, modules[path])
    if name not in SITES:
        raise InvalidArgumentError(f"site must be one of {', '.join(SITES)} or 'module:<path>', "
                                   f"got {name!r:.80}")
    block = loaded.layers[layer]
    if name == "resid":
        return Site(layer, name, block)
    attn = _child(block, _ATTN_NAMES)
    if name in ("attn", "attn_pattern", "heads") and attn is None:
        raise UnsupportedModelError(f"cannot find the attention module of {type(block).__name__}")
    if name in ("attn", "attn_pattern"):
        heads, head_dim = head_geometry(loaded)
        return Site(layer, name, attn, heads=heads, head_dim=head_dim)
    if name in ("resid_mid", "mlp_in", "attn_in"):
        cfg = loaded.model.config
        names = _IN_NORM_NAMES if name == "attn_in" else _MID_NORM_NAMES
        norm = _child(block, names)
        if norm is None or getattr(cfg, "use_parallel_residual", False) or getattr(cfg, "parallel_attn", False):
            what = ("separate input of the attention sub-block" if name == "attn_in" else
                    "residual stream between attention and MLP")
            raise UnsupportedModelError(
                f"{type(block).__name__} has no {what} (parallel sub-blocks, or no norm named "
                f"{', '.join(names)} before the {'attention' if name == 'attn_in' else 'MLP'})")
        return Site(layer, name, norm, pre=True)
    if name in ("mlp", "mlp_post"):
        mlp = _child(block, _MLP_NAMES)
        if mlp is None:
            raise UnsupportedModelError(f"cannot find the MLP module of {type(block).__name__}")
        if name == "mlp":
            return Site(layer, name, mlp)
        down = _child(mlp, _DOWN_PROJ_NAMES)
        # nn.Linear's in_features; GPT-2's Conv1D keeps its weight as [in, out]
        width = getattr(down, "in_features", None) or getattr(down, "nx", None)
        if down is None or not width:
            raise UnsupportedModelError(
                f"cannot find the down projection of {type(mlp).__name__} (looked for "
                f"{', '.join(_DOWN_PROJ_NAMES)} with a known input size): no site mlp_post")
        return Site(layer, name, down, pre=True, width=int(width))
    proj = _child(attn, _OUT_PROJ_NAMES)
    if proj is None:
        raise UnsupportedModelError(f"cannot find the attention output projection of "
                                    f"{type(attn).__name__} (looked for {', '.join(_OUT_PROJ_NAMES)})")
    heads, head_dim = head_geometry(loaded)
    return Site(layer, name, proj, pre=True, heads=heads, head_dim=head_dim)


def device_of(loaded, site: Site) -> torch.device:
    """Where ``site``'s tensors live: its decoder layer's device (a model over several
    devices), or for a ``module:<path>`` site its module's parameters' device."""
    if site.layer >= 0:
        return loaded.layer_device(site.layer)
    return next(site.module.parameters(), torch.empty(0, device=loaded.device)).device


def final_norm(loaded):
    """The final normalisation before the unembedding (identity if the model has none)."""
    modules = loaded.module_index
    for path in _FINAL_NORMS:
        if path in modules:
            return modules[path]
    return torch.nn.Identity()


def unembed(loaded, hidden: torch.Tensor) -> torch.Tensor:
    """Logit lens: ``hidden`` [..., hidden] through the final norm and the unembedding."""
    norm = final_norm(loaded)
    head = loaded.model.get_output_embeddings()
    w = next(head.parameters())
    return head(norm(hidden.to(device=w.device, dtype=w.dtype))).float()



_EMBEDS = ("model.embed_tokens", "transformer.drop", "gpt_neox.embed_in", "model.decoder.embed_tokens",
           "transformer.wte")


def from_hook_name(loaded, layer, name):
    """(layer, site) for ``name`` given as a TransformerLens hook name (``blocks.6.hook_resid_post``,
    djinn_protocol.hook_names; its layer wins over ``layer``), else (layer, name) unchanged. ``hook_embed`` and
    ``blocks.0.hook_resid_pre`` become the model's embedding output (for GPT-2 the sum of token
    and position embeddings, after dropout), ``ln_final.hook_normalized`` its final norm."""
    from djinn_protocol import hook_names
    if not hook_names.is_hook_name(name):
        return layer, name
    try:
        tl_layer, site = hook_names.parse(name)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    if site == "embed":
        modules = loaded.module_index
        path = next((p for p in _EMBEDS if p in modules), None)
        if path is None:
            raise UnsupportedModelError(f"cannot find the embedding output of {type(loaded.model).__name__}")
        return None, MODULE_PREFIX + path
    if site == "ln_final":
        modules = loaded.module_index
        path = next((p for p in _FINAL_NORMS if p in modules), None)
        if path is None:
            raise UnsupportedModelError(f"{type(loaded.model).__name__} has no final norm")
        return None, MODULE_PREFIX + path
    if site == "pos_embed":
        modules = loaded.module_index
        path = next((p for p in _POS_EMBEDS if p in modules), None)
        if path is None:
            raise UnsupportedModelError(f"{type(loaded.model).__name__} has no learned position "
                                        "embedding (rotary models add positions inside attention)")
        return None, MODULE_PREFIX + path
    if site in hook_names.MODULE_SITES:         # q/k/v and MLP projections, the block's norms
        block = loaded.layers[layer_index(tl_layer, loaded.num_layers)]
        owner = (_child(block, _ATTN_NAMES) if site in ("q", "k", "v") else
                 _child(block, _MLP_NAMES) if site.startswith("mlp_") else block)
        names = hook_names.MODULE_SITES[site]
        child = None if owner is None else _child(owner, names)
        if child is None:
            what = ("separate query/key/value projections (GPT-2 computes them in one fused "
                    "c_attn: read site 'module:...attn.c_attn' instead)" if site in ("q", "k", "v")
                    else "gated MLP with an up projection (up_proj): mlp.hook_pre_linear exists "
                    "only for gated MLPs" if site == "mlp_pre_linear"
                    else f"MLP input projection named {', '.join(names)}" if site == "mlp_pre"
                    else f"norm named {', '.join(names)}")
            raise UnsupportedModelError(f"{type(block).__name__} has no {what}: {name} is not mapped "
                                        "for this model")
        path = next(p for p, m in loaded.module_index.items() if m is child)
        return None, MODULE_PREFIX + path
    return tl_layer, site


def layer_index(value, num_layers: int) -> int:
    """``value`` as a decoder-layer index of a model of ``num_layers`` layers (typed errors
    otherwise; ``validation.layer`` is this check)."""
    if type(value) is not int:
        raise InvalidArgumentError(f"layer must be an int, got {type(value).__name__}")
    if not 0 <= value < num_layers:
        raise LayerOutOfRangeError(f"layer {value} is out of range: this model has {num_layers} "
                                   f"decoder layers (0..{num_layers - 1})")
    return value


_POS_EMBEDS = ("transformer.wpe", "model.decoder.embed_positions")
