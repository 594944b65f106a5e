"""One model replica: an ordinary ``python -m kernel_server`` process (the same code and wire
as a standalone server), started with the cluster's host, token, TLS and grace period, and
watched. The Ray backend wraps one in an actor; the process backend holds them directly."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from djinn_protocol.errors import ConnectionLostError
from djinn_protocol.handshake import wait_ready_line
from kernel_server.transport.handlers import OPERATOR_KEY_ENV

from .config import ClusterConfig, ModelSpec


def server_command(cfg: ClusterConfig, spec: ModelSpec) -> list[str]:
    cmd = [sys.executable, "-m", "kernel_server", "--host", cfg.host, "--port", "0",
           "--model", spec.model, "--device", spec.device, "--dtype", spec.dtype,
           "--no-load-on-request", "--reconnect-grace-s", str(cfg.reconnect_grace_s)]
    if spec.device_map:
        cmd += ["--device-map", spec.device_map]
    if cfg.certfile:
        cmd += ["--certfile", cfg.certfile] + (["--keyfile", cfg.keyfile] if cfg.keyfile else [])
    return cmd + [str(a) for a in spec.args]


class Replica:
    """Start the kernel server of replica ``replica_id`` and wait until it serves.
    ``address``, ``pid``; ``alive``; ``stop()``. ``on_exit(returncode)`` is called from a
    watcher thread if the process ends without ``stop()``. ``env``: more environment for
    the server (the process backend's GPU choice), under the config's own ``env``."""

    def __init__(self, replica_id: str, cfg: ClusterConfig, spec: ModelSpec, operator_key: str,
                 log_path: str | None = None, on_exit=None, env: dict | None = None):
        self.id = replica_id
        self.name = spec.name
        self.model = spec.model
        self._stopping = False
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   **{str(k): str(v) for k, v in {**(env or {}), **spec.env}.items()})
        env[OPERATOR_KEY_ENV] = operator_key
        token = cfg.token()
        env.pop("DJINN_TOKEN", None)
        if token:
            env["DJINN_TOKEN"] = token           # (in the environment, not on the command line)
        self.log_path = log_path
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        # the server stops with this process, however it ends (kernel_server.cli
        # --exit-with-parent: the parent-death signal follows the launching thread)
        cmd = server_command(cfg, spec) + ["--exit-with-parent", str(os.getpid())]
        if threading.current_thread() is not threading.main_thread():
            cmd.append("--no-parent-death-signal")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        if log_path:
            log.close()
        self.pid = self.proc.pid
        self.started = time.time()
        self.address = self._wait_ready(cfg.start_timeout_s)
        self._on_exit = on_exit
        threading.Thread(target=self._watch, name=f"djinn-replica-{replica_id}", daemon=True).start()

    def _wait_ready(self, timeout: float) -> str:
        address = wait_ready_line(self.proc.stdout, timeout)
        if address is not None:
            return address
        self.stop()
        raise ConnectionLostError(f"replica {self.id} ({self.model}) did not start; "
                                  f"log: {self.log_path or '(none: set a log_dir)'}")

    def _watch(self) -> None:
        code = self.proc.wait()
        if not self._stopping and self._on_exit is not None:
            self._on_exit(code)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "model": self.model, "address": self.address,
                "pid": self.pid, "alive": self.alive, "started": self.started}

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the server releases its sessions and closes its clients), SIGKILL after
        ``timeout`` seconds. SIGTERM is sent again every 2 s meanwhile: the server's main
        thread waits in ``accept()``, and a signal the kernel delivers to another of its
        threads leaves it there until the next one (seen here: 1 stop in 4 took the full
        30 s without the repeat)."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=min(2.0, max(deadline - time.monotonic(), 0.01)))
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
