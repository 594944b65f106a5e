"""Loaded models: the decoder layers found by path, the registry of names, one
``LoadedModel`` per model with its hooks, locks and devices."""
from __future__ import annotations

import concurrent.futures
import functools
import inspect
import logging
import threading
from dataclasses import dataclass, field

import torch

from djinn_protocol.errors import (UnknownModelError, InvalidArgumentError, LimitExceededError)
from kernel_server.model import exact_attention
from kernel_server.model.layers import find_layers
from kernel_server.model.loading import (DEFAULT_MODEL, is_random, load_tokenizer_and_model,
                                          resolve_device, resolve_dtype)
from kernel_server.runtime.hooks import HookRegistry


log = logging.getLogger("kernel_server")

@dataclass
class LoadedModel:
    """A model loaded once on the server and shared by all sessions."""
    name: str
    model: torch.nn.Module
    tokenizer: object
    layers: list
    device: torch.device
    dtype: torch.dtype
    # one forward pass at a time on this model: sessions interleave between tokens
    # and while paused, never inside each other's compute
    compute_lock: threading.Lock = field(default_factory=threading.Lock)
    # transformers renamed the forward argument past_key_values -> cache (5.2x)
    cache_kwarg: str = "past_key_values"
    # loaded with an accelerate device map (kernel_server.model.sharding): the map, and the
    # execution device of each decoder layer; ``device`` is then the token embedding's
    device_map: dict | None = None
    layer_devices: list = field(default_factory=list)
    # the forward hooks of this model and the target each thread dispatches to
    # (kernel_server.runtime.hooks); made here, hooks installed on first use
    hooks: HookRegistry = field(init=False, repr=False)
    # the fast-decode slots of this model (kernel_server.runtime.fast_decode.decoder_for makes it;
    # None: no fast run yet)
    fast_decoder: object = field(default=None, init=False, repr=False)
    # the decode scheduler of this model (kernel_server.runtime.scheduler.scheduler_for makes
    # it; None: the engine is off or no run yet)
    decode_scheduler: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.hooks = HookRegistry(self.layers)

    @functools.cached_property
    def module_index(self) -> dict:
        """Every module of the model by its dotted name (``named_modules()``, made once)."""
        return dict(self.model.named_modules())

    @property
    def max_positions(self) -> int | None:
        """Positions the model can take (learned position embeddings end there: GPT-2's
        1024; past it a CUDA kernel asserts and the process's CUDA context is lost)."""
        cfg = self.model.config
        n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        return int(n) if n else None

    def check_context(self, positions: int, what: str = "this pass") -> None:
        """A typed error, before any computation, when ``positions`` do not fit the model."""
        limit = self.max_positions
        if limit is not None and positions > limit:
            raise LimitExceededError(f"{what} needs {positions} positions but {self.name} takes at "
                                     f"most {limit}; use a shorter prompt or fewer new tokens")

    def layer_device(self, index: int) -> torch.device:
        """Where decoder layer ``index`` computes (its hidden state and KV cache live there)."""
        return self.layer_devices[index] if self.layer_devices else self.device

    @property
    def devices(self) -> list:
        """The devices this model computes on, the input device first."""
        return list(dict.fromkeys([self.device, *self.layer_devices]))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def info(self) -> dict:
        return {"model": self.name, "layers": self.num_layers, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "architecture": type(self.model).__name__, "max_positions": self.max_positions,
                "devices": [str(d) for d in self.devices],
                "layer_devices": [str(self.layer_device(i)) for i in range(self.num_layers)],
                # which decode modes agree bit for bit here (tests/integration/test_exact_attention.py);
                # Hugging Face generate in this process: eager's bits (test_fast_decode.py)
                "exactness": {**exact_attention.exactness(self.device, self.dtype),
                              "hf_generate": "eager"}}


