"""Client-side containers for one-shot analysis passes: activation caches and patching grids."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


class ActivationCache:
    """Activations of one forward pass, by (site, layer): ``cache["resid", 6]``.

    Module sites are keyed by their name with layer None: ``cache["module:...", None]``."""

    def __init__(self, raw: dict, reduce: Optional[str]):
        self.reduce = reduce
        self._data = {(site, None if int(layer) < 0 else int(layer)): np.asarray(a)
                      for site, by_layer in raw.items() for layer, a in by_layer.items()}

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, str):
            key = (key, None)
        return self._data[key]

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

    @property
    def normalized(self) -> np.ndarray:
        span = self.clean - self.corrupted
        return (self.metric - self.corrupted) / (span if span != 0 else 1.0)

    def plot(self, labels=None):
        from .plots import patching_heatmap
        return patching_heatmap(self, labels)
