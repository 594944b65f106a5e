"""The typed errors a notebook sees (defined in ``djinn_protocol.errors``, shared with the
server; ``dj.InvalidArgumentError`` and the others are re-exported by ``djinn_nb``)."""
from djinn_protocol.errors import *  # noqa: F401,F403
from djinn_protocol.errors import __all__  # noqa: F401
