"""The hook registry of a loaded model: forward hooks installed once per module, each
dispatching to the hook target that is active in the calling thread.

A model is shared by many sessions and one-shot passes, each in its own thread. Every
decoder block (and every sub-module site a session asked for) gets one hook, once; the
hook looks up the target of the calling thread (a generation run, a one-shot
``ForwardPass``, fast decode's in-graph steering) and calls it only when the target
declared the layer or site hot. A thread with no active target (a plain forward pass)
costs one thread-local lookup per hooked module and changes nothing.

The target is any object with the ``HookTarget`` shape below; nothing else of it is read.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Protocol, Sequence

import torch


class HookTarget(Protocol):
    """What the model's hooks call, in the thread that runs the forward pass.

    ``hot_layers``: decoder blocks whose output (the residual stream, site ``"resid"``)
    the target wants to see. ``hot_sites``: ``(layer, site)`` pairs off the residual
    stream (``kernel_server.model.sites``; layer -1 for ``module:<path>`` sites) it wants to
    see. Both are read on every hooked module call: keep them frozensets, replaced (never
    mutated) when they change."""

    hot_layers: frozenset
    hot_sites: frozenset

    def on_site(self, layer: int, site: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The tensor of ``site`` at ``layer`` ([batch, positions, width]; for ``heads`` the
        input of the attention output projection): return a new tensor to replace it, or
        None to leave the module's output as it is."""


def output_tensor(output) -> torch.Tensor:
    """The hidden state in a module's output: the first element of a tuple (attention
    modules, older decoder blocks), else the output itself. GPT-2 and Llama blocks return a
    plain tensor in transformers 5: ``output[0]`` would silently pick batch row 0."""
    return output[0] if isinstance(output, tuple) else output


def with_output_tensor(output, tensor: torch.Tensor):
    """``output`` with its hidden state (see ``output_tensor``) replaced by ``tensor``."""
    return (tensor,) + tuple(output[1:]) if isinstance(output, tuple) else tensor


class HookRegistry:
    """The hooks of one model and the active target of each thread.

    ``install_layers()`` hooks every decoder block, ``install_site(site)`` one sub-module
    site; both are idempotent and thread-safe. ``active(target)`` makes ``target`` the one
    the hooks dispatch to in the calling thread, for the duration of a ``with`` block."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self._layers = list(layers)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._layers_installed = False
        self._sites: set = set()          # (layer, site) keys already hooked

    # ---- the active target ---------------------------------------------------------
    @contextlib.contextmanager
    def active(self, target: HookTarget | None) -> Iterator[None]:
        """Dispatch this thread's hooks to ``target`` inside the block (the previous target,
        if any, is active again after it: fast decode nests its steering proxy in a run)."""
        local = self._local
        previous = getattr(local, "target", None)
        local.target = target
        try:
            yield
        finally:
            local.target = previous

    # ---- installing hooks ----------------------------------------------------------
    def install_layers(self) -> None:
        """Hook the output of every decoder block (site ``resid``), once."""
        with self._lock:
            if self._layers_installed:
                return
            for index, layer in enumerate(self._layers):
                layer.register_forward_hook(self._layer_hook(index))
            self._layers_installed = True

    def install_site(self, site) -> None:
        """Hook a resolved ``kernel_server.model.sites.Site`` off the residual stream, once per
        (layer, site). ``resid`` is the block hooks' (``install_layers``); ``attn_pattern``
        is read by the one-shot pass itself: neither needs a hook here."""
        if site.name in ("resid", "attn_pattern"):
            return
        with self._lock:
            if site.key in self._sites:
                return
            if site.pre:
                site.module.register_forward_pre_hook(self._input_hook(site.key))
            else:
                site.module.register_forward_hook(self._output_hook(site.key))
            self._sites.add(site.key)

    # ---- the hooks (hot path: one thread-local lookup when nothing is hot) ------------
    def _layer_hook(self, index: int):
        local = self._local

        def hook(module, args, output):
            target = getattr(local, "target", None)
            if target is None or index not in target.hot_layers:
                return None
            new = target.on_site(index, "resid", output_tensor(output))
            return None if new is None else with_output_tensor(output, new)
        return hook

    def _output_hook(self, key: tuple):
        local = self._local
        layer, name = key

        def hook(module, args, output):
            target = getattr(local, "target", None)
            if target is None or key not in target.hot_sites:
                return None
            new = target.on_site(layer, name, output_tensor(output))
            return None if new is None else with_output_tensor(output, new)
        return hook

    def _input_hook(self, key: tuple):
        local = self._local
        layer, name = key

        def pre_hook(module, args):
            target = getattr(local, "target", None)
            if target is None or key not in target.hot_sites:
                return None
            new = target.on_site(layer, name, args[0])
            return None if new is None else (new,) + tuple(args[1:])
        return pre_hook
