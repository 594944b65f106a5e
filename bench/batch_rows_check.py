"""Batch-call rows on the engine against their solo runs, and row checkpoints, on one model.

Checks (no timing): with the decode engine on, every row of ``s.generate([8 prompts])`` gets
the tokens and logits of its prompt's solo run bit for bit; a batch interrupted after K tokens
and continued from ``s.checkpoint(row="all")`` (each row forked) gives the uninterrupted rows'
tokens and logits bit for bit. Meant for the GPU (a random-init 7B shape in bfloat16):

    python bench/batch_rows_check.py --model random:llama-7b --device cuda --dtype bfloat16

Prints one JSON line; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

PROMPTS = ["The capital of France is", "Once upon a time there was", "def fibonacci(n):",
           "In 1905 Albert Einstein", "The recipe calls for two cups of", "Q: What is 7 * 8?\nA:",
           "Photosynthesis converts", "The stock market today"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-gpt2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--cut", type=int, default=8, help="interrupt after this many tokens")
    args = p.parse_args(argv)
    import djinn_nb as dj
    from kernel_server.kernel import Kernel
    from kernel_server.runtime import scheduler, throughput
    from kernel_server.transport.server import KernelServer
    kernel = Kernel(args.model, device=args.device, dtype=args.dtype)
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    scheduler.set_mode("on")
    out = {"model": args.model, "device": args.device, "dtype": args.dtype, "rows": len(PROMPTS),
           "tokens": args.tokens, "cut": args.cut}
    try:
        with dj.connect(srv.address) as c:
            s = c.session(model=args.model)
            s.steer(1, scale=0.9)
            batch = s.generate(PROMPTS, args.tokens, stop_at_eos=False, return_logits=True).results
            solo_equal = []
            for b, prompt in enumerate(PROMPTS):
                t = c.session(model=args.model)
                t.steer(1, scale=0.9)
                r = t.generate(prompt, args.tokens, stop_at_eos=False, return_logits=True).result
                solo_equal.append(bool(r.tokens == batch[b].tokens
                                       and np.array_equal(r.logits, batch[b].logits)))
                t.close()
            out["rows_equal_solo_bitwise"] = solo_equal
            # interrupt the same batch after `cut` tokens per row (an event: the token counter)
            server_session = next(x for x in kernel.sessions.all() if x.id == s.id)
            real, counted = throughput.count, [0]

            def count(model, n=1):
                real(model, n)
                counted[0] += n
                if counted[0] == args.cut * len(PROMPTS):
                    server_session.interrupt()
            throughput.count = count
            try:
                cut = s.generate(PROMPTS, args.tokens, stop_at_eos=False, return_logits=True)
            finally:
                throughput.count = real
            out["interrupted_after"] = [len(r.tokens) for r in cut.results]
            cont_equal = []
            for b, ck in enumerate(s.checkpoint(row="all")):
                f = s.fork(ck)
                got = f.resume().result
                cont_equal.append(bool(got.tokens == batch[b].tokens
                                       and np.array_equal(got.logits, batch[b].logits)))
                f.close()
            out["row_checkpoint_continuations_equal_bitwise"] = cont_equal
    finally:
        srv.close()
    ok = all(out["rows_equal_solo_bitwise"]) and all(out["row_checkpoint_continuations_equal_bitwise"])
    out["ok"] = ok
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
