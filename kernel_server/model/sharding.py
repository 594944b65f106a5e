"""One model over several devices, through accelerate's device maps (no runtime of our own).

``--device-map auto`` (or balanced / sequential / a JSON dict / one device) and
``--max-memory 0=70GiB,1=70GiB`` are parsed here; a model is loaded with the map
(``from_pretrained(device_map=...)`` for paths and hub ids, built on the CPU and dispatched
for the registry's small models, built straight on its devices for ``random:<shape>``) and
always dispatched with accelerate's hooks, so that a one-device map runs the same code as a
many-device one. ``placement()`` tells each decoder layer's execution device; the rest of
the server moves tensors by it (steering vectors, restored KV caches). ``device_memory()`` is
the per-device memory report of ``client.stats()``.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import torch

from djinn_protocol.errors import DjinnError, InvalidArgumentError, UnknownModelError
from kernel_server.model.layers import layers_path
from kernel_server.model.loading import (RANDOM_PREFIX, RANDOM_SHAPES, is_random,
                                          load_tokenizer_and_model, tiny_tokenizer)

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


# ---- options ------------------------------------------------------------------------------
def _device_value(value, what: str):
    """One device-map value as accelerate wants it: a CUDA index, "cpu" or "disk"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        v = value.strip()
        if v.isdigit():
            return int(v)
        if v in ("cpu", "disk"):
            return v
        if v == "cuda":
            return 0
        if v.startswith("cuda:") and v[5:].isdigit():
            return int(v[5:])
    raise InvalidArgumentError(f"{what}: {value!r} is not a device (an index, 'cuda:N', 'cpu' or 'disk')")


def parse_device_map(value):
    """``None``, a strategy name (auto, balanced, balanced_low_0, sequential), or a dict
    {module name prefix: device}; given as a dict, a JSON object, a .json file, or one
    device for the whole model ("cpu", "cuda:1", "0")."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in STRATEGIES:
            return text
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise InvalidArgumentError(f"device map is not valid JSON: {exc}") from None
        elif text.endswith(".json"):
            try:
                value = json.loads(Path(text).expanduser().read_text())
            except (OSError, ValueError) as exc:
                raise InvalidArgumentError(f"cannot read the device map file {text}: {exc}") from None
        else:
            return {"": _device_value(text, "device map")}
    if not isinstance(value, dict) or not value:
        raise InvalidArgumentError(f"device map must be one of {', '.join(STRATEGIES)}, a device, "
                                   f"or a non-empty dict of module name -> device; got {value!r:.80}")
    out = {}
    for key, dev in value.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(f"device map keys must be module names, got {key!r}")
        out[key] = _device_value(dev, f"device map entry {key!r}")
    return out


def parse_max_memory(value):
    """``"0=70GiB,1=70GiB,cpu=100GiB"`` (or such a dict) -> {0: "70GiB", 1: "70GiB", "cpu": ...}."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        pairs = {}
        for part in value.split(","):
            key, sep, size = part.partition("=")
            if not sep or not key.strip() or not size.strip():
                raise InvalidArgumentError(f"max memory must look like 0=70GiB,1=70GiB,cpu=100GiB; "
                                           f"got {value!r}")
            pairs[key.strip()] = size.strip()
        value = pairs
    if not isinstance(value, dict) or not value:
        raise InvalidArgumentError(f"max memory must be a dict or 'DEVICE=SIZE,...', got {value!r:.80}")
    from accelerate.utils import convert_file_size_to_int
    out = {}
    for key, size in value.items():
        dev = _device_value(key, "max memory")
        try:
            if convert_file_size_to_int(size) <= 0:
                raise ValueError("not positive")
        except (ValueError, TypeError, AttributeError):
            raise InvalidArgumentError(f"max memory for {key!r}: {size!r} is not a size like 70GiB") from None
        out[dev] = size
    return out


