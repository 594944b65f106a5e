"""The server-level calls of the table (``djinn_protocol.calls``, targets ``server.<name>``):
each a function of the caller's ``Connection`` and the call's checked arguments. Session
calls (targets ``session.<method>``) go straight to ``kernel_server.runtime.session_state.Session``."""
from __future__ import annotations

from djinn_protocol.checkpoint_file import read_metadata
from djinn_protocol.errors import (CheckpointError, DjinnError, InvalidArgumentError,
                                   LimitExceededError)
from kernel_server.checkpoints import file_format as ckpt_files
from kernel_server.transport.bulk_listener import BulkTransfer
from kernel_server.transport.connection import Connection

MAX_PENDING_UPLOADS = 4


# ---- connection ------------------------------------------------------------------------------
def hello(conn: Connection, owner_key):
    """Server facts, and this connection's owner id (needed to re-attach its sessions after
    a disconnect). ``owner_key``: the client's owner proof (``djinn_protocol.handshake``)."""
    if owner_key is not None:
        conn.identify(owner_key)
    return {**conn.kernel.info(conn.owner), "owner": conn.owner}


def reattach(conn: Connection, owner):
    """Take back what the connection with owner id ``owner`` held (``client.reconnect()``)."""
    return conn.kernel.owners.reattach(owner, conn.owner)


def attach(conn: Connection, session):
    """Take over a disconnected client's session of the same token / owner key."""
    conn.kernel.owners.attach(session, conn.owner)
    return conn.session(session).info()


def closing(conn: Connection):
    """The client closes on purpose: release its sessions when it goes, grace or not."""
    conn.kernel.owners.connected(conn.owner, None)


def ping(conn: Connection):
    return None


def memory(conn: Connection):
    """Per device: allocated / reserved / total bytes (CUDA), the process RSS (cpu), and the
    decoder layers of each loaded model kept there."""
    return conn.kernel.memory()


def open_control(conn: Connection):
    """Offer a control channel: its port and a one-time nonce."""
    if conn.control is None:
        raise InvalidArgumentError("this server offers no control channel")
    return conn.control.offer(conn)


# ---- sessions ----------------------------------------------------------------------------------
def principal_key(conn: Connection) -> str:
    """Whom per-client caps count for: the connection's principal (its token and owner key,
    shared by all its connections), or the connection alone when it has none."""
    return conn.kernel.owners.principal_of(conn.owner) or conn.owner


def room_for_session(conn: Connection) -> None:
    """``LimitExceededError`` when the caller's principal, over all its connections, holds
    ``--max-sessions-per-client`` sessions already (a connection's own count is checked
    again when the session opens)."""
    kernel = conn.kernel
    owners = kernel.owners.owners_of(principal_key(conn)) or [conn.owner]
    held = sum(len(kernel.sessions.owned_by(o)) for o in owners)
    cap = kernel.limits.max_sessions_per_client
    if held >= cap:
        raise LimitExceededError(f"this client already has {held} sessions over its connections, "
                                 "the server limit (--max-sessions-per-client); close some first")


def open_session(conn: Connection, model):
    loaded = conn.kernel.model(model)
    room_for_session(conn)
    return conn.kernel.sessions.open(loaded, conn.owner).info()


def close_session(conn: Connection, session):
    conn.kernel.sessions.close(session, conn.owner)


# ---- checkpoints -------------------------------------------------------------------------------
def checkpoint(conn: Connection, session, row):
    out = conn.session(session).checkpoint(conn.kernel.checkpoints, row)
    return [ck.describe() for ck in out] if isinstance(out, list) else out.describe()


def checkpoint_info(conn: Connection, checkpoint, wait):
    ck = conn.checkpoint(checkpoint)
    if wait:
        ck.wait()
    return ck.describe()


def checkpoints(conn: Connection):
    return conn.kernel.checkpoints.list(conn.owner)


def delete_checkpoint(conn: Connection, checkpoint):
    conn.kernel.checkpoints.delete(checkpoint, conn.owner)


