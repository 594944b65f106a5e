"""``python -m kernel_server.cluster up|down|status CONFIG.yaml``.

``up`` stays in the foreground (it holds the replicas or their Ray actors) and writes a state
file beside the config (``.<config>.cluster.json``: its pid and the directory's address);
``down`` asks it to drain and stop (SIGTERM); ``status`` asks the directory and prints its
replicas (health, sessions, tokens/s, engine rows, memory) and models as tables (``--json``:
the whole record).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from djinn_protocol.errors import DjinnError


def state_path(config: str) -> Path:
    p = Path(config).expanduser().resolve()
    return p.with_name(f".{p.name}.cluster.json")


def _up(args) -> int:
    from .deploy import Cluster
    cluster = Cluster.up(args.config, log_dir=args.log_dir, backend=args.backend)
    state = state_path(args.config)
    state.write_text(json.dumps({"pid": os.getpid(), "address": cluster.address}))
    print(f"DJINN_CLUSTER_READY {cluster.address}", flush=True)
    print(json.dumps(cluster.status()["models"]), flush=True)
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            signal.pause()
    finally:
        report = cluster.down(drain=not args.no_drain)
        print(json.dumps({"drained": report}), flush=True)
        state.unlink(missing_ok=True)
    return 0


def _down(args) -> int:
    state = state_path(args.config)
    if not state.exists():
        print(f"no cluster of {args.config} is up here ({state} is missing)", file=sys.stderr)
        return 1
    pid = json.loads(state.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state.unlink(missing_ok=True)
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.2)
    print(f"the cluster's up process {pid} did not stop in {args.timeout} s", file=sys.stderr)
    return 1


def _status(args) -> int:
    from . import config as config_mod
    from .peer import Peer, tls_context
    cfg = config_mod.load(args.config)
    state = state_path(args.config)
    if not state.exists():
        print(f"no cluster of {args.config} is up here ({state} is missing)", file=sys.stderr)
        return 1
    peer = Peer(json.loads(state.read_text())["address"], cfg.token(), tls_context(cfg.certfile))
    try:
        status = peer.call("cluster_status")
    finally:
        peer.close()
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


def format_status(status: dict) -> str:
    """``cluster_status`` as two tables: replicas (health, sessions by state, tokens/s over
    the last 10 s, engine rows active/paused where the engine is on, device memory), models."""
    rows = [("replica", "address", "healthy", "sessions", "tokens/s", "engine rows", "memory MiB",
             "restarts")]
    for r in status["replicas"]:
        load = r.get("load") or {}
        states = load.get("sessions") or {}
        engines = [m["engine"] for m in ((load.get("throughput") or {}).get("models") or {}).values()
                   if m.get("engine")]
        mem = sum(d.get("allocated_bytes") or 0 for d in load.get("memory") or [])
        rows.append((r["id"], r["address"],
                     "draining" if r.get("draining") else {True: "yes", False: "NO"}.get(r["healthy"], "?"),
                     " ".join(f"{k} {v}" for k, v in sorted(states.items())) or "0",
                     f"{load['tokens_per_s']:.1f}" if "tokens_per_s" in load else "-",
                     " ".join(f"{e['active']} active {e['paused']} paused" for e in engines) or "-",
                     f"{mem / 2**20:.0f}" if load else "-", str(r.get("restarts", 0))))
    models = [("model", "loads", "replicas", "healthy", "sessions", "tokens/s")]
    for name, m in status["models"].items():
        models.append((name, m["model"], str(m["replicas"]), str(m["healthy"]),
                       str(m.get("sessions", "-")), f"{m.get('tokens_per_s', 0.0):.1f}"))
    return _table(rows) + "\n\n" + _table(models)


def _table(rows) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernel_server.cluster",
                                description="kernel servers on a Ray cluster (or local processes)")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the directory and every replica; stay in the foreground")
    up.add_argument("config")
    up.add_argument("--backend", choices=("ray", "process"), default=None,
                    help="override the config's backend")
    up.add_argument("--log-dir", default=None, help="one log file per replica here")
    up.add_argument("--no-drain", action="store_true", help="on stop, do not drain")
    down = sub.add_parser("down", help="drain and stop the cluster started by `up CONFIG`")
    down.add_argument("config")
    down.add_argument("--timeout", type=float, default=600.0)
    st = sub.add_parser("status", help="replicas, models, health and load, from the directory")
    st.add_argument("config")
    st.add_argument("--json", action="store_true", help="the directory's whole record, as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return {"up": _up, "down": _down, "status": _status}[args.command](args)
    except (DjinnError, OSError) as exc:
        print(f"kernel_server.cluster: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
