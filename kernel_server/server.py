"""The kernel server: models + sessions behind an rpyc ThreadedServer."""
from __future__ import annotations

import ipaddress
import logging
import threading

import rpyc
from rpyc.utils.helpers import classpartial
from rpyc.utils.server import ThreadedServer

from djinn_nb import __version__
from djinn_nb.errors import InvalidArgumentError
from .models import DEFAULT_MODEL, REGISTRY, ModelRegistry
from .service import KernelService
from .auth import TokenAuthenticator
from .checkpoints import CheckpointStore
from .sessions import SessionManager
from .validation import Limits

log = logging.getLogger("kernel_server")

#: the rpyc protocol settings, strict on purpose (see STYLE.md)
PROTOCOL_CONFIG = {
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_safe_attrs": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "allow_pickle": False,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "include_local_traceback": False,
    "include_local_version": False,
    # a paused session can wait on the client for as long as the researcher thinks
    "sync_request_timeout": None,
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Kernel:
    """What all connections share: the model registry, the sessions, the limits."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str | None = None,
                 dtype: str | None = None, limits: Limits | None = None, allow_load: bool = True):
        self.limits = limits or Limits()
        self.models = ModelRegistry(model, device, dtype, allow_load)
        self.sessions = SessionManager(self.limits)
        self.checkpoints = CheckpointStore(int(self.limits.checkpoint_budget_mb * 2**20),
                                           int(self.limits.pinned_pool_mb * 2**20))
        self.bulk_host = "127.0.0.1"   # where one-shot bulk listeners bind (the server's host)

    def info(self) -> dict:
        return {"version": __version__, "default_model": self.models.default,
                "loaded_models": self.models.loaded(), "registry": dict(REGISTRY),
                "sessions": self.sessions.count(), "limits": vars(self.limits),
                "checkpoint_bytes": self.checkpoints.used_bytes}


class KernelServer:
    """A running server; ``start()`` in a thread (tests) or ``serve_forever()`` (CLI)."""

    def __init__(self, kernel: Kernel, host: str = "127.0.0.1", port: int = 0,
                  token: str | None = None):
        if not is_loopback(host) and not token:
            raise InvalidArgumentError(
                f"refusing to bind {host} without a token: any address but loopback needs "
                "--token-file FILE or $DJINN_TOKEN (clients then pass dj.connect(..., token=...))")
        self.kernel = kernel
        kernel.bulk_host = host
        self._server = ThreadedServer(classpartial(KernelService, kernel), hostname=host, port=port,
                                      protocol_config=PROTOCOL_CONFIG, reuse_addr=True,
                                      authenticator=TokenAuthenticator(token),
                                      logger=logging.getLogger("kernel_server.rpyc"))
        # listen now, before anyone is told the address (rpyc would only listen in start())
        self._server._listen()
        self.host = host
        self.port = self._server.listener.getsockname()[1]
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def serve_forever(self) -> None:
        self._server.start()

    def start(self) -> "KernelServer":
        self._thread = threading.Thread(target=self._server.start, name="djinn-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
