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
def checkpoint(conn: Connection, session):
    return conn.session(session).checkpoint(conn.kernel.checkpoints).describe()


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
    offer = kernel.hold_offer(principal_key(conn), lambda: BulkTransfer(
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
