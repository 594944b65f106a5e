"""djinn_nb: pause, inspect, steer and resume a language model on a remote kernel server.

>>> import djinn_nb as dj
>>> client = dj.connect()                  # launches a local kernel server
>>> s = client.session(model="tiny-gpt2")
>>> s.breakpoint(layer=6)
>>> ev = s.generate("The capital of France is", max_new_tokens=20)
"""
from djinn_protocol import __version__
from djinn_protocol.errors import (AuthenticationFailedError, CheckpointError, TransferError, ConnectionLostError, DjinnError, InvalidArgumentError, InvalidEditError,
                     LayerOutOfRangeError, LimitExceededError, NotPausedError, ServerError,
                     SessionBusyError, SessionClosedError, StateError, UnknownModelError,
                     TLSError, UnknownSessionError, UnsupportedModelError)
from .results import (BatchFinished, Finished, GenerationInterrupted, GenerationResult,
                      Interrupted, Paused, ScoreResult, StepRecord)
from .client import Client
from .connect import connect
from .pool import Pool
from .cluster import ClusterClient, move
from .session import Session
from .checkpoint import Checkpoint
from .divergence import Divergence, divergence

__all__ = [
    "connect", "divergence", "Divergence", "Client", "Pool", "ClusterClient", "move", "Session", "Checkpoint", "CheckpointError", "TransferError", "AuthenticationFailedError", "Paused", "Finished", "GenerationResult", "StepRecord", "ScoreResult", "BatchFinished",
    "Interrupted", "GenerationInterrupted",
    "DjinnError", "ConnectionLostError", "ServerError", "InvalidArgumentError", "UnknownModelError",
    "UnsupportedModelError", "LayerOutOfRangeError", "InvalidEditError", "LimitExceededError",
    "UnknownSessionError", "StateError", "NotPausedError", "SessionBusyError", "SessionClosedError",
    "TLSError",
]


def __getattr__(name):
    # lazy, resolved on first access: `dj.ops` (intervention expressions), `dj.plots` needs
    # plotly, `dj.experiments` yaml and
    # jsonschema, `dj.Dashboard` ipywidgets (the widgets package, which imports djinn_nb:
    # `import djinn_nb` itself never loads it)
    import importlib
    if name in ("plots", "experiments", "ops"):
        return importlib.import_module("." + name, __name__)
    if name == "Dashboard":
        return importlib.import_module("widgets").Dashboard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
