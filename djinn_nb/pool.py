"""Sessions on several kernel servers from one notebook: ``dj.connect([addr1, addr2])``.

>>> pool = dj.connect(["gpu-a:18861", "gpu-b:18861"], token=...)
>>> a = pool.session(server="gpu-a:18861")          # or server=0
>>> b = pool.session(model="random:llama-13b")       # the server that serves that model
>>> pool.stats()["gpu-b:18861"]["devices"]           # memory per device of each server
>>> pool.close()

Each server gets its own ``Client`` (its own connection, sessions, checkpoints); the pool
only keeps them together and picks one. A server that cannot be reached when the pool is
made is an error, and no connection is left open.
"""
from __future__ import annotations

from .client import Client, parse_address
from djinn_protocol.errors import InvalidArgumentError


def _per_server(value, address: str, what: str):
    """``value`` for ``address``: the same for all servers, or a dict by address."""
    if isinstance(value, dict):
        if address not in value:
            raise InvalidArgumentError(f"{what} given per server, but not for {address}")
        return value[address]
    return value


class Pool:
    """One ``Client`` per kernel server. ``clients``: {address: Client}, in the given order."""

    def __init__(self, addresses, *, token=None, tls=None, timeout: float | None = None):
        if isinstance(addresses, str) or not isinstance(addresses, (list, tuple)) or not addresses:
            raise InvalidArgumentError(f"a pool needs a non-empty list of 'host:port' addresses, "
                                       f"got {addresses!r:.80}")
        seen = {}
        for address in addresses:
            key = parse_address(address)             # typed error for a malformed address
            if key in seen:
                raise InvalidArgumentError(f"{address} is given twice (as {seen[key]})")
            seen[key] = address
        self.clients: dict[str, Client] = {}
        try:
            for address in addresses:
                self.clients[address] = Client(address, timeout=timeout,
                                                token=_per_server(token, address, "token"),
                                                tls=_per_server(tls, address, "tls"))
        except BaseException:
            self.close()
            raise

    # ---- picking a server -------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        return list(self.clients)

    def client(self, server=None) -> Client:
        """The client of ``server``: its address, its index in the pool, or the Client
        itself; None: the first server."""
        if server is None:
            return next(iter(self.clients.values()))
        if isinstance(server, Client) and server in self.clients.values():
            return server
        if isinstance(server, int) and not isinstance(server, bool):
            if 0 <= server < len(self.clients):
                return list(self.clients.values())[server]
        elif isinstance(server, str) and server in self.clients:
            return self.clients[server]
        raise InvalidArgumentError(f"no server {server!r} in this pool: "
                                   f"{', '.join(self.clients)} (or an index 0..{len(self.clients) - 1})")

    def server_for(self, model: str) -> Client:
        """The first server that has ``model`` loaded or as its default, else the first."""
        for c in self.clients.values():
            info = c.server_info
            if model == info.get("default_model") or model in (info.get("loaded_models") or []):
                return c
        for c in self.clients.values():          # loaded since connecting?
            info = c.call("hello")
            if model in (info.get("loaded_models") or []):
                return c
        return self.client()

    def session(self, server=None, model: str | None = None):
        """A new session on ``server`` (address, index or Client; None: the server that
        serves ``model``, else the first) and ``model`` (None: that server's default)."""
        if server is None and model is not None:
            return self.server_for(model).session(model=model)
        return self.client(server).session(model=model)

    # ---- the pool as a whole ------------------------------------------------------------------
    def stats(self, memory: bool = True) -> dict:
        """{address: client.stats()} (calls, bytes, round trips, memory per device)."""
        return {a: c.stats(memory=memory) for a, c in self.clients.items()}

    def info(self) -> dict:
        """{address: server facts at connect time (models, limits, version)}."""
        return {a: c.server_info for a, c in self.clients.items()}

    def ping(self) -> dict:
        """{address: one round trip in ms}."""
        return {a: c.ping() for a, c in self.clients.items()}

    def close(self) -> None:
        """Close every client (their sessions and checkpoints on the servers are released)."""
        for c in list(self.clients.values()):
            try:
                c.close()
            except Exception:       # one server's trouble must not keep the others open
                pass

    @property
    def closed(self) -> bool:
        return all(c.closed for c in self.clients.values())

    def __getitem__(self, server) -> Client:
        return self.client(server)

    def __iter__(self):
        return iter(self.clients.values())

    def __len__(self) -> int:
        return len(self.clients)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return f"<djinn_nb.Pool of {len(self.clients)} servers ({state}): {', '.join(self.clients)}>"
