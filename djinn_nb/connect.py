"""``dj.connect()``: a client of one server, a ``Pool`` of several, or a launched local one."""
from __future__ import annotations

import os

from .client import SERVER_ENV, Client
from .launcher import shared_server
from .pool import Pool


def connect(address=None, *, token: str | None = None, tls=None,
            owner_key: str | None = None, model: str | None = None,
            device: str | None = None, dtype: str | None = None, timeout: float | None = None,
            progress: bool = True):
    """Connect to a kernel server at ``"host:port"`` (a list of addresses: a ``dj.Pool``
    holding one client per server, ``pool.session(server=..., model=...)``; a cluster's
    directory ``"cluster://host:port"``: a ``djinn_nb.cluster.ClusterClient`` whose
    ``session(model=...)`` lands on the least-loaded healthy replica of that model).

    With no address: the server named by the ``DJINN_SERVER`` environment variable if set
    (``make lab`` sets it for its notebooks), else a local server on ``model`` (default the
    embedded smollm2-135m): the one this process already launched for that model, device
    and dtype if it runs, else one launched now. It stops when the last client using it
    closes or this process exits (or dies: it watches its parent); its log is under
    ``djinn_nb.launcher.log_dir()`` (``~/.cache/djinn_nb/logs``) while it runs.
    ``token``: the shared secret of a server started with one (default ``$DJINN_TOKEN``).
    ``tls``: for a server started with ``--certfile``: True (verify its certificate against
    the system CAs) or the path of a CA file to trust (e.g. its self-signed certificate);
    default ``$DJINN_TLS`` ("1" or a path). ``owner_key``: a secret of yours that, with the
    token, identifies whose disconnected sessions ``attach()`` may take over (see README)."""
    if address is None and os.environ.get(SERVER_ENV) and model is None and device is None:
        address = os.environ[SERVER_ENV]
    if isinstance(address, (list, tuple)):     # several servers: a Pool of clients
        return Pool(address, token=token, tls=tls, timeout=timeout)
    if isinstance(address, str) and address.startswith("cluster://"):
        from .cluster import ClusterClient        # a cluster: its directory is asked first
        return ClusterClient(address, token=token, tls=tls, owner_key=owner_key, timeout=timeout)
    if address is not None:
        return Client(address, timeout=timeout, token=token, tls=tls, owner_key=owner_key)
    server = shared_server(model, device, dtype, progress=progress)
    try:
        return Client(server.address, timeout=timeout, local_server=server, tls=False,
                      owner_key=owner_key)
    except BaseException:
        server.release()
        raise
