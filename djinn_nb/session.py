"""The ``Session`` proxy: one server-side generation state, driven from the notebook.

Nothing heavy lives here: every method is one call to the kernel server, which keeps
the KV cache, the paused hidden state and the steering rules.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from .results import Finished, Paused, event_from_wire

Positions = Union[str, int, Sequence[int]]   # "all" | "last" | absolute token positions
Event = Union[Paused, Finished]


def _positions(p: Positions):
    return p if isinstance(p, str) else [int(x) for x in np.atleast_1d(p)]


class Session:
    """Generation state on the server: token ids, KV cache, breakpoints, steering rules.

    States: idle -> running -> paused <-> running -> finished, and closed; after
    ``restore()`` / ``fork()`` / ``load_checkpoint()``: ready (``resume()`` continues)."""

    def __init__(self, client, info: dict):
        self.client = client
        self.id: str = info["id"]
        self.model: str = info["model"]
        self.layers: int = info["layers"]
        self.hidden_size: int = info["hidden_size"]
        self.vocab_size: int = info["vocab_size"]
        self.device: str = info["device"]
        self.dtype: str = info["dtype"]
        self.architecture: str = info["architecture"]
        self.last_event: Optional[Event] = None

    def _call(self, name: str, **kwargs):
        return self.client._call(name, session=self.id, **kwargs)

    def _event(self, wire_event: dict) -> Event:
        self.last_event = event_from_wire(wire_event)
        return self.last_event

    # ---- state -------------------------------------------------------------------------
    def info(self) -> dict:
        """State, model facts, breakpoints and steering rules, as the server sees them."""
        return self._call("session_info")

    @property
    def state(self) -> str:
        return self.info()["state"]

    # ---- breakpoints and steering ------------------------------------------------------
    def breakpoint(self, layer: int, phase: str = "decode", steps: Optional[Sequence[int]] = None) -> dict:
        """Pause after decoder block ``layer`` (0-based) on ``phase`` "decode" (steps 1..),
        "prefill" (step 0) or "both"; on every step, or only on ``steps``."""
        return self._call("set_breakpoint", layer=layer, phase=phase,
                          steps=None if steps is None else list(np.atleast_1d(steps).tolist()))

    def clear_breakpoints(self, layer: Optional[int] = None) -> int:
        """Remove all breakpoints (or those at ``layer``); returns how many were removed."""
        return self._call("clear_breakpoints", layer=layer)

    def steer(self, layer: int, *, scale: Optional[float] = None, add=None, alpha: float = 1.0,
              set=None, positions: Positions = "all", phase: str = "both",
              steps: Optional[Sequence[int]] = None) -> dict:
        """A standing edit of block ``layer``'s output on every step (no pause):
        ``scale`` (h <- s*h), ``add`` (h <- h + alpha*v, v of shape [hidden]) or ``set``."""
        return self._call("steer", layer=layer, scale=scale, add=add, alpha=alpha, set=set,
                          positions=_positions(positions), phase=phase,
                          steps=None if steps is None else list(np.atleast_1d(steps).tolist()))

    def clear_steering(self, rule_id: Optional[int] = None) -> int:
        """Remove all steering rules (or the one with ``rule_id``)."""
        return self._call("clear_steering", rule_id=rule_id)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 20, *, chat: bool = False,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None, stop_at_eos: bool = True, record_top_k: int = 5,
                 return_logits: bool = False) -> Event:
        """Start generating from ``prompt`` (raw text, token ids, or chat messages; ``chat=True``
        applies the chat template to a text). Runs until a breakpoint pauses it (``Paused``)
        or it ends (``Finished``). Greedy unless ``temperature > 0`` (seeded sampling)."""
        return self._event(self._call(
            "generate", prompt=prompt, max_new_tokens=max_new_tokens, chat=chat,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos,
            record_top_k=record_top_k, return_logits=return_logits))

    def resume(self, ignore_breakpoints: bool = False) -> Event:
        """Continue to the next pause or the end (``ignore_breakpoints=True``: to the end)."""
        return self._event(self._call("resume", ignore_breakpoints=ignore_breakpoints))

    def step(self, to: str = "layer") -> Event:
        """Continue and pause again at the next layer (``to="layer"``) or at the same layer
        of the next token (``to="token"``)."""
        return self._event(self._call("step", to=to))

    def stop(self) -> Finished:
        """Abandon the paused generation; the result holds the tokens made so far."""
        return self._event(self._call("stop"))

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint(self) -> "Checkpoint":
        """Snapshot the generation state now (at once; the copy runs in the background).
        While paused mid-forward it captures the start of the current token."""
        from .checkpoint import Checkpoint
        return Checkpoint(self.client, self._call("checkpoint"))

    def restore(self, ck) -> None:
        """Rewind this session to ``ck``; it is then "ready": ``resume()`` continues."""
        self._call("restore", checkpoint=ck.id)
        self.last_event = None

    def fork(self, ck) -> "Session":
        """A new, independent session starting from ``ck`` (state "ready")."""
        return Session(self.client, self.client._call("fork", checkpoint=ck.id))

    # ---- while paused ----------------------------------------------------------------------
    def activation(self, positions: Positions = "all", reduce: Optional[str] = None) -> np.ndarray:
        """The paused layer's output, float32 ``[positions, hidden]`` (with ``reduce="norm"``:
        ``[positions]``; ``"mean"``: ``[hidden]``). Edits made so far are included."""
        out = self._call("activation", positions=_positions(positions), reduce=reduce)
        if isinstance(out, dict) and "bulk" in out:       # large: fetched over the bulk path
            out = self.client._fetch_array(out)
        return out

    def edit(self, *, scale: Optional[float] = None, add=None, alpha: float = 1.0, set=None,
             positions: Positions = "all") -> dict:
        """Rewrite the paused hidden state before the forward pass goes on."""
        return self._call("edit", scale=scale, add=add, alpha=alpha, set=set,
                          positions=_positions(positions))

    # ---- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the session (and its KV cache) on the server."""
        self.client._call("close_session", session=self.id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.client.closed:
            self.close()

    def __repr__(self):
        return (f"<djinn_nb.Session {self.id} {self.model}: {self.layers} layers, hidden "
                f"{self.hidden_size}, {self.device}/{self.dtype}>")
