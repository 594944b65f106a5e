"""djinn_nb kernel server: loads models once, owns KV caches and sessions, serves rpyc.

Start it with ``python -m kernel_server --model smollm2-135m`` (or ``djinn-server``).
"""
from kernel_server.model.loading import DEFAULT_MODEL, REGISTRY
from kernel_server.model.registry import find_layers, load_model

__all__ = ["DEFAULT_MODEL", "REGISTRY", "find_layers", "load_model"]
