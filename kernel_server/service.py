"""The rpyc service: a thin translation layer from exposed calls to plain classes.

Each ``exposed_*`` method takes one packed argument (``djinn_nb.wire``) and returns a
packed ``{"ok": value}`` or ``{"error": {"type", "message"}}``; no exception, traceback
or netref to a server object ever crosses the connection.
"""
from __future__ import annotations

import functools
import inspect
import logging
import uuid

import rpyc

from djinn_nb.errors import DjinnError, InvalidArgumentError, ServerError
from djinn_nb.wire import pack, unpack

log = logging.getLogger("kernel_server")


def _error(exc: DjinnError):
    return pack({"error": {"type": type(exc).__name__, "message": str(exc)}})


def _bind(fn, args: dict):
    try:
        inspect.signature(fn).bind(**args)
    except TypeError as exc:
        raise InvalidArgumentError(f"{fn.__name__}(): {exc}") from None


def remote(fn):
    """Unpack the request, translate errors, pack the result."""
    @functools.wraps(fn)
    def wrapper(self, packed=None):
        try:
            args = {} if packed is None else unpack(packed)
            if not isinstance(args, dict):
                raise InvalidArgumentError("request arguments must be a dict")
            return pack({"ok": fn(self, **args)})
        except DjinnError as exc:
            return _error(exc)
        except Exception as exc:  # a server bug: log it here, send a clean message
            log.exception("error in %s", fn.__name__)
            return _error(ServerError(f"{fn.__name__} failed inside the server: "
                                      f"{type(exc).__name__}: {exc}"))
    return wrapper


class KernelService(rpyc.Service):
    """One instance per connection; ``kernel`` (the models and sessions) is shared."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.owner = uuid.uuid4().hex

    def on_connect(self, conn):
        log.info("client %s connected", self.owner[:8])

    def on_disconnect(self, conn):
        n = self.kernel.sessions.close_owner(self.owner)
        log.info("client %s disconnected; released %d sessions", self.owner[:8], n)

    def _session_call(self, name: str, session, args: dict):
        target = getattr(self.kernel.sessions.get(session, self.owner), name)
        _bind(target, args)
        return target(**args)

    @remote
    def exposed_hello(self):
        return self.kernel.info()

    @remote
    def exposed_ping(self):
        return None

    @remote
    def exposed_open_session(self, model=None):
        if model is not None and not isinstance(model, str):
            raise InvalidArgumentError(f"model must be a str, got {type(model).__name__}")
        loaded = self.kernel.models.get(model)
        return self.kernel.sessions.open(loaded, self.owner).info()

    @remote
    def exposed_close_session(self, session):
        self.kernel.sessions.close(session, self.owner)

    @remote
    def exposed_session_info(self, session):
        return self._session_call("info", session, {})

    @remote
    def exposed_generate(self, session, **args):
        return self._session_call("generate", session, args)

    @remote
    def exposed_resume(self, session, **args):
        return self._session_call("resume", session, args)

    @remote
    def exposed_step(self, session, **args):
        return self._session_call("step", session, args)

    @remote
    def exposed_stop(self, session):
        return self._session_call("stop", session, {})

    @remote
    def exposed_activation(self, session, **args):
        return self._session_call("activation", session, args)

    @remote
    def exposed_edit(self, session, **args):
        return self._session_call("edit", session, args)

    @remote
    def exposed_set_breakpoint(self, session, **args):
        return self._session_call("set_breakpoint", session, args)

    @remote
    def exposed_clear_breakpoints(self, session, **args):
        return self._session_call("clear_breakpoints", session, args)

    @remote
    def exposed_steer(self, session, **args):
        return self._session_call("steer", session, args)

    @remote
    def exposed_clear_steering(self, session, **args):
        return self._session_call("clear_steering", session, args)
