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
        if site not in hook_names.MODULE_SITES:
            return site, layer
        # a name the server resolved to a module site (hook_embed, attn.hook_q, ...): the one
        # module of the cache whose path ends in a name of that kind (in that block)
        ends = hook_names.MODULE_SITES[site]
        found = [k for k in self._data if k[1] is None and k[0].rsplit(".", 1)[-1] in ends
                 and (layer is None or f".{layer}." in k[0])]
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


class SAEFeatures:
    """Top-k SAE features per position (``Session.sae_features``): ``indices`` / ``values``
    [positions, k] (largest first), ``l0`` (active features per position), ``recon_error``
    (|x - x^| / |x| per position), ``positions`` (absolute), ``tokens`` (texts, for a prompt)
    and, when asked for, ``activations`` [positions, len(features)] of ``features``."""

    def __init__(self, raw: dict):
        self.sae, self.layer, self.site, self.k = raw["sae"], raw["layer"], raw["site"], raw["k"]
        self.indices = np.asarray(raw["indices"])
        self.values = np.asarray(raw["values"])
        self.l0 = np.asarray(raw["l0"])
        self.recon_error = np.asarray(raw["recon_error"])
        self.positions = list(raw["positions"])
        self.tokens = raw.get("tokens")
        self.step = raw.get("step")
        self.features = raw.get("features")
        self.activations = None if raw.get("activations") is None else np.asarray(raw["activations"])

    def top(self, position: int = -1) -> list:
        """[(feature, activation), ...] at ``position`` (an index into ``positions``; -1 the
        last), active features only, largest first."""
        return [(int(i), float(v)) for i, v in zip(self.indices[position], self.values[position])
                if v > 0]

    def table(self) -> list:
        """One row per position: (position, token, [(feature, activation), ...])."""
        tokens = self.tokens or [""] * len(self.positions)
        return [(p, t, self.top(j)) for j, (p, t) in enumerate(zip(self.positions, tokens))]

    def __repr__(self):
        return (f"<SAEFeatures {self.sae} at layer {self.layer} {self.site}: {len(self.positions)} "
                f"positions, top {self.k}, mean L0 {float(self.l0.mean()):.1f}>")


def save_sae(path, W_enc, b_enc, W_dec, b_dec, hook_name: str, threshold=None,
             apply_b_dec_to_input: bool = True) -> str:
    """Write an SAE in SAELens's on-disk format: ``path``/cfg.json and
    ``path``/sae_weights.safetensors (float32), for ``Session.load_sae``. ``threshold``
    makes it a JumpReLU SAE. Returns the directory (absolute)."""
    import json
    import os
    W_enc = np.ascontiguousarray(W_enc, dtype=np.float32)
    d_in, d_sae = W_enc.shape
    tensors = {"W_enc": W_enc, "b_enc": np.ascontiguousarray(b_enc, dtype=np.float32),
               "W_dec": np.ascontiguousarray(W_dec, dtype=np.float32),
               "b_dec": np.ascontiguousarray(b_dec, dtype=np.float32)}
    if threshold is not None:
        tensors["threshold"] = np.ascontiguousarray(threshold, dtype=np.float32)
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    cfg = {"architecture": "standard" if threshold is None else "jumprelu", "d_in": int(d_in),
           "d_sae": int(d_sae), "dtype": "float32", "hook_name": hook_name,
           "apply_b_dec_to_input": bool(apply_b_dec_to_input), "normalize_activations": "none"}
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(os.path.join(path, "sae_weights.safetensors"), tensors)
    return path


def write_safetensors(path, tensors: dict) -> None:
    """float32 arrays in the safetensors format (8-byte little-endian header length, a JSON
    header of dtypes, shapes and byte offsets, then the raw bytes), without the safetensors
    package: the client does not depend on it."""
    import json
    header, offset = {}, 0
    arrays = {k: np.ascontiguousarray(v, dtype="<f4") for k, v in tensors.items()}
    for k, a in arrays.items():
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for a in arrays.values():
            f.write(a.tobytes())


@dataclass
class TrainedSAE:
    """A ReLU SAE trained by ``train_sae``: its weights and the loss curve."""
    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    losses: list
    mse: list

    def encode(self, x):
        return np.maximum((np.asarray(x, np.float32) - self.b_dec) @ self.W_enc + self.b_enc, 0)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def save(self, path, hook_name: str) -> str:
        return save_sae(path, self.W_enc, self.b_enc, self.W_dec, self.b_dec, hook_name)


def train_sae(acts, d_sae: int, steps: int = 300, l1: float = 1e-3, lr: float = 1e-3,
              batch: int = 256, seed: int = 0) -> TrainedSAE:
    """Train a small ReLU SAE on activations ``acts`` [n, d_in] with numpy (no torch in the
    client): loss = mean |x^ - x|^2 (over the hidden axis) / mean |x|^2 + l1 * mean sum f *
    |W_dec row|; Adam, decoder rows kept at unit norm, seeded. Meant for notebooks and tests
    (a few hundred steps on a few thousand vectors run in seconds), not for research SAEs."""
    x_all = np.asarray(acts, dtype=np.float32)
    rng = np.random.default_rng(seed)
    n, d_in = x_all.shape
    scale = float(np.mean(np.sum((x_all - x_all.mean(0)) ** 2, axis=1)))
    W_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {"W_enc": W_dec.T.copy(), "b_enc": np.zeros(d_sae, np.float32), "W_dec": W_dec,
              "b_dec": x_all.mean(0).astype(np.float32)}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    losses, mses = [], []
    for t in range(1, steps + 1):
        x = x_all[rng.integers(0, n, size=min(batch, n))]
        W_enc, b_enc, W_dec, b_dec = (params[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
        xc = x - b_dec
        pre = xc @ W_enc + b_enc
        f = np.maximum(pre, 0)
        err = f @ W_dec + b_dec - x
        B = x.shape[0]
        mse = float(np.sum(err ** 2) / B / scale)
        # (decoder rows have unit norm, so the l1 term is sum f)
        losses.append(mse + l1 * float(f.sum() / B))
        mses.append(mse)
        d_out = 2 * err / (B * scale)
        d_f = d_out @ W_dec.T + l1 / B
        d_pre = d_f * (pre > 0)
        grads = {"W_dec": f.T @ d_out, "W_enc": xc.T @ d_pre, "b_enc": d_pre.sum(0),
                 "b_dec": d_out.sum(0) - (d_pre @ W_enc.T).sum(0)}
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            params[k] -= lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)
        params["W_dec"] /= np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
    return TrainedSAE(params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"],
                      losses, mses)
