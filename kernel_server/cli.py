"""Command line of the kernel server (also the ``djinn-server`` console script)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from djinn_protocol.handshake import READY_PREFIX  # the line dj.connect() waits for
from kernel_server.model.loading import DEFAULT_MODEL, REGISTRY
from kernel_server.model.validation import Limits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernel_server",
                                description="djinn_nb kernel server: owns models, KV caches, sessions.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model loaded at start and used by default: {', '.join(REGISTRY)}, "
                        "a Hugging Face id, a local directory or a .gguf file (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default %(default)s); any other than loopback needs a token")
    p.add_argument("--token-file", default=None,
                   help="file holding the shared secret clients must prove (else $DJINN_TOKEN)")
    p.add_argument("--port", type=int, default=18861, help="port; 0 picks a free one (default %(default)s)")
    p.add_argument("--certfile", default=None,
                   help="PEM certificate (chain): serve TLS, on the rpyc connection and every bulk "
                        "transfer; clients pass dj.connect(..., tls=True or tls='ca.pem')")
    p.add_argument("--keyfile", default=None,
                   help="PEM private key of --certfile (if not inside the certificate file)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (float32), float32, float16, bfloat16")
    p.add_argument("--device-map", default=None,
                   help="spread the model's layers over devices with accelerate: auto, balanced, "
                        "balanced_low_0, sequential, a JSON dict or .json file of module -> device, "
                        "or one device (then --device stays auto)")
    p.add_argument("--max-memory", default=None,
                   help="with --device-map auto/balanced/sequential: memory per device, "
                        "e.g. 0=70GiB,1=70GiB,cpu=100GiB")
    p.add_argument("--no-load-on-request", action="store_true",
                   help="serve only --model; refuse sessions that name another model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fast-decode", choices=("auto", "off"),
                   default=os.environ.get("DJINN_FAST_DECODE", "auto"),
                   help="decode steps with no breakpoint as CUDA-graph replays on a static KV "
                        "cache, steering rules inside the graph: auto (on CUDA; CPU decodes "
                        "eagerly) or off (every step eager on a DynamicCache); default %(default)s")
    d = Limits()
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--max-sessions-per-client", type=int, default=d.max_sessions_per_client)
    p.add_argument("--checkpoint-budget-mb", type=float, default=d.checkpoint_budget_mb,
                   help="host memory for checkpoints; going over it is an error (default %(default)s)")
    p.add_argument("--pinned-pool-mb", type=float, default=d.pinned_pool_mb,
                   help="on CUDA, pinned host memory allocated at start for checkpoints, so that "
                        "checkpoint() never waits for an allocation (default %(default)s)")
    p.add_argument("--pause-timeout", type=float, default=d.pause_timeout_s,
                   help="seconds a generation may stay paused before it is stopped and its "
                        "memory released; the client is told why (default %(default)s)")
    p.add_argument("--max-request-mb", type=float, default=d.max_request_mb,
                   help="largest rpyc request (all arguments of one call); a bigger one is refused "
                        "by the client, and a client that sends one anyway is disconnected "
                        "(default %(default)s)")
    p.add_argument("--reconnect-grace-s", type=float, default=d.reconnect_grace_s,
                   help="seconds a disconnected client's sessions (paused ones too) and checkpoints "
                        "are kept for it to re-attach (client.reconnect() / client.attach(id)); "
                        "0 releases them at once (default %(default)s)")
    p.add_argument("--max-models", type=int, default=d.max_models,
                   help="models loaded at once, --model included; loading one more is refused "
                        "(default %(default)s)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kernel_server.rpyc").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from kernel_server.runtime import fast_decode
    fast_decode.set_mode(args.fast_decode)
    from djinn_protocol.errors import DjinnError
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_sessions_per_client=args.max_sessions_per_client,
                    checkpoint_budget_mb=args.checkpoint_budget_mb,
                    pinned_pool_mb=args.pinned_pool_mb, pause_timeout_s=args.pause_timeout,
                    max_request_mb=args.max_request_mb, reconnect_grace_s=args.reconnect_grace_s,
                    max_models=args.max_models)
    try:
        if args.max_request_mb <= 0 or args.reconnect_grace_s < 0 or args.max_models < 1:
            raise DjinnError("--max-request-mb must be > 0, --reconnect-grace-s >= 0 and "
                             "--max-models >= 1")
        kernel = Kernel(args.model, args.device, args.dtype, limits,
                        allow_load=not args.no_load_on_request,
                        device_map=args.device_map, max_memory=args.max_memory)
        kernel.checkpoints.prepare(kernel.models.get().devices)  # load and allocate before "ready"
        token = None
        if args.token_file:
            token = Path(args.token_file).read_text().strip() or None
        token = token or os.environ.get("DJINN_TOKEN") or None
        server = KernelServer(kernel, args.host, args.port, token=token,
                              certfile=args.certfile, keyfile=args.keyfile)
    except (DjinnError, OSError) as exc:
        print(f"kernel_server: {exc}", file=sys.stderr)
        return 2
    info = kernel.models.get().info()
    print(f"{READY_PREFIX} {server.address} model={info['model']} device={info['device']}", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)      # SIGTERM: the same clean stop as Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        kernel.owners.close()                    # no sessions kept for re-attachment now
        released = kernel.sessions.close_all()   # paused forwards are aborted, memory freed
        server.close()                           # clients see ConnectionLostError
        logging.getLogger("kernel_server").info("stopped; released %d sessions", released)
    return 0
