"""One client connection's server-side state: its owner id, principal and pending uploads."""
from __future__ import annotations

import uuid

from kernel_server.runtime.ownership import peer_of, principal


class Connection:
    """What the calls of one client connection share: the kernel (models, sessions,
    checkpoints), the owner id its sessions carry, its pending uploads. The rpyc service
    and the control channel of one client hold the same ``Connection``."""

    def __init__(self, kernel, credentials=None, control=None, peer=None):
        self.kernel = kernel
        self.control = control             # the server's ControlServer, if it offers one
        self.credentials = credentials     # "token" when the authenticator checked one
        self.owner = uuid.uuid4().hex
        self.uploads: dict = {}            # nonce hex -> BulkTransfer
        self.socket = None                 # the rpyc connection's socket (set by the server)
        # peer: the remote (host, port); caps also count per host and credentials
        kernel.owners.connected(self.owner, principal(credentials, None), peer_of(credentials, peer))

    def identify(self, owner_proof) -> None:
        """The client's owner proof (``hello(owner_key=...)``) joins its principal."""
        self.kernel.owners.connected(self.owner, principal(self.credentials, owner_proof))

    def session(self, session_id):
        return self.kernel.sessions.get(session_id, self.owner)

    def checkpoint(self, checkpoint_id):
        return self.kernel.checkpoints.get(checkpoint_id, self.owner)

    def release_transfers(self) -> int:
        """The connection is gone: withdraw its unfetched downloads and pending uploads
        (each holds a listener, a thread and its bytes until its deadline otherwise)."""
        uploads, self.uploads = list(self.uploads.values()), {}
        for t in uploads:
            t.cancel()
        return self.kernel.drop_offers(self.owner) + len(uploads)

    def disconnect(self) -> None:
        """End this client's connection as if it had gone (its control channel closed):
        shutting the rpyc socket down ends rpyc's serving loop, whose ``on_disconnect``
        releases the sessions (one place does that)."""
        shutdown(self.socket)


def shutdown(sock) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(2)     # socket.SHUT_RDWR
    except OSError:
        pass
