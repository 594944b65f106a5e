"""The kernel server's transport: the rpyc service and the control channel, both dispatching
through the one table of calls (``djinn_protocol.calls``); bulk transfers; the connection
opening (TLS, token). Nothing here knows how a generation runs."""
