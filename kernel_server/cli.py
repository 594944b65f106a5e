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
    p.add_argument("--tenants", choices=("off", "on"),
                   default=os.environ.get("DJINN_TENANTS", "off"),
                   help="on: the decode steps of every running session of a model join one "
                        "batched step of a fixed shape (each session bit-identical to its solo "
                        "run, as tested; slower alone: see README 'Sharing one GPU'); default "
                        "%(default)s")
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
    for name, kind, what in _CAPS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"{what} (default %(default)s)")
    p.add_argument("--operator-stats", action="store_true",
                   help="hello() also tells every client server-wide figures (all sessions, "
                        "loaded models, checkpoint bytes); off: a client sees only its own")
    p.add_argument("--plugin", action="append", default=[], metavar="[NAME=]MODULE:FUNCTION",
                   help="a trusted intervention function clients may call by name inside an "
                        "expression (dj.ops.plugin(NAME, h, ...)); repeatable. Clients never "
                        "upload code: only what the operator loads here runs")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                   help="stop cleanly (sessions released) when process PID ends: dj.connect() "
                        "passes its own pid and holds this server's stdin pipe. Watched by the "
                        "parent-death signal on Linux, stdin reaching EOF and the parent pid")
    p.add_argument("--no-parent-death-signal", action="store_true",
                   help="with --exit-with-parent: no Linux parent-death signal (it follows the "
                        "launching thread, not the process: for a launch from a worker thread)")
    return p.parse_args(argv)


#: the caps that keep one client (or a stranger) from holding what the server has: Limits
#: fields, each an option of the same name
_CAPS = (
    ("max_breakpoints", int, "breakpoints per session"),
    ("max_rules", int, "steering rules per session"),
    ("max_steps_listed", int, "steps listed over one session's breakpoints and rules"),
    ("max_logits_mb", float, "logit rows one return_logits run may keep, in MiB"),
    ("max_offers_per_client", int, "bulk downloads waiting to be fetched, per client"),
    ("max_sessions_per_peer", int, "sessions of all connections from one host (and token)"),
    ("max_offers_per_peer", int, "bulk downloads waiting, over all connections from one host"),
    ("max_connections", int, "client connections at once; more are closed at accept"),
    ("max_unauthenticated", int, "connections waiting to authenticate at once; one more "
                                 "pushes the oldest out"),
    ("handshake_timeout_s", float, "seconds for the whole opening of a connection (TLS, token)"),
)


def watch_parent(pid: int, death_signal: bool = True) -> None:
    """Send ourselves SIGTERM (the clean stop below) once process ``pid``, our parent, is
    gone: at once through PR_SET_PDEATHSIG on Linux, else when stdin (a pipe only the
    parent writes to) reaches EOF or our parent pid changes (checked every 0.5 s)."""
    import threading
    import time

    fired = threading.Event()

    def gone():
        if not fired.is_set():
            fired.set()
            os.kill(os.getpid(), signal.SIGTERM)
    if death_signal and sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != pid:                 # it died before the signal was armed
        gone()

    def read_stdin():
        try:      # (the raw fd: a daemon thread in sys.stdin's buffer aborts the exit)
            while os.read(stdin_fd, 4096):
                pass
        except OSError:
            return                           # no readable stdin: the pid check remains
        gone()

    def poll_parent():
        while os.getppid() == pid:
            time.sleep(0.5)
        gone()
    try:
        stdin_fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):     # no stdin, or not a real file
        stdin_fd = -1
    if stdin_fd >= 0 and not os.isatty(stdin_fd):
        threading.Thread(target=read_stdin, name="parent-watch-stdin", daemon=True).start()
    threading.Thread(target=poll_parent, name="parent-watch-pid", daemon=True).start()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.exit_with_parent is not None:
        watch_parent(args.exit_with_parent, death_signal=not args.no_parent_death_signal)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kernel_server.rpyc").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the server never reaches the network, whatever the environment says: model ids resolve in
    # the local cache only (loading passes local_files_only too), and no hub call at all
    # leaves (huggingface_hub reads these once, at import: before transformers is imported)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from kernel_server.runtime import fast_decode
    fast_decode.set_mode(args.fast_decode)
    from kernel_server.runtime import scheduler
    scheduler.set_mode(args.tenants)
    from djinn_protocol.errors import DjinnError
    from kernel_server.model.expressions import register_plugin
    for spec in args.plugin:
        try:
            register_plugin(spec)
        except (ImportError, AttributeError, ValueError) as exc:
            print(f"kernel_server: --plugin {spec}: {exc}", file=sys.stderr)
            return 2
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_sessions_per_client=args.max_sessions_per_client,
                    checkpoint_budget_mb=args.checkpoint_budget_mb,
                    pinned_pool_mb=args.pinned_pool_mb, pause_timeout_s=args.pause_timeout,
                    max_request_mb=args.max_request_mb, reconnect_grace_s=args.reconnect_grace_s,
                    max_models=args.max_models,
                    **{name: getattr(args, name) for name, _, _ in _CAPS})
    try:
        if args.max_request_mb <= 0 or args.reconnect_grace_s < 0 or args.max_models < 1:
            raise DjinnError("--max-request-mb must be > 0, --reconnect-grace-s >= 0 and "
                             "--max-models >= 1")
        kernel = Kernel(args.model, args.device, args.dtype, limits,
                        allow_load=not args.no_load_on_request,
                        device_map=args.device_map, max_memory=args.max_memory)
        kernel.operator_stats = args.operator_stats
        # load and allocate before "ready": the pinned pool sized for a checkpoint of the
        # model's whole context (within the budget), so the first checkpoint is no slower
        kernel.checkpoints.prepare(kernel.models.get())
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
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # one clean stop, not cut by a second
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
