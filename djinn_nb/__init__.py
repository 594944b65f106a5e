"""djinn_nb: pause, inspect, steer and resume a language model on a remote kernel server.

>>> import djinn_nb as dj
>>> client = dj.connect()                  # launches a local kernel server
>>> s = client.session(model="tiny-gpt2")
>>> s.breakpoint(layer=6)
>>> ev = s.generate("The capital of France is", max_new_tokens=20)
"""
__version__ = "0.1.0"

from .errors import (AuthenticationFailedError, CheckpointError, TransferError, ConnectionLostError, DjinnError, InvalidArgumentError, InvalidEditError,
                     LayerOutOfRangeError, LimitExceededError, NotPausedError, ServerError,
                     SessionBusyError, SessionClosedError, StateError, UnknownModelError,
                     TLSError, UnknownSessionError, UnsupportedModelError)
from .results import BatchFinished, Finished, GenerationResult, Paused, ScoreResult, StepRecord
from .client import Client, connect
from .pool import Pool
from .session import Session
from .checkpoint import Checkpoint
from .divergence import Divergence, divergence

__all__ = [
    "connect", "divergence", "Divergence", "Client", "Pool", "Session", "Checkpoint", "CheckpointError", "TransferError", "AuthenticationFailedError", "Paused", "Finished", "GenerationResult", "StepRecord", "ScoreResult", "BatchFinished",
    "DjinnError", "ConnectionLostError", "ServerError", "InvalidArgumentError", "UnknownModelError",
    "UnsupportedModelError", "LayerOutOfRangeError", "InvalidEditError", "LimitExceededError",
    "UnknownSessionError", "StateError", "NotPausedError", "SessionBusyError", "SessionClosedError",
    "TLSError",
]


def __getattr__(name):
    # lazy: `dj.plots` needs plotly and `dj.Dashboard` ipywidgets; `import djinn_nb` stays light
    if name in ("plots", "experiments"):
        import importlib
        return importlib.import_module("." + name, __name__)
    if name == "Dashboard":
        from widgets import Dashboard
        return Dashboard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
