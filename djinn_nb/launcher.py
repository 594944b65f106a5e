"""Start a kernel server as a subprocess on a free loopback port (``dj.connect()``)."""
from __future__ import annotations

import atexit
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

from djinn_protocol.errors import ConnectionLostError
from djinn_protocol.handshake import READY_PREFIX



class LocalServer:
    """A kernel server subprocess owned by one client; stopped when the client closes."""

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 extra_args: list[str] | None = None, timeout: float = 600.0, progress: bool = True):
        cmd = [sys.executable, "-m", "kernel_server", "--host", "127.0.0.1", "--port", "0"]
        if model:
            cmd += ["--model", model]
        if device:
            cmd += ["--device", device]
        if dtype:
            cmd += ["--dtype", dtype]
        cmd += list(extra_args or [])
        self.log = tempfile.NamedTemporaryFile("w+", prefix="djinn-server-", suffix=".log", delete=False)
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        atexit.register(self.stop)
        self.address = self._wait_ready(timeout, progress, model or "the default model")

    def _wait_ready(self, timeout: float, progress: bool, what: str) -> str:
        lines: queue.Queue = queue.Queue()

        def read():
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)
        threading.Thread(target=read, daemon=True).start()
        from tqdm.auto import tqdm
        deadline = time.monotonic() + timeout
        with tqdm(desc=f"starting kernel server ({what})", bar_format="{desc}: {elapsed}",
                  disable=not progress, leave=False) as bar:
            while time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=0.25)
                except queue.Empty:
                    bar.update(0)
                    bar.refresh()
                    continue
                if line is None:
                    break
                if line.startswith(READY_PREFIX):
                    return line.split()[1]
        self.stop()
        raise ConnectionLostError(f"the local kernel server did not start (log {self.log.name}):\n"
                                  + self.log_tail())

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log.name) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