def load_model(name: str, device: str | None = None, dtype: str | None = None,
               progress: bool = True, device_map=None, max_memory=None) -> LoadedModel:
    """Load ``name`` (registry name, HF id, local dir, .gguf file or ``random:<shape>``) for
    inference; with ``device_map`` (auto, balanced, sequential, a dict, a device) through
    accelerate over several devices (kernel_server.model.sharding), ``max_memory`` per device."""
    from tqdm.auto import tqdm
    from kernel_server.model import sharding
    if not isinstance(name, str) or not name or len(name) > 500:
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    # every model the server loads decodes bit-reproducibly on CUDA: transformers' sdpa
    # attention is routed through kernel_server.model.exact_attention, once per process
    exact_attention.install()
    mapped = device_map not in (None, "")
    if mapped and device not in (None, "", "auto"):
        raise InvalidArgumentError(f"give a device ({device!r}) or a device map, not both")
    if max_memory and not mapped:
        raise InvalidArgumentError("--max-memory needs --device-map (auto, balanced, sequential)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with tqdm(total=3, desc=f"loading {name}", disable=not progress, leave=False) as bar:
        bar.set_postfix_str("tokenizer + weights")
        if mapped or is_random(name):
            tok, model = sharding.load(name, dt, dev, device_map if mapped else None, max_memory)
        else:
            tok, model = load_tokenizer_and_model(name, dt)
        bar.update(2)
        bar.set_postfix_str(f"to {dev}")
        if not mapped:
            model = model.to(dev)
        model = model.eval()
        model.requires_grad_(False)
        layers = find_layers(model)
        bar.update(1)
    if getattr(tok, "pad_token_id", None) is None:
        tok.pad_token = tok.eos_token
    layer_devices = []
    if mapped:
        dev, layer_devices = sharding.placement(model, layers)
        log.info("loaded %s: %d layers on %s (%s)", name, len(layers),
                 sharding.describe_layout(layer_devices), dt)
    else:
        log.info("loaded %s: %d layers on %s (%s)", name, len(layers), dev, dt)
    params = inspect.signature(model.forward).parameters
    return LoadedModel(name=name, model=model, tokenizer=tok, layers=layers, device=dev, dtype=dt,
                       cache_kwarg="cache" if "cache" in params else "past_key_values",
                       device_map=dict(getattr(model, "hf_device_map", None) or {}) if mapped else None,
                       layer_devices=layer_devices)


class ModelRegistry:
    """Loads each model once (per device/dtype) and shares it between sessions."""

    def __init__(self, default: str = DEFAULT_MODEL, device: str | None = None,
                 dtype: str | None = None, allow_load: bool = True, max_models: int = 4,
                 device_map=None, max_memory=None):
        self.default = default
        self.device = device
        self.device_map = device_map        # every model this server loads is placed by it
        self.max_memory = max_memory
        self.dtype = dtype
        self.allow_load = allow_load
        self.max_models = max_models
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, concurrent.futures.Future] = {}   # name -> its load, in flight
        self._lock = threading.Lock()   # guards the two dicts only; never held while loading

    def get(self, name: str | None = None) -> LoadedModel:
        """The loaded model ``name``, loading it first if needed. A load runs in the caller's
        thread without the registry lock: calls for loaded models (and sessions computing on
        them) never wait for it; callers for the same name wait for that one load."""
        name = name or self.default
        if not isinstance(name, str):
            raise UnknownModelError(f"model name must be a string, got {type(name).__name__}")
        with self._lock:
            if name in self._models:
                return self._models[name]
            pending = self._loading.get(name)
            if pending is None:
                if not self.allow_load and name != self.default:
                    raise UnknownModelError(f"this server only serves {sorted(self._models)}; "
                                            f"start it with --model {name} to use that model")
                held = len(self._models) + len(self._loading)
                if held >= self.max_models:
                    names = sorted(self._models) + [f"{n} (loading)" for n in sorted(self._loading)]
                    raise LimitExceededError(
                        f"this server already holds {held} models ({', '.join(names)}), its "
                        f"limit (--max-models {self.max_models}); use one of those")
                pending = self._loading[name] = concurrent.futures.Future()
                mine = True
            else:
                mine = False
        if not mine:
            return pending.result()
        try:
            loaded = load_model(name, self.device, self.dtype, device_map=self.device_map,
                                max_memory=self.max_memory)
        except BaseException as exc:
            with self._lock:
                del self._loading[name]
            pending.set_exception(exc)
            raise
        with self._lock:
            self._models[name] = loaded
            del self._loading[name]
        pending.set_result(loaded)
        return loaded

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._models)
