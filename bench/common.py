"""Shared pieces of the benchmarks: random-init models of real shapes, timing, JSON output."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# random-init shapes: GPU timing does not depend on weight values
SHAPES = {
    "tiny-llama": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2),
    "smollm2-shape": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                          num_attention_heads=9, num_key_value_heads=3),
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                     num_attention_heads=32, num_key_value_heads=8),
}


def random_llama(shape: str, device: str, dtype: str, max_positions: int = 8192):
    """A LoadedModel around a seeded random-init Llama of a named shape."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from kernel_server.models import DTYPES, LoadedModel, find_layers, tiny_tokenizer
    import inspect
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=max_positions, **SHAPES[shape])
    model = LlamaForCausalLM(config).to(device=device, dtype=DTYPES[dtype]).eval()
    model.requires_grad_(False)
    params = inspect.signature(model.forward).parameters
    return LoadedModel(name=f"random-{shape}", model=model, tokenizer=tok, layers=find_layers(model),
                       device=torch.device(device), dtype=DTYPES[dtype],
                       cache_kwarg="cache" if "cache" in params else "past_key_values")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, reps: int, device) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` in ms (synchronised on CUDA), and all samples."""
    samples = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), samples


def environment(device) -> dict:
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": str(device),
           "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_result(name: str, result: dict, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    return path
