"""The one dispatcher: a request ``(name, args)`` from any transport, checked against the
table of calls (``djinn_protocol.calls``), run, and answered as a reply dict:
``{"ok": value}`` or ``{"error": {"type", "message"}}``. No exception, traceback or live
object ever leaves through here.

A session method may answer later (``resume`` / ``step`` / ``stop`` of a paused run return a
``concurrent.futures.Future`` settled by the generation thread); ``dispatch`` then returns a
Future of the reply, and the transport either waits for it (rpyc) or lets the generation
thread send the reply itself (the control channel's direct reply).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future

from djinn_protocol.calls import CALLS, Call, lookup
from djinn_protocol.errors import DjinnError, ServerError, error_reply
from kernel_server.transport import handlers
from kernel_server.transport.connection import Connection

log = logging.getLogger("kernel_server")


def _server_target(call: Call):
    fn = getattr(handlers, call.function, None)
    if fn is None:
        raise RuntimeError(f"the table declares {call.target!r} but kernel_server has no such handler")
    return fn


#: server-level handlers resolved once, at import: a declared call without a handler fails here
SERVER_TARGETS = {name: _server_target(c) for name, c in CALLS.items() if not c.on_session}


def _failure(name: str, exc: BaseException) -> dict:
    if isinstance(exc, DjinnError):
        return error_reply(exc)
    log.error("error in %s", name, exc_info=exc)          # a server bug: logged here, clean message
    return error_reply(ServerError(f"{name} failed inside the server: {type(exc).__name__}: {exc}"))


def _run(conn: Connection, call: Call, args: dict):
    bound = call.bind(args)
    if call.on_session:
        session = conn.session(bound.pop("session"))
        return getattr(session, call.function)(**bound)
    return SERVER_TARGETS[call.name](conn, **bound)


def dispatch(conn: Connection, name, args) -> dict | Future:
    """Run the declared call ``name`` for ``conn``: a reply dict, or a Future of one."""
    try:
        call = lookup(name)
        result = _run(conn, call, args)
    except Exception as exc:
        return _failure(str(name)[:80], exc)
    if not isinstance(result, Future):
        return {"ok": result}
    reply: Future = Future()

    def settle(done: Future) -> None:              # in the thread that settles ``result``
        exc = done.exception()
        reply.set_result(_failure(name, exc) if exc is not None else {"ok": done.result()})
    result.add_done_callback(settle)
    return reply


def dispatch_now(conn: Connection, name, args) -> dict:
    """``dispatch``, waiting for a late reply."""
    reply = dispatch(conn, name, args)
    return reply.result() if isinstance(reply, Future) else reply
