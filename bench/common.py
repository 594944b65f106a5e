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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    return path


# ---- shared by decode / sweep / peer benchmarks ------------------------------------------
def command_line() -> str:
    """The command that produced a result, as it can be re-run from the repository root."""
    import sys
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parent.parent)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def start_server(model: str, device: str, dtype: str | None = None):
    """A kernel server on a loopback port in this process (as the tests run it); returns
    ``(server, loaded model)``. The client connects with ``djinn_nb.connect(server.address)``."""
    from kernel_server.server import Kernel, KernelServer
    kernel = Kernel(model, device=device, dtype=dtype)
    loaded = kernel.models.get()
    return KernelServer(kernel, "127.0.0.1", 0).start(), loaded


def connect(address: str, control: bool = True):
    """A client; ``control=False``: every call over rpyc (the path before the control channel)."""
    import os
    import djinn_nb as dj
    old = os.environ.get("DJINN_CONTROL")
    os.environ["DJINN_CONTROL"] = "1" if control else "0"
    try:
        return dj.connect(address)
    finally:
        if old is None:
            del os.environ["DJINN_CONTROL"]
        else:
            os.environ["DJINN_CONTROL"] = old


def raw_loopback(nbytes: int, reps: int) -> dict:
    """The baseline transport: a raw TCP socket on loopback, served by a thread of this
    process (as the control channel is), TCP_NODELAY on both ends. Median round trip of a
    1-byte ping-pong, and median GB/s of ``nbytes`` received into a preallocated buffer."""
    import socket
    import threading
    srv = socket.create_server(("127.0.0.1", 0))
    payload = b"x" * nbytes

    def serve():
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while (what := conn.recv(1)):
                conn.sendall(what if what == b"p" else payload)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    c = socket.create_connection(srv.getsockname())
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts, rates = [], []
    for _ in range(50):                   # warm-up
        c.sendall(b"p")
        c.recv(1)
    for _ in range(reps * 20):
        t0 = time.perf_counter()
        c.sendall(b"p")
        c.recv(1)
        rtts.append((time.perf_counter() - t0) * 1e3)
    buf = bytearray(nbytes)
    view = memoryview(buf)
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        c.sendall(b"b")
        got = 0
        while got < nbytes:
            got += c.recv_into(view[got:])
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    c.close()
    thread.join(timeout=10)
    srv.close()
    return {"rtt_ms": statistics.median(rtts), "gb_s": statistics.median(rates[1:]),
            "rtt_samples": len(rtts)}


def paired_ratio(numerators: list, denominators: list) -> dict:
    """Ratios of measurements taken side by side (rep i of one against rep i of the other):
    median, and the spread (min, max) that the table shows next to it."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "all": ratios}


def save_plot(fig, name: str, out_dir: Path = RESULTS) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def smoke_dir() -> Path:
    """Where a --smoke run writes (never over the committed results)."""
    import tempfile
    return Path(tempfile.mkdtemp(prefix="djinn-bench-smoke-"))


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
