"""Start a kernel server as a subprocess on a free loopback port (``dj.connect()``).

A launched server lives exactly as long as this process wants it: it is stopped when the
last client using it closes or when the interpreter exits, and, should this process die
without saying so (SIGKILL, a crashed or out-of-memory kernel), it stops itself
(``--exit-with-parent``: the parent-death signal on Linux, a watch of its stdin pipe and
parent pid everywhere; see ``kernel_server.cli``). Its log goes to ``log_dir()``: kept
while it runs and after a failed start (the error names it), deleted after a clean stop.
"""
from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from djinn_protocol.errors import ConnectionLostError
from djinn_protocol.handshake import wait_ready_line

#: server logs kept at most (the oldest are deleted when a server starts)
KEEP_LOGS = 20
#: (pattern in the server's log, the startup phase it starts), checked in order
PHASES = ((re.compile(r"de-?quantiz", re.I), "de-quantizing the GGUF weights"),
          (re.compile(r"Loading weights|Loading checkpoint", re.I), "loading the weights"),
          (re.compile(r" loaded \S+: \d+ layers"), "warming up (allocating buffers)"))


def log_dir() -> Path:
    """Where launched servers write their logs: ``$DJINN_LOG_DIR``, else
    ``$XDG_CACHE_HOME/djinn_nb/logs`` (``~/.cache/djinn_nb/logs``)."""
    if os.environ.get("DJINN_LOG_DIR"):
        return Path(os.environ["DJINN_LOG_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "djinn_nb" / "logs"


def _prune_logs(directory: Path, keep: int) -> None:
    logs = sorted(directory.glob("server-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:max(0, len(logs) - keep)]:
        try:
            old.unlink()
        except OSError:
            pass


def _in_jupyter() -> bool:
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", None)
    ip = shell() if shell else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class LocalServer:
    """A kernel server subprocess owned by this process. ``acquire()`` / ``release()`` count
    the clients using it (``dj.connect()`` shares one per model); the last release stops it."""

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 extra_args: list[str] | None = None, timeout: float = 600.0, progress: bool = True):
        cmd = [sys.executable, "-m", "kernel_server", "--host", "127.0.0.1", "--port", "0",
               "--exit-with-parent", str(os.getpid())]
        if threading.current_thread() is not threading.main_thread():
            # the parent-death signal follows the launching *thread*: not from a worker thread
            cmd.append("--no-parent-death-signal")
        if model:
            cmd += ["--model", model]
        if device:
            cmd += ["--device", device]
        if dtype:
            cmd += ["--dtype", dtype]
        cmd += list(extra_args or [])
        self.model = model
        self._users = 0
        self._lock = threading.Lock()
        directory = log_dir()
        directory.mkdir(parents=True, exist_ok=True)
        _prune_logs(directory, KEEP_LOGS - 1)
        self.log_path = directory / f"server-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{id(self):x}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
                   PYTHONUNBUFFERED="1")
        # stdin: a pipe whose write end only this process holds; its EOF tells the server
        # that we are gone (--exit-with-parent)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        atexit.register(self.stop)
        self.address = self._wait_ready(timeout, progress, model or "the default model")

    # ---- startup ---------------------------------------------------------------------------
    def _phase(self, current: str) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return current
        for pattern, phase in reversed(PHASES):
            if pattern.search(text):
                return phase
        return current

    def _wait_ready(self, timeout: float, progress: bool, what: str) -> str:
        live = progress and (sys.stderr.isatty() or _in_jupyter())
        if progress and not live:      # a log or a pipe: one line, no carriage returns
            print(f"djinn_nb: starting a kernel server ({what}), log {self.log_path}",
                  file=sys.stderr, flush=True)
        t0 = time.monotonic()
        bar = None
        if live:
            from tqdm.auto import tqdm
            bar = tqdm(desc=f"kernel server ({what}): starting Python",
                       bar_format="{desc} {elapsed}", leave=False)

        def show_phase():
            if bar is None:
                return
            if time.monotonic() - t0 > 1.0:
                phase = self._phase("importing torch and transformers")
                bar.set_description_str(f"kernel server ({what}): {phase}", refresh=False)
            bar.update(0)
            bar.refresh()
        try:
            address = wait_ready_line(self.proc.stdout, timeout, show_phase, poll_s=0.25)
        finally:
            if bar is not None:
                bar.close()
        if address is not None:
            return address
        self.stop(keep_log=True)
        raise ConnectionLostError(f"the local kernel server did not start (log {self.log_path}):\n"
                                  + self.log_tail())

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    # ---- users and lifetime ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def acquire(self) -> "LocalServer":
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        """One client less; the last one stops the server."""
        with self._lock:
            self._users = max(0, self._users - 1)
            last = self._users == 0
        if last:
            self.stop()

    def stop(self, keep_log: bool = False) -> None:
        """Stop the server (SIGTERM: it releases its sessions; SIGKILL after 10 s). Its log
        is deleted after a clean stop, kept after a failure or with ``keep_log``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        if not self.log.closed:
            self.log.close()
            if not keep_log and self.proc.returncode in (0, -15):
                try:
                    self.log_path.unlink()
                except OSError:
                    pass
        _forget(self)


# ---- one launched server per model in this process (dj.connect() with no address) -------
_servers: dict = {}
_servers_lock = threading.RLock()   # (held through a launch: one launch per model at a time)


def _forget(server: LocalServer) -> None:
    with _servers_lock:
        for key, s in list(_servers.items()):
            if s is server:
                del _servers[key]


def shared_server(model: str | None, device: str | None, dtype: str | None,
                  progress: bool = True) -> LocalServer:
    """The server this process launched for (model, device, dtype) if it still runs, else a
    new one; counted as one more user (``release()`` when done)."""
    key = (model, device, dtype)
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and server.running:
            return server.acquire()
    server = LocalServer(model=model, device=device, dtype=dtype, progress=progress)
    with _servers_lock:
        _servers[key] = server
    return server.acquire()
