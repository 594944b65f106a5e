"""Typed errors shared by the client and the kernel server.

The server never sends a traceback: it sends an error *code* (the class name)
and its message; the client turns that back into the same class here.
"""
from __future__ import annotations


class DjinnError(Exception):
    """Base class of every error djinn_nb and its kernel server raise on purpose."""


class ConnectionLostError(DjinnError, ConnectionError):
    """The kernel server went away (died, was stopped, or the network broke)."""


class AuthenticationFailedError(DjinnError, PermissionError):
    """The server wants a token and none, or a wrong one, was given."""


class TLSError(DjinnError, ConnectionError):
    """TLS on one side only (a plain client and a ``--certfile`` server, or the reverse),
    or a server certificate that does not verify against the CA the client trusts."""


class ServerError(DjinnError):
    """An unexpected failure inside the kernel server (a bug: please report it)."""


class InvalidArgumentError(DjinnError, ValueError):
    """An argument has the wrong type or an impossible value."""


class UnknownModelError(InvalidArgumentError):
    """The model name is neither a registry name, a Hugging Face id nor a path."""


class UnsupportedModelError(DjinnError):
    """The model loaded, but its decoder layers could not be found."""


class LayerOutOfRangeError(InvalidArgumentError, IndexError):
    """A layer index outside ``0 .. layers-1``."""


class InvalidEditError(InvalidArgumentError):
    """An edit or steering vector of the wrong shape, or with NaN/inf values."""


class LimitExceededError(InvalidArgumentError):
    """A request over one of the server's limits (prompt length, tokens, sessions...)."""


class UnknownSessionError(InvalidArgumentError):
    """No session with that id exists on the server (or it is not yours)."""


class TransferError(DjinnError):
    """A bulk transfer (checkpoint file, large array) did not complete."""


class CheckpointError(InvalidArgumentError):
    """A checkpoint that cannot be used here: unknown id, another model, a damaged file."""


class StateError(DjinnError, RuntimeError):
    """The call does not fit the session's current state; nothing was changed."""


class NotPausedError(StateError):
    """``activation()``, ``edit()``, ``resume()`` or ``step()`` need a paused session."""


class SessionBusyError(StateError):
    """``generate()`` while a generation is running or paused."""


class SessionClosedError(StateError):
    """The session was closed; open a new one with ``client.session()``."""


_BY_NAME = {cls.__name__: cls for cls in [
    DjinnError, ConnectionLostError, AuthenticationFailedError, TLSError, ServerError, InvalidArgumentError, UnknownModelError,
    UnsupportedModelError, LayerOutOfRangeError, InvalidEditError, LimitExceededError,
    UnknownSessionError, TransferError, CheckpointError, StateError, NotPausedError, SessionBusyError, SessionClosedError,
]}


def error_reply(exc: DjinnError) -> dict:
    """How the server sends ``exc`` (rpyc and the control channel alike); ``error_class``
    turns its ``type`` back into the class on the client."""
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def error_class(name: str) -> type[DjinnError]:
    """The error class for a code sent by the server (unknown codes become ``ServerError``)."""
    return _BY_NAME.get(name, ServerError)


__all__ = sorted(_BY_NAME)