# ---- placement ----------------------------------------------------------------------------
def as_device(dev) -> torch.device:
    """A torch.device with an index for CUDA (so that equal devices compare equal)."""
    if isinstance(dev, int):
        return torch.device("cuda", dev)
    dev = torch.device(dev)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def execution_device(module: torch.nn.Module, fallback: torch.device | None = None) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of
    its first real parameter (or buffer), else ``fallback``."""
    hook = getattr(module, "_hf_hook", None)
    for h in (getattr(hook, "hooks", None) or ([hook] if hook is not None else [])):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return as_device(dev)
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return as_device(t.device)
    return fallback


def placement(model: torch.nn.Module, layers: list) -> tuple[torch.device, list]:
    """(input device: the token embedding's, [execution device of each decoder layer])."""
    first = execution_device(model.get_input_embeddings())
    return first, [execution_device(layer, first) for layer in layers]


def split_map(model: torch.nn.Module, layer_devices: list) -> dict:
    """An explicit device map: decoder layer i on ``layer_devices[i]``; every other module
    with tensors goes with the first layer (modules before the layers) or the last (after)."""
    path = layers_path(model)
    layers = model.get_submodule(path)
    if len(layer_devices) != len(layers):
        raise InvalidArgumentError(f"{len(layer_devices)} devices given for {len(layers)} layers")
    devs = [_device_value(d, "layer device") for d in layer_devices]
    out: dict = {}
    after = False

    def walk(module, prefix):
        nonlocal after
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full == path:
                out.update({f"{full}.{i}": d for i, d in enumerate(devs)})
                after = True
            elif path.startswith(full + "."):
                walk(child, full)
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out[full] = devs[-1] if after else devs[0]
    walk(model, "")
    return out


def plan(model: torch.nn.Module, device_map, max_memory, dtype: torch.dtype) -> dict:
    """The explicit {module: device} map for ``device_map`` (a strategy is resolved by
    accelerate from the model's sizes; the model may be on the meta device)."""
    if isinstance(device_map, dict):
        if max_memory:
            raise InvalidArgumentError("--max-memory applies to a device map strategy "
                                       f"({', '.join(STRATEGIES)}), not to an explicit map")
        return dict(device_map)
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map == "sequential":
        budget = get_max_memory(dict(max_memory) if max_memory else None)
    else:
        budget = get_balanced_memory(model, max_memory=dict(max_memory) if max_memory else None,
                                     no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=device_map == "balanced_low_0")
    return dict(infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split,
                                      dtype=dtype))


def dispatch(model: torch.nn.Module, device_map: dict) -> torch.nn.Module:
    """accelerate's dispatch, hooks always attached (one device or many: the same path)."""
    from accelerate import dispatch_model
    if "disk" in device_map.values():
        raise InvalidArgumentError("disk offload is not supported: give the model GPU or CPU memory")
    skip = getattr(model, "_skip_keys_device_placement", None)
    if isinstance(skip, (set, tuple)):
        skip = list(skip)
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    if set(device_map.values()) == {"cpu"}:   # nothing is offloaded: its "offloaded" warning is wrong
        quiet.setLevel(logging.ERROR)
    try:
        return dispatch_model(model, device_map=device_map, skip_keys=skip or None, force_hooks=True)
    finally:
        quiet.setLevel(level)


def _has_hooks(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in model.modules())


# ---- random-init models built on their devices ----------------------------------------------
def _device_for(name: str, device_map: dict):
    best = None
    for key in device_map:
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    if best is None:
        raise InvalidArgumentError(f"the device map does not place {name!r}")
    return device_map[best]


