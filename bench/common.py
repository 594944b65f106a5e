"""Shared pieces of the benchmarks: random-init models of real shapes, timing, JSON output."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# random-init shapes: GPU timing does not depend on weight values (the server's random:<shape>
# models, plus SmolLM2's shape for the CPU checkpoint numbers)
from kernel_server.model.loading import RANDOM_SHAPES  # noqa: E402

SHAPES = {**RANDOM_SHAPES,
          "smollm2-shape": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                num_attention_heads=9, num_key_value_heads=3)}


def random_llama(shape: str, device: str, dtype: str, max_positions: int = 8192):
    """A LoadedModel around a seeded random-init Llama of a named shape."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from kernel_server.model.loading import DTYPES
    from kernel_server.model.registry import LoadedModel, find_layers
    from kernel_server.model.loading import tiny_tokenizer
    import inspect
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=max_positions, **SHAPES[shape])
    with torch.device(device):        # built on its device: a 7B model initialises in seconds
        model = LlamaForCausalLM(config).to(dtype=DTYPES[dtype]).eval()
    model.requires_grad_(False)
    params = inspect.signature(model.forward).parameters
    from kernel_server.model import exact_attention
    exact_attention.install()         # as the server's load_model does
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
    import datetime
    result.setdefault("date", datetime.date.today().isoformat())     # (the README tables show it)
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


class ServerProcess:
    """A kernel server in its own process (``python -m kernel_server`` on a free loopback
    port, as ``dj.connect()`` launches it): client and server do not share an interpreter,
    as a notebook and its server do not."""

    def __init__(self, model: str, device: str, dtype: str | None = None):
        from djinn_nb.launcher import LocalServer
        self._server = LocalServer(model=model, device=device, dtype=dtype, progress=False)
        self.address = self._server.address

    def close(self) -> None:
        self._server.stop()


def start_server(model: str, device: str, dtype: str | None = None) -> ServerProcess:
    return ServerProcess(model, device, dtype)


def load_local(model: str, device: str, dtype: str):
    """The same model in this process (same weights: a file, or the same seed), for the
    in-process baselines."""
    from kernel_server.model.registry import load_model
    return load_model(model, device, dtype, progress=False)


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


_ECHO = r"""
import socket, sys
payload = b"x" * int(sys.argv[1])
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (what := conn.recv(1)):
    conn.sendall(what if what == b"p" else payload)
"""


class RawEcho:
    """The baseline transport: a raw TCP socket on loopback to a plain Python echo server in
    another process (as the kernel server is), TCP_NODELAY on both ends. ``rtts(n)``: round
    trips of a 1-byte ping-pong in ms; ``rate()``: GB/s of ``nbytes`` received into a
    preallocated buffer. Kept open for a whole run, so it can be sampled between the
    measurements it is the baseline of."""

    def __init__(self, nbytes: int = 1):
        import socket
        import subprocess
        import sys
        self.nbytes = nbytes
        self.proc = subprocess.Popen([sys.executable, "-c", _ECHO, str(nbytes)],
                                     stdout=subprocess.PIPE, text=True)
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = memoryview(bytearray(nbytes))
        self.rtts(50)                          # warm-up

    def rtts(self, n: int) -> list:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.sock.sendall(b"p")
            self.sock.recv(1)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def rate(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(b"b")
        got = 0
        while got < self.nbytes:
            got += self.sock.recv_into(self.buf[got:])
        return self.nbytes / (time.perf_counter() - t0) / 1e9

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=30)


def raw_loopback(nbytes: int, reps: int) -> dict:
    """Median round trip (ms) and median GB/s of ``nbytes`` over a fresh ``RawEcho``."""
    echo = RawEcho(nbytes)
    try:
        rtts = echo.rtts(max(reps, 5) * 100)
        echo.rate()
        rates = [echo.rate() for _ in range(reps)]
    finally:
        echo.close()
    return {"rtt_ms": statistics.median(rtts), "gb_s": statistics.median(rates),
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


def finish(args, result: dict, kind: str, plot) -> int:
    """A benchmark's end: its scalar results on stdout, then ``<kind>_<device>.json`` (or
    ``--name``) and its PNG ``plot(result, name, out_dir)``; a ``--smoke`` run writes to a
    temporary directory, never over the committed results."""
    import torch
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
           if not isinstance(v, (dict, list))})
    name = args.name or f"{kind}_{torch.device(args.device).type}"
    out_dir = smoke_dir() if args.smoke else Path(args.out)
    print("wrote", write_result(name, result, out_dir), plot(result, name, out_dir))
    return 0


def smoke_dir() -> Path:
    """Where a --smoke run writes (never over the committed results)."""
    import tempfile
    return Path(tempfile.mkdtemp(prefix="djinn-bench-smoke-"))


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
