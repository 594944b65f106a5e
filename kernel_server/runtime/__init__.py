"""The runtime: the session state machine, generation runs (single, batched, fast decode),
the hook registry and who owns what. No transport in here."""
