"""JupyterLab on notebooks/ wired to a local kernel server: the command behind ``make lab``.

    python -m djinn_nb.lab [--port 8888] [--model NAME] [--no-browser] [--ip 127.0.0.1] [--token T]

Starts a kernel server subprocess (``LocalServer``; default model smollm2-135m; it stops
itself if this process is killed), prints
``djinn_nb.lab: kernel server at HOST:PORT``, then runs JupyterLab with ``DJINN_SERVER`` set to
that address, so ``dj.connect()`` in a notebook reaches it. Ctrl-C or SIGTERM stops both.
Arguments it does not know go to JupyterLab as they are (e.g. ``--ServerApp.xxx=...``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .client import SERVER_ENV
from .launcher import LocalServer

ADDRESS_LINE = "djinn_nb.lab: kernel server at"   # followed by host:port; tests parse it
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# JupyterLab setting that turns off the "fetch news?" pop-up (and with it the update check)
NEWS_SETTING = ("@jupyterlab/apputils-extension/notification.jupyterlab-settings", {"fetchNews": "false"})


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m djinn_nb.lab", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("--port", type=int, default=8888, help="JupyterLab port (default %(default)s)")
    p.add_argument("--ip", default="127.0.0.1", help="JupyterLab bind address (default %(default)s)")
    p.add_argument("--model", default=None, help="kernel server model (default: the server's, smollm2-135m)")
    p.add_argument("--token", default=None, help="JupyterLab token (default: a random one, printed)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.add_argument("--root-dir", default=str(NOTEBOOKS if NOTEBOOKS.is_dir() else Path.cwd()),
                   help="directory JupyterLab shows (default %(default)s)")
    return p.parse_known_args(argv)


def user_settings_dir() -> Path:
    """A JupyterLab user-settings dir holding the no-news setting: in the environment, so
    settings changed in the lab persist (a temp dir where the environment is read-only)."""
    rel, value = NEWS_SETTING
    for make_root in (lambda: Path(sys.prefix) / "share" / "djinn_nb" / "lab-user-settings",
                      lambda: Path(tempfile.mkdtemp(prefix="djinn-lab-settings-"))):
        try:
            root = make_root()
            path = root / rel
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(value))
            return root
        except OSError:
            pass
    raise OSError("no writable directory for JupyterLab user settings")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args, lab_args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)   # SIGTERM cleans up like Ctrl-C
    server = lab = None
    try:
        print("djinn_nb.lab: starting the kernel server "
              f"({args.model or 'default model'}) ...", flush=True)
        server = LocalServer(model=args.model, progress=sys.stderr.isatty())
        print(f"{ADDRESS_LINE} {server.address} (log {server.log_path})", flush=True)
        cmd = [sys.executable, "-m", "jupyterlab",
               f"--ServerApp.root_dir={args.root_dir}", f"--ServerApp.ip={args.ip}",
               f"--ServerApp.port={args.port}", "--ServerApp.port_retries=0",
               f"--LabApp.user_settings_dir={user_settings_dir()}"]
        if args.no_browser:
            cmd.append("--no-browser")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")   # containers often run as root; JupyterLab refuses otherwise
        if args.token is not None:
            cmd.append(f"--IdentityProvider.token={args.token}")
        env = dict(os.environ, **{SERVER_ENV: server.address})
        # JupyterLab starts with SIGINT ignored (and no tty, so it keeps it that way): a Ctrl-C
        # reaches it as the SIGTERM sent below, its clean shutdown (kernels, runtime files)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            lab = subprocess.Popen(cmd + lab_args, env=env, stdin=subprocess.DEVNULL)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return lab.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C must not cut the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if lab is not None and lab.poll() is None:
            lab.send_signal(signal.SIGTERM)              # JupyterLab shuts its kernels down
            try:
                lab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                lab.kill()
                lab.wait()
        if server is not None:
            server.stop()
        print("djinn_nb.lab: stopped JupyterLab and the kernel server", flush=True)


if __name__ == "__main__":
    sys.exit(main())
