"""The rpyc service: a thin translation layer from exposed calls to plain classes.

Each ``exposed_*`` method takes one packed argument (``djinn_nb.wire``) and returns a
packed ``{"ok": value}`` or ``{"error": {"type", "message"}}``; no exception, traceback
or netref to a server object ever crosses the connection.
"""
from __future__ import annotations

import functools
import inspect
import logging
import uuid

import rpyc

from djinn_nb.errors import (CheckpointError, DjinnError, error_reply, InvalidArgumentError,
                             LimitExceededError, ServerError)
from djinn_nb.wire import pack, unpack
from . import checkpoints as C
from .bulk import BulkTransfer
from .ownership import principal

log = logging.getLogger("kernel_server")
#: arrays at least this large go over the bulk path instead of inside the rpyc reply
BULK_THRESHOLD = 64 << 10


def _error(exc: DjinnError):
    return pack(error_reply(exc))


@functools.lru_cache(maxsize=512)
def _method_signature(func) -> inspect.Signature:
    """The signature of a bound method of ``func``, computed once (inspect takes 20-40 us,
    a good part of a pause/resume round trip)."""
    sig = inspect.signature(func)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _bind(fn, args: dict):
    try:
        sig = _method_signature(fn.__func__) if inspect.ismethod(fn) else inspect.signature(fn)
        sig.bind(**args)
    except TypeError as exc:
        raise InvalidArgumentError(f"{fn.__name__}(): {exc}") from None


def invoke(fn, service, args, signature=None) -> dict:
    """Call the exposed method ``fn`` (undecorated) with ``args``: checked against its
    signature, errors translated. ``{"ok": value}`` or ``{"error": {"type", "message"}}``;
    rpyc (``remote``) and the control channel (``kernel_server.control``) both call this."""
    try:
        if not isinstance(args, dict):
            raise InvalidArgumentError("request arguments must be a dict")
        try:
            (signature or inspect.signature(fn)).bind(service, **args)
        except TypeError as exc:
            raise InvalidArgumentError(f"{fn.__name__.removeprefix('exposed_')}(): {exc}") from None
        return {"ok": fn(service, **args)}
    except DjinnError as exc:
        return error_reply(exc)
    except Exception as exc:  # a server bug: log it here, send a clean message
        log.exception("error in %s", fn.__name__)
        return {"error": {"type": "ServerError", "message": f"{fn.__name__} failed inside the "
                          f"server: {type(exc).__name__}: {exc}"}}


