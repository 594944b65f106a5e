"""Experiment configs: a YAML file validated against ``config.schema.json``, with defaults.

Errors name the bad field by its path (``steering.sweep.values[2]``) and, for an
unknown field, suggest the nearest known one. Layers in a config are requested
layers: :func:`clip_layer` maps them onto a model of a given depth.
"""
from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Union

from djinn_protocol.errors import InvalidArgumentError

SCHEMA_FILE = Path(__file__).with_name("config.schema.json")

DEFAULTS: dict[str, Any] = {
    "description": "",
    "max_new_tokens": 16,
    "repetitions": 3,
    "seeds": [0],
    "sampling": {"temperature": 0.0, "top_k": None, "top_p": None},
    "breakpoints": None,
    "steering": None,
    "checkpoints": None,
    "latency": {"pings": 20},
    "figures": True,
}


class ConfigError(InvalidArgumentError):
    """An experiment config that does not match the schema (the message names each bad field)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


@functools.lru_cache(maxsize=None)
def schema() -> dict:
    """The config JSON schema shipped with the package."""
    return json.loads(SCHEMA_FILE.read_text())


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _describe(error) -> str:
    """One readable line for a jsonschema error, naming the field."""
    import jsonschema
    if error.validator in ("oneOf", "anyOf") and error.context:
        error = jsonschema.exceptions.best_match(error.context)
    where = _path(error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted((error.schema.get("properties") or {}).keys())
        extra = [k for k in error.instance if k not in known] if isinstance(error.instance, dict) else []
        lines = []
        for key in extra:
            hint = difflib.get_close_matches(str(key), known, n=1)
            field = _path(list(error.absolute_path) + [key])
            lines.append(f"unknown field `{field}`"
                         + (f" (did you mean `{hint[0]}`?)" if hint else "")
                         + f"; known fields here: {', '.join(known)}")
        if lines:
            return "; ".join(lines)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        field = _path(list(error.absolute_path) + [missing])
        return f"missing required field `{field}`"
    return f"field `{where}`: {error.message}"


def validate(config: Any) -> None:
    """Raise :class:`ConfigError` listing every problem of ``config`` (a parsed mapping)."""
    import jsonschema
    if not isinstance(config, dict):
        raise ConfigError(f"an experiment config must be a mapping of fields, got "
                          f"{type(config).__name__}")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)),
                                                                   e.message))
    problems = [_describe(e) for e in errors]
    sweep = (config.get("steering") or {}).get("sweep") if isinstance(config.get("steering"), dict) else None
    if isinstance(sweep, dict) and sweep.get("op") == "add" and "vector" not in sweep:
        problems.append("missing required field `steering.sweep.vector` (a sweep of op `add` "
                        "needs the contrastive prompts of its vector)")
    problems = list(dict.fromkeys(problems))
    if problems:
        name = config.get("name") if isinstance(config.get("name"), str) else "experiment"
        raise ConfigError(f"invalid config {name!r}: " + "; ".join(problems), problems)


def _with_defaults(config: dict) -> dict:
    out = copy.deepcopy(DEFAULTS)
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    if isinstance(out["models"], str):
        out["models"] = [out["models"]]
    if out["breakpoints"] is not None:
        out["breakpoints"].setdefault("phase", "decode")
    if out["steering"] is not None:
        st = out["steering"]
        st.setdefault("ops", [])
        st.setdefault("score_top_k", 5)
        if st.get("sweep") is not None:
            st["sweep"].setdefault("op", "scale")
        for op in st["ops"]:
            if op["op"] == "add":
                op["vector"].setdefault("reduce", "last")
        if st.get("sweep") and st["sweep"].get("vector"):
            st["sweep"]["vector"].setdefault("reduce", "last")
    if out["checkpoints"] is not None:
        out["checkpoints"].setdefault("overlap_steps", 2)
        out["checkpoints"].setdefault("restore", True)
    order = list(schema()["properties"])        # the schema's order: name, description, models...
    return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}


def load_config(source: Union[str, Path, dict]) -> dict:
    """A validated config with defaults filled in, from a YAML path, YAML text or a dict."""
    if isinstance(source, dict):
        # a config loaded before (defaults filled in) is accepted again: drop its bookkeeping
        raw = {k: copy.deepcopy(v) for k, v in source.items() if not str(k).startswith("_")}
        origin = source.get("_source")
    else:
        import yaml
        text = None
        path = Path(source).expanduser() if not (isinstance(source, str) and "\n" in source) else None
        if path is not None:
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} not found")
            text = path.read_text()
            origin = str(path)
        else:
            text, origin = source, None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {origin or '(text)'} is not valid YAML: {exc}") from None
    validate(raw)
    config = _with_defaults(raw)
    config["_source"] = origin
    return config


def config_hash(config: dict) -> str:
    """sha256 of the config's canonical JSON (without bookkeeping keys starting with ``_``)."""
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()


def clip_layer(layer: int, layers: int) -> int:
    """A requested 0-based layer mapped onto a model with ``layers`` blocks (the last one at most)."""
    return min(int(layer), layers - 1)


def clip_layers(requested: list, layers: int) -> list:
    """Requested layers clipped to the model, duplicates dropped, order kept."""
    return list(dict.fromkeys(clip_layer(l, layers) for l in requested))
