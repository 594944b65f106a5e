"""The floor of a remote pause/resume cycle, without djinn_nb: a plain Python process that
holds the same model and a KV cache, and for every 1-byte request over a raw TCP socket runs
one greedy decode step (forward, argmax, one host sync) and answers with the 8-byte float of
that step's compute in ms. ``wall - compute`` on the client is then what any remote design on
this host pays for a cycle: two socket hops, wake-ups, and the Python around them right after
a forward pass. Started by bench/decode_bench.py:

    python bench/raw_step_server.py --model smollm2-135m --device cpu --dtype float32
"""
from __future__ import annotations

import argparse
import socket
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    from transformers import DynamicCache
    from kernel_server.model.registry import load_model
    loaded = load_model(args.model, args.device, args.dtype, progress=False)
    model, dev = loaded.model, loaded.device
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ids = loaded.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        cache, length, tok = None, 0, None
        while conn.recv(1):
            if cache is None or length >= len(ids) + 512:     # a fresh prompt now and then
                cache = DynamicCache(config=model.config)
                inp = torch.tensor([ids], device=dev)
                length = len(ids)
            else:
                inp = tok.view(1, 1)
                length += 1
            t0 = time.perf_counter()
            out = model(input_ids=inp, attention_mask=torch.ones((1, length), dtype=torch.long,
                                                                 device=dev),
                        use_cache=True, logits_to_keep=1, **{loaded.cache_kwarg: cache})
            tok = out.logits[:, -1].argmax(-1)
            int(tok)
            conn.sendall(struct.pack("!d", (time.perf_counter() - t0) * 1e3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
