"""The dashboard's inputs: prompt, breakpoint and steering pickers, buttons.

``Controls.settings()`` reads them into one ``Settings`` snapshot when an action is
asked for; the jobs never read a widget. ``render_session`` (subscribed to the state)
updates the layer options when the dashboard moves to a model with another depth.
"""
from __future__ import annotations

from typing import Optional

import ipywidgets as W
import traitlets

from .state import DashboardState, Settings

#: sites the pickers offer (see the README's "sites"; module paths through the API)
SITES = ("resid", "attn", "mlp", "heads")
NARROW = "200px"


class LayerToggles(W.VBox):
    """A grid of toggle buttons, one per layer, all in sight (a list box showed 6 of 30).
    ``value``: the picked layers (a sorted tuple); ``options``: the layers offered."""

    value = traitlets.Tuple()
    options = traitlets.Tuple()

    def __init__(self, options, value=(), description: str = "break at", columns: int = 6):
        self._grid = W.GridBox(layout=W.Layout(
            grid_template_columns=f"repeat({columns}, 40px)", grid_gap="2px"))
        self._buttons: list = []
        self._syncing = False
        super().__init__([W.HTML(f"<small>{description} (blocks)</small>"), self._grid])
        self.add_class("dj-layer-toggles")
        self.options = tuple(options)
        self.value = tuple(value)

    @traitlets.validate("value")
    def _check_value(self, proposal):
        picked = tuple(sorted({int(v) for v in proposal["value"]}))
        unknown = [v for v in picked if v not in self.options]
        if unknown:
            raise traitlets.TraitError(f"layers {unknown} are not among {list(self.options)}")
        return picked

    @traitlets.observe("options")
    def _build(self, change) -> None:
        self.value = tuple(v for v in self.value if v in change["new"])
        self._buttons = [W.ToggleButton(value=o in self.value, description=str(o),
                                        tooltip=f"pause after block {o}",
                                        layout=W.Layout(width="40px", padding="0"))
                         for o in change["new"]]
        for b in self._buttons:
            b.observe(self._on_toggle, names="value")
        self._grid.children = self._buttons

    @traitlets.observe("value")
    def _show(self, change) -> None:
        self._syncing = True        # the buttons follow value; their observers stay quiet
        try:
            for o, b in zip(self.options, self._buttons):
                b.value = o in change["new"]
        finally:
            self._syncing = False

    def _on_toggle(self, _change) -> None:
        if not self._syncing:
            self.value = tuple(o for o, b in zip(self.options, self._buttons) if b.value)


class Controls:
    """The input widgets of one dashboard (attributes keep the names notebooks use)."""

    def __init__(self, layers: int, *, prompt: str, max_new_tokens: int, breakpoint_layers,
                 steer_layer: Optional[int], op: str, scale: float, alpha: float,
                 vector_seed: int):
        narrow = lambda: W.Layout(width=NARROW)  # noqa: E731
        self.prompt = W.Textarea(value=prompt, description="prompt", rows=2,
                                 layout=W.Layout(width="60%"))
        self.max_new_tokens = W.BoundedIntText(value=max_new_tokens, min=1, max=10**6,
                                               description="new tokens", layout=narrow())
        self.layer_picker = LayerToggles(range(layers), tuple(breakpoint_layers))
        self.bp_site = W.Dropdown(options=list(SITES), value="resid", description="site",
                                  tooltip="where in the block to pause", layout=narrow())
        self.bp_phase = W.Dropdown(options=["decode", "prefill", "both"], value="decode",
                                   description="phase", layout=narrow())
        self.bp_steps = W.Text(value="", placeholder="all, or e.g. 3,5", description="steps",
                               layout=narrow())
        self.steer_layer = W.Dropdown(options=list(range(layers)),
                                      value=layers // 2 if steer_layer is None else steer_layer,
                                      description="steer layer", layout=narrow())
        self.steer_site = W.Dropdown(options=list(SITES), value="resid", description="steer site",
                                     layout=narrow())
        self.steer_op = W.ToggleButtons(options=["scale", "add"], value=op, description="op",
                                        tooltips=["h <- scale * h",
                                                  "h <- h + alpha * v (v: seeded random unit vector)"],
                                        style={"button_width": "60px"})
        wide = dict(layout=W.Layout(width="100%"), style={"description_width": "60px"})
        self.scale = W.FloatSlider(value=scale, min=0.0, max=2.0, step=0.05, description="scale",
                                   continuous_update=False, readout_format=".2f", **wide)
        self.alpha = W.FloatSlider(value=alpha, min=-4.0, max=4.0, step=0.05, description="alpha",
                                   continuous_update=False, readout_format=".2f", **wide)
        self.vector_seed = W.BoundedIntText(value=vector_seed, min=0, max=2**31 - 1,
                                            description="vector seed", layout=narrow())
        self.auto = W.Checkbox(value=True, description="re-run steered when the slider moves",
                               indent=False)
        self.updating = False      # True while options change: no re-run for that

    def settings(self) -> Settings:
        return Settings(prompt=self.prompt.value, max_new_tokens=int(self.max_new_tokens.value),
                        layers=tuple(self.layer_picker.value), bp_site=self.bp_site.value,
                        bp_phase=self.bp_phase.value, bp_steps=self.bp_steps.value,
                        steer_layer=int(self.steer_layer.value), steer_site=self.steer_site.value,
                        op=self.steer_op.value, scale=float(self.scale.value),
                        alpha=float(self.alpha.value), vector_seed=int(self.vector_seed.value))

    def steering_widgets(self) -> tuple:
        return (self.scale, self.alpha, self.steer_op, self.steer_layer, self.steer_site,
                self.vector_seed)

    def moves_the_rule(self, owner) -> bool:
        """Whether a change of ``owner`` changes the rule in use (alpha does not matter
        for "scale", the scale not for "add")."""
        if not self.auto.value or self.updating:
            return False
        if owner is self.scale:
            return self.steer_op.value == "scale"
        if owner in (self.alpha, self.vector_seed):
            return self.steer_op.value == "add"
        return True

    def render_session(self, state: DashboardState) -> None:
        layers = state.session.get("layers")
        if layers is None or len(self.layer_picker.options) == layers:
            return
        self.updating = True
        try:
            self.layer_picker.value = ()
            self.layer_picker.options = tuple(range(layers))
            self.steer_layer.options = list(range(layers))
            self.steer_layer.value = layers // 2
        finally:
            self.updating = False

    def boxes(self, box) -> W.HBox:
        """The breakpoint and steering boxes side by side (``box(title, *children)``)."""
        breakpoints = box("breakpoints", self.layer_picker, self.bp_site, self.bp_phase,
                          self.bp_steps)
        steering = box("steering", self.steer_layer, self.steer_site, self.steer_op, self.scale,
                       self.alpha, self.vector_seed, self.auto)
        steering.layout.flex = "1 1 380px"
        return breakpoints, steering