def restore(conn: Connection, session, checkpoint):
    ck = conn.checkpoint(checkpoint)
    return conn.session(session).restore(ck)


def fork(conn: Connection, checkpoint):
    ck = conn.checkpoint(checkpoint)
    sessions = conn.kernel.sessions
    room_for_session(conn)
    sess = sessions.open(conn.kernel.models.get(ck.model), conn.owner)
    try:
        return sess.restore(ck)
    except BaseException:
        sessions.close(sess.id, conn.owner)
        raise


def export_checkpoint(conn: Connection, checkpoint):
    """Offer the checkpoint file on the bulk path; the client fetches it."""
    ck = conn.checkpoint(checkpoint)
    kernel = conn.kernel
    loaded = kernel.models.get(ck.model)
    offer = kernel.hold_offer(conn.owner, lambda: BulkTransfer(
        kernel.bulk_host, payload=ckpt_files.to_bytes(ck, loaded), tls=kernel.bulk_tls))
    return {**offer.describe(), "nbytes": offer.nbytes}


def begin_upload(conn: Connection, nbytes):
    lim = conn.kernel.limits
    limit = int(min(lim.max_upload_mb, lim.checkpoint_budget_mb) * 2**20)
    if not 0 < nbytes <= limit:
        raise InvalidArgumentError(f"upload size must be 1..{limit} bytes, got {nbytes!r}")
    conn.uploads = {k: t for k, t in conn.uploads.items() if not t.expired}
    if len(conn.uploads) >= MAX_PENDING_UPLOADS:
        raise LimitExceededError(f"{MAX_PENDING_UPLOADS} uploads are already waiting to be "
                                 "imported; import or let them expire first")
    transfer = BulkTransfer(conn.kernel.bulk_host, max_bytes=nbytes, tls=conn.kernel.bulk_tls)
    conn.uploads[transfer.nonce.hex()] = transfer
    return transfer.describe()


def import_checkpoint(conn: Connection, upload, session):
    """Turn an uploaded checkpoint file into a checkpoint restored into ``session`` (or a
    new session on the file's model). Leaves no orphan session or checkpoint on failure."""
    transfer = conn.uploads.pop(upload, None)
    if transfer is None:
        raise InvalidArgumentError("unknown upload id")
    data = transfer.result()
    kernel = conn.kernel
    meta = read_metadata(data)
    sess = None if session is None else conn.session(session)
    if sess is not None:
        loaded = sess.loaded
    else:
        name = meta["identity"]["model"]
        try:
            loaded = kernel.model(name)       # admission first: a file cannot build a huge model
        except DjinnError as exc:
            raise CheckpointError(f"the checkpoint's model {name!r} cannot be loaded here: "
                                  f"{exc}") from None
    ck = ckpt_files.from_bytes(data, loaded, conn.owner, kernel.limits)   # verified whole first
    opened = sess is None
    if opened:
        room_for_session(conn)
        sess = kernel.sessions.open(loaded, conn.owner)
    try:
        kernel.checkpoints.add(ck)
        try:
            info = sess.restore(ck)
        except BaseException:
            kernel.checkpoints.delete(ck.id, conn.owner)
            raise
    except BaseException:
        if opened:
            kernel.sessions.close(sess.id, conn.owner)
        raise
    return {"checkpoint": ck.describe(), "session": info}


# ---- a cluster (kernel_server.cluster) -------------------------------------------------------
#: the environment variable holding the cluster operator's key: set by the cluster's replica
#: runner for the replicas it starts; a server without it has no operator
OPERATOR_KEY_ENV = "DJINN_OPERATOR_KEY"


def _directory_only(name: str):
    def refuse(conn: Connection, **_):
        raise InvalidArgumentError(f"{name} is a call of a cluster directory "
                                   "(dj.connect('cluster://host:port')); this is a kernel server")
    refuse.__name__ = name
    return refuse


cluster_status = _directory_only("cluster_status")
cluster_place = _directory_only("cluster_place")
cluster_relay = _directory_only("cluster_relay")
cluster_moved = _directory_only("cluster_moved")


