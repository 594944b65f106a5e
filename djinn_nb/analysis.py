"""Client-side containers for one-shot analysis passes: activation caches and patching grids."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from djinn_protocol import hook_names


class ActivationCache:
    """Activations of one forward pass, by (site, layer): ``cache["resid", 6]``.

    Module sites are keyed by their name with layer None: ``cache["module:...", None]``.
    TransformerLens hook names index it too: ``cache["blocks.6.hook_resid_post"]``.
    A cache of gradients (``Session.grad``) also holds the metric's value in ``metric``."""

    def __init__(self, raw: dict, reduce: Optional[str], metric: Optional[float] = None):
        self.reduce = reduce
        self.metric = metric
        self._data = {(site, None if int(layer) < 0 else int(layer)): np.asarray(a)
                      for site, by_layer in raw.items() for layer, a in by_layer.items()}

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, str):
            key = self._hook_key(key) if hook_names.is_hook_name(key) else (key, None)
        return self._data[key]

    def _hook_key(self, name: str) -> tuple:
        layer, site = hook_names.parse(name)
        if layer is not None:
            return site, layer
        # hook_embed / ln_final: the one module site of that kind the server resolved it to
        words = {"embed": ("embed", "wte", "drop"), "ln_final": ("norm", "ln_f")}[site]
        found = [k for k in self._data if k[1] is None and any(w in k[0] for w in words)]
        if len(found) != 1:
            raise KeyError(name)
        return found[0]

    def __contains__(self, key) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self):
        return sorted(self._data, key=lambda k: (k[0], -1 if k[1] is None else k[1]))

    @property
    def sites(self) -> list:
        return sorted({s for s, _ in self._data})

    def layers(self, site: str = "resid") -> list:
        return sorted(layer for s, layer in self._data if s == site and layer is not None)

    def stack(self, site: str = "resid") -> np.ndarray:
        """One site's arrays over its layers: [layers, ...]."""
        return np.stack([self._data[(site, layer)] for layer in self.layers(site)])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._data.values())

    def __repr__(self):
        return (f"<ActivationCache {len(self)} arrays, sites {self.sites}, reduce={self.reduce}, "
                f"{self.nbytes / 1024:.1f} KiB>")


@dataclass(frozen=True)
class PatchingResult:
    """A patching sweep: ``metric[layer_index, position_index]`` is the logit difference
    after patching the clean activation there into the corrupted run; ``clean`` and
    ``corrupted`` are the unpatched metrics; ``normalized`` maps corrupted -> 0, clean -> 1."""
    layers: list
    positions: list
    site: str
    answer: list
    metric: np.ndarray
    clean: float
    corrupted: float

    @classmethod
    def from_rows(cls, rows: list, answer) -> "PatchingResult":
        return cls(layers=[r["layer"] for r in rows], positions=list(rows[0]["positions"]),
                   site=rows[0]["site"], answer=list(answer),
                   metric=np.array([r["metric"] for r in rows], dtype=np.float64),
                   clean=float(rows[0]["clean"]), corrupted=float(rows[0]["corrupted"]))

    @classmethod
    def from_grids(cls, grids: list, answer) -> "PatchingResult":
        """One result from server grids (``patch_sweep`` / ``attribution_patch`` replies),
        each of some layers over the same positions, stacked in order."""
        return cls(layers=[layer for g in grids for layer in g["layers"]],
                   positions=list(grids[0]["positions"]), site=grids[0]["site"], answer=list(answer),
                   metric=np.array([row for g in grids for row in g["metric"]], dtype=np.float64),
                   clean=float(grids[0]["clean"]), corrupted=float(grids[0]["corrupted"]))

    @property
    def normalized(self) -> np.ndarray:
        span = self.clean - self.corrupted
        return (self.metric - self.corrupted) / (span if span != 0 else 1.0)

    def plot(self, labels=None):
        from .plots import patching_heatmap
        return patching_heatmap(self, labels)
