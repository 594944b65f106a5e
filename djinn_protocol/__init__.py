"""djinn_protocol: what the notebook client and the kernel server share, and nothing else.

Typed errors (``errors``), the wire codec (``wire``), socket framing for the control channel
and bulk transfers (``framing``), the connection opening (``handshake``) and the one
declared table of calls (``calls``). It imports nothing of the project; both ``djinn_nb``
(the client) and ``kernel_server`` import it, never each other.
"""
__version__ = "0.1.0"