def remote(fn):
    """Unpack the request, check it fits the signature, translate errors, pack the result."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(self, packed=None):
        try:
            args = {} if packed is None else unpack(packed)
            return pack(invoke(fn, self, args, signature))
        except DjinnError as exc:
            return _error(exc)
        except Exception as exc:  # a server bug: log it here, send a clean message
            log.exception("error in %s", fn.__name__)
            return _error(ServerError(f"{fn.__name__} failed inside the server: "
                                      f"{type(exc).__name__}: {exc}"))
    return wrapper


class KernelService(rpyc.Service):
    """One instance per connection; ``kernel`` (the models and sessions) is shared."""

    def __init__(self, kernel, control=None):
        self.kernel = kernel
        self.control = control            # the server's ControlServer (kernel_server.control)
        self.owner = uuid.uuid4().hex
        self._uploads: dict[str, BulkTransfer] = {}

    def on_connect(self, conn):
        self._rpyc_conn = conn            # (the control channel ends it when it closes)
        # "token" when the authenticator checked a token, else None (kernel_server.ownership)
        self._credentials = conn._config.get("credentials")
        self.kernel.owners.connected(self.owner, principal(self._credentials, None))
        log.info("client %s connected", self.owner[:8])

    def on_disconnect(self, conn):
        if self.control is not None:
            self.control.detach(self)             # its control channel closes with it
        n = self.kernel.owners.disconnected(self.owner)   # released now, or kept for the grace
        if n is None:
            log.info("client %s disconnected; its sessions are kept for %g s (--reconnect-grace-s)",
                     self.owner[:8], self.kernel.owners.grace_s)
        else:
            log.info("client %s disconnected; released %d sessions", self.owner[:8], n)

    def _session_call(self, name: str, session, args: dict):
        target = getattr(self.kernel.sessions.get(session, self.owner), name)
        _bind(target, args)
        return target(**args)

    @remote
    def exposed_hello(self, owner_key=None):
        """Server facts, and this connection's owner id (needed to re-attach its sessions
        after a disconnect). ``owner_key``: the client's owner proof (``djinn_nb.auth``)."""
        if owner_key is not None:
            self.kernel.owners.connected(self.owner, principal(self._credentials, owner_key))
        return {**self.kernel.info(), "owner": self.owner}

    @remote
    def exposed_reattach(self, owner):
        """Take back what the connection with owner id ``owner`` held (client.reconnect())."""
        return self.kernel.owners.reattach(owner, self.owner)

    @remote
    def exposed_closing(self):
        """The client closes on purpose: release its sessions when it goes, grace or not."""
        self.kernel.owners.connected(self.owner, None)

    @remote
    def exposed_attach(self, session):
        """Take over a disconnected client's session of the same token/owner key."""
        self.kernel.owners.attach(session, self.owner)
        return self.kernel.sessions.get(session, self.owner).info()

    @remote
    def exposed_ping(self):
        return None

    @remote
    def exposed_memory(self):
        """Per device: allocated / reserved / total bytes (CUDA), the process RSS (cpu), and
        the decoder layers of each loaded model kept there (``client.stats()["devices"]``)."""
        return self.kernel.memory()

    @remote
    def exposed_open_control(self):
        """Offer a control channel (``djinn_nb.control``): its port and a one-time nonce."""
        if self.control is None:
            raise InvalidArgumentError("this server offers no control channel")
        return self.control.offer(self)

    @remote
    def exposed_open_session(self, model=None):
        if model is not None and not isinstance(model, str):
            raise InvalidArgumentError(f"model must be a str, got {type(model).__name__}")
        loaded = self.kernel.models.get(model)
        return self.kernel.sessions.open(loaded, self.owner).info()

    @remote
    def exposed_close_session(self, session):
        self.kernel.sessions.close(session, self.owner)

    @remote
    def exposed_session_info(self, session):
        return self._session_call("info", session, {})

    @remote
    def exposed_generate(self, session, **args):
        return self._session_call("generate", session, args)

    @remote
    def exposed_resume(self, session, **args):
        return self._session_call("resume", session, args)

    @remote
    def exposed_step(self, session, **args):
        return self._session_call("step", session, args)

    @remote
    def exposed_stop(self, session):
        return self._session_call("stop", session, {})

    @remote
    def exposed_activation(self, session, **args):
        array = self._session_call("activation", session, args)
        if array.nbytes < BULK_THRESHOLD:
            return array
        # large arrays take the raw-socket bulk path: rpyc moves ~0.02 GB/s of them
        offer = BulkTransfer(self.kernel.bulk_host, payload=memoryview(array).cast("B"),
                             tls=self.kernel.bulk_tls)
        return {"bulk": offer.describe(), "dtype": array.dtype.name, "shape": list(array.shape)}

    @remote
    def exposed_score(self, session, **args):
        return self._session_call("score", session, args)

    @remote
    def exposed_tokenize(self, session, **args):
        return self._session_call("tokenize", session, args)

    @remote
    def exposed_decode(self, session, **args):
        return self._session_call("decode", session, args)

    @remote
    def exposed_cache(self, session, **args):
        return self._session_call("cache", session, args)

    @remote
    def exposed_lens(self, session, **args):
        return self._session_call("lens", session, args)

    @remote
    def exposed_logit_lens(self, session, **args):
        return self._session_call("logit_lens", session, args)

    @remote
    def exposed_patch(self, session, **args):
        return self._session_call("patch", session, args)

    @remote
    def exposed_steering_vector(self, session, **args):
        return self._session_call("steering_vector", session, args)

    @remote
    def exposed_edit(self, session, **args):
        return self._session_call("edit", session, args)

    @remote
    def exposed_set_breakpoint(self, session, **args):
        return self._session_call("set_breakpoint", session, args)

    @remote
    def exposed_clear_breakpoints(self, session, **args):
        return self._session_call("clear_breakpoints", session, args)

    @remote
    def exposed_steer(self, session, **args):
        return self._session_call("steer", session, args)

    @remote
    def exposed_clear_steering(self, session, **args):
        return self._session_call("clear_steering", session, args)

    # ---- checkpoints -------------------------------------------------------------------
    @remote
    def exposed_checkpoint(self, session):
        sess = self.kernel.sessions.get(session, self.owner)
        return sess.checkpoint(self.kernel.checkpoints).describe()

    @remote
    def exposed_checkpoint_info(self, checkpoint, wait=False):
        ck = self.kernel.checkpoints.get(checkpoint, self.owner)
        if wait is True:
            ck.wait()
        return ck.describe()

    @remote
    def exposed_checkpoints(self):
        return self.kernel.checkpoints.list(self.owner)

    @remote
    def exposed_delete_checkpoint(self, checkpoint):
        self.kernel.checkpoints.delete(checkpoint, self.owner)

    @remote
    def exposed_restore(self, session, checkpoint):
        ck = self.kernel.checkpoints.get(checkpoint, self.owner)
        return self.kernel.sessions.get(session, self.owner).restore(ck)

    @remote
    def exposed_fork(self, checkpoint):
        ck = self.kernel.checkpoints.get(checkpoint, self.owner)
        sess = self.kernel.sessions.open(self.kernel.models.get(ck.model), self.owner)
        try:
            return sess.restore(ck)
        except BaseException:
            self.kernel.sessions.close(sess.id, self.owner)
            raise

    @remote
    def exposed_export_checkpoint(self, checkpoint):
        """Offer the checkpoint file on the bulk path; the client fetches it."""
        ck = self.kernel.checkpoints.get(checkpoint, self.owner)
        data = C.to_bytes(ck, self.kernel.models.get(ck.model))
        return {**BulkTransfer(self.kernel.bulk_host, payload=data,
                                 tls=self.kernel.bulk_tls).describe(), "nbytes": len(data)}

    @remote
    def exposed_begin_upload(self, nbytes):
        lim = self.kernel.limits
        limit = int(min(lim.max_upload_mb, lim.checkpoint_budget_mb) * 2**20)
        if type(nbytes) is not int or not 0 < nbytes <= limit:
            raise InvalidArgumentError(f"upload size must be 1..{limit} bytes, got {nbytes!r}")
        self._uploads = {k: t for k, t in self._uploads.items() if not t.expired}
        if len(self._uploads) >= 4:
            raise LimitExceededError("4 uploads are already waiting to be imported; "
                                     "import or let them expire first")
        transfer = BulkTransfer(self.kernel.bulk_host, max_bytes=nbytes, tls=self.kernel.bulk_tls)
        key = transfer.nonce.hex()
        self._uploads[key] = transfer
        return transfer.describe()

    @remote
    def exposed_import_checkpoint(self, upload, session=None):
        """Turn an uploaded checkpoint file into a checkpoint restored into ``session``
        (or a new session on the file's model)."""
        transfer = self._uploads.pop(upload, None) if isinstance(upload, str) else None
        if transfer is None:
            raise InvalidArgumentError("unknown upload id")
        data = transfer.result()
        meta = C.read_metadata(data)
        if session is not None:
            sess = self.kernel.sessions.get(session, self.owner)
            loaded = sess.loaded
        else:
            name = meta["identity"]["model"]
            try:
                loaded = self.kernel.models.get(name)
            except DjinnError as exc:
                raise CheckpointError(f"the checkpoint's model {name!r} cannot be loaded here: {exc}") from None
            sess = None
        ck = C.from_bytes(data, loaded, self.owner, self.kernel.limits)   # verified whole first
        opened = sess is None
        if opened:
            sess = self.kernel.sessions.open(loaded, self.owner)
        try:
            self.kernel.checkpoints.add(ck)
            try:
                info = sess.restore(ck)
            except BaseException:
                self.kernel.checkpoints.delete(ck.id, self.owner)
                raise
        except BaseException:            # leave nothing behind: no orphan session or checkpoint
            if opened:
                self.kernel.sessions.close(sess.id, self.owner)
            raise
        return {"checkpoint": ck.describe(), "session": info}