def _init_(t: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Seeded per parameter name and device type: the same weights whatever the device map
    (any CUDA device gives the same values; CPU gives other, equally seeded ones)."""
    if t.dim() == 1:
        t.fill_(0.0 if name.endswith("bias") else 1.0)       # norms: ones; biases: zeros
        return
    g = torch.Generator(device=t.device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    t.normal_(0.0, std, generator=g)


def materialize(model: torch.nn.Module, device_map: dict, dtype: torch.dtype, seed: int,
                std: float) -> None:
    """Replace each meta parameter by a seeded random tensor made on its mapped device
    (nothing of the model is ever allocated on the CPU unless the map says "cpu")."""
    with torch.no_grad():
        for name, param in list(model.named_parameters()):
            dev = _device_for(name, device_map)
            t = torch.empty(param.shape, dtype=dtype,
                            device="cpu" if dev == "cpu" else as_device(dev))
            _init_(t, name, seed, std)
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def random_config(shape: str, tokenizer, max_positions: int = 8192):
    from transformers import LlamaConfig
    if shape not in RANDOM_SHAPES:
        raise UnknownModelError(f"unknown random shape {shape!r}: one of {', '.join(RANDOM_SHAPES)} "
                                f"(as random:<shape>)")
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False, **RANDOM_SHAPES[shape])


def build_random(name: str, dtype: torch.dtype, device: torch.device, device_map=None,
                 max_memory=None, seed: int = 0):
    """``random:<shape>``: (tokenizer, model). Built with empty (meta) weights, then each
    shard materialised on its device with a seeded init and dispatched."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM
    tok = tiny_tokenizer()
    config = random_config(name[len(RANDOM_PREFIX):], tok)
    with init_empty_weights(include_buffers=False):     # buffers (rotary) stay small and real
        model = LlamaForCausalLM(config)
    if device_map is None:
        materialize(model, {"": "cpu" if device.type == "cpu" else as_device(device).index},
                    dtype, seed, config.initializer_range)
        return tok, model.to(device)
    mapping = plan(model, device_map, max_memory, dtype)
    materialize(model, mapping, dtype, seed, config.initializer_range)
    return tok, dispatch(model, mapping)


def load(name: str, dtype: torch.dtype, device: torch.device, device_map, max_memory):
    """(tokenizer, dispatched model) for ``name`` under ``device_map``."""
    try:
        return _load(name, dtype, device, device_map, max_memory)
    except DjinnError:
        raise
    except ValueError as exc:          # accelerate's word on a map that does not fit the model
        raise InvalidArgumentError(f"cannot place {name} with device map {device_map!r:.200}: "
                                   f"{exc}") from None


def _load(name, dtype, device, device_map, max_memory):
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if max_memory and device_map is None:
        raise InvalidArgumentError("--max-memory needs --device-map (auto, balanced, sequential)")
    if is_random(name):
        return build_random(name, dtype, device, device_map, max_memory)
    if device_map is None:
        raise InvalidArgumentError("no device map given")
    if name in ("tiny-gpt2", "gpt2-124m-random"):   # built in memory on the CPU: dispatch it
        tok, model = load_tokenizer_and_model(name, dtype)
        return tok, dispatch(model, plan(model, device_map, max_memory, dtype))
    tok, model = load_tokenizer_and_model(name, dtype, device_map=device_map, max_memory=max_memory)
    if not _has_hooks(model):              # transformers dispatches only maps of 2+ devices
        mapping = device_map if isinstance(device_map, dict) else {
            "": _device_value(str(execution_device(model, torch.device("cpu"))), "device")}
        model = dispatch(model, mapping)
    return tok, model


def describe_layout(layer_devices: list) -> str:
    """'cuda:0 (layers 0-19), cuda:1 (layers 20-39)'."""
    runs: list = []
    for i, d in enumerate(layer_devices):
        if runs and runs[-1][0] == d and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([d, i, i])
    return ", ".join(f"{d} (layers {a}-{b})" if a != b else f"{d} (layer {a})" for d, a, b in runs)


def group_by_device(devices: list) -> dict:
    """{device: [indices]} in order of first appearance: which layers share a copy stream."""
    groups: dict = {}
    for i, d in enumerate(devices):
        groups.setdefault(d, []).append(i)
    return groups


# ---- memory accounting ------------------------------------------------------------------------
def _process_rss() -> int:
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # the peak


def _host_total() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(models: list) -> list[dict]:
    """Per device: allocated / reserved / total bytes (torch.cuda.memory_*) for each CUDA
    device this process uses, and the process RSS for "cpu"; with the decoder layers each
    loaded model keeps there."""
    layers: dict = {}
    for m in models:
        for d in (m.layer_devices or [m.device] * m.num_layers):
            per = layers.setdefault(str(as_device(d)) if d.type == "cuda" else d.type, {})
            per[m.name] = per.get(m.name, 0) + 1
    out = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append({"device": f"cuda:{i}", "kind": "cuda", "name": props.name,
                        "allocated_bytes": int(torch.cuda.memory_allocated(i)),
                        "reserved_bytes": int(torch.cuda.memory_reserved(i)),
                        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(i)),
                        "total_bytes": int(props.total_memory),
                        "layers": layers.get(f"cuda:{i}", {})})
    rss = _process_rss()
    out.append({"device": "cpu", "kind": "cpu", "name": "host (process RSS)", "rss_bytes": rss,
                "allocated_bytes": rss, "reserved_bytes": rss, "total_bytes": _host_total(),
                "layers": layers.get("cpu", {})})
    return out