def _require_operator(conn: Connection, call: str) -> None:
    """Only the cluster's directory may see every client's sessions and hand them over: it
    proves the operator key (as an owner key, ``hello(owner_key=...)``: the key never travels)
    on a connection that also proved the token when the server has one."""
    import os
    from djinn_protocol.handshake import owner_proof
    from kernel_server.runtime.ownership import principal
    key = os.environ.get(OPERATOR_KEY_ENV)
    mine = conn.kernel.owners.principal_of(conn.owner)
    if not key or mine is None or mine != principal(conn.credentials, owner_proof(key)):
        raise InvalidArgumentError(f"{call} is for the cluster operator (its directory) only")


def cluster_load(conn: Connection):
    """Load figures of the whole server for the directory: sessions by state, memory per
    device, checkpoint bytes, loaded models, tokens/s (kernel_server.runtime.throughput:
    all models, and per model with the decode scheduler's rows when the engine is on)."""
    from kernel_server.runtime import throughput
    _require_operator(conn, "cluster_load")
    kernel = conn.kernel
    states: dict = {}
    for s in kernel.sessions.all():
        states[s.state] = states.get(s.state, 0) + 1
    names = kernel.models.loaded()
    rate = throughput.load([kernel.models.get(n) for n in names])
    return {"sessions": states, "total_sessions": sum(states.values()),
            "memory": kernel.memory()["devices"], "checkpoint_bytes": kernel.checkpoints.used_bytes,
            "models": names, "tokens_per_s": rate["tokens_per_s"], "throughput": rate}


def handover_out(conn: Connection):
    """Drain: every paused or ready session whose client could re-attach it (it has a
    principal) checkpointed and offered as a file on the bulk path, for the directory to
    move to another replica. Sessions stay here (the replica is about to stop)."""
    from kernel_server.runtime.states import PAUSED, READY
    _require_operator(conn, "handover_out")
    kernel = conn.kernel
    out = []
    for s in kernel.sessions.all():
        who = kernel.owners.principal_of(s.owner)
        if s.state not in (PAUSED, READY) or who is None:
            continue
        try:
            ck = s.checkpoint(kernel.checkpoints)
            try:
                data = ckpt_files.to_bytes(ck, s.loaded)
            finally:
                kernel.checkpoints.delete(ck.id, ck.owner)
        except DjinnError:           # closed or resumed meanwhile: not drained
            continue
        offer = BulkTransfer(kernel.bulk_host, payload=data, tls=kernel.bulk_tls, timeout=300.0)
        out.append({"session": s.id, "principal": who, "model": s.loaded.name, "state": s.state,
                    "offer": {**offer.describe(), "nbytes": offer.nbytes}})
    return out


def handover_in(conn: Connection, upload, principal):
    """Drain, the receiving end: the uploaded checkpoint file restored into a new session
    held for ``principal`` as a disconnected client's session is (``--reconnect-grace-s``):
    that client takes it with ``attach(session)``."""
    import uuid
    _require_operator(conn, "handover_in")
    kernel = conn.kernel
    if kernel.owners.grace_s <= 0:
        raise InvalidArgumentError("this replica keeps no sessions for re-attachment "
                                   "(--reconnect-grace-s 0): nothing can be handed over to it")
    transfer = conn.uploads.pop(upload, None)
    if transfer is None:
        raise InvalidArgumentError("unknown upload id")
    data = transfer.result()
    name = read_metadata(data)["identity"]["model"]
    loaded = kernel.model(name)
    owner = uuid.uuid4().hex                       # a connection that never was, of principal
    kernel.owners.connected(owner, principal)
    ck = ckpt_files.from_bytes(data, loaded, owner, kernel.limits)
    sess = kernel.sessions.open(loaded, owner)
    try:
        kernel.checkpoints.add(ck)
        try:
            sess.restore(ck)
        finally:
            kernel.checkpoints.delete(ck.id, owner)
    except BaseException:
        kernel.sessions.close(sess.id, owner)
        kernel.owners.disconnected(owner)
        raise
    kernel.owners.disconnected(owner)              # orphaned: kept for the grace period
    return {"session": sess.id}
