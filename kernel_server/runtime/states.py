"""The states of a server session: idle -> running -> paused <-> running -> finished, and
closed; a restored checkpoint leaves it ready (at a token boundary, where resume() continues)."""

IDLE, RUNNING, PAUSED, FINISHED, CLOSED = "idle", "running", "paused", "finished", "closed"
READY = "ready"
