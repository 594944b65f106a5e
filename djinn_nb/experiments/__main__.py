"""``python -m djinn_nb.experiments run CONFIG.yaml --out DIR`` / ``report DIR`` / ``validate CONFIG``."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m djinn_nb.experiments",
        description="Run a djinn_nb study from a YAML config and keep a run record.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a config against a kernel server, write a record")
    p_run.add_argument("config", help="the YAML config file")
    p_run.add_argument("--out", required=True, help="directory for record.json, figures, summary")
    p_run.add_argument("--server", default=None,
                       help="host:port of a kernel server (default: $DJINN_SERVER, else launch a "
                            "local one on the config's first model)")
    p_run.add_argument("--token", default=None,
                       help="the server's shared secret (default: $DJINN_TOKEN)")
    p_run.add_argument("--token-file", default=None, help="read the token from this file")
    p_run.add_argument("--device", default=None,
                       help="device of a launched local server (auto|cpu|cuda[:N]); ignored with --server")
    p_run.add_argument("--dtype", default=None,
                       help="dtype of a launched local server (auto|float32|float16|bfloat16)")
    p_run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_report = sub.add_parser("report", help="re-render figures and summary from DIR/record.json")
    p_report.add_argument("directory")
    p_report.add_argument("--no-figures", action="store_true")
    p_val = sub.add_parser("validate", help="check a config against the schema, run nothing")
    p_val.add_argument("config")
    args = parser.parse_args(argv)

    from djinn_protocol.errors import DjinnError
    from . import load_config, report, run
    try:
        if args.command == "validate":
            cfg = load_config(args.config)
            print(f"{args.config}: valid ({cfg['name']}: models {', '.join(cfg['models'])})")
            return 0
        if args.command == "report":
            rec = report(args.directory, figures=not args.no_figures)
            print(f"re-rendered {rec.directory}: summary.md, summary.html"
                  + (f", {len(rec.figures)} figures" if rec.figures else ""))
            return 0
        token = args.token
        if args.token_file:
            with open(args.token_file) as f:
                token = f.read().strip()
        if token is None:
            token = os.environ.get("DJINN_TOKEN") or None
        if args.server is None and (args.device or args.dtype) and os.environ.get("DJINN_SERVER"):
            print("note: --device/--dtype given, so a local server is launched instead of "
                  "$DJINN_SERVER", file=sys.stderr)
        rec = run(args.config, out=args.out, server=args.server, token=token, device=args.device,
                  dtype=args.dtype, progress=not args.no_progress)
        from .record import markdown_table
        print(markdown_table(rec.headline()))
        print(f"\nrecord: {rec.path}")
        return 0
    except DjinnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
