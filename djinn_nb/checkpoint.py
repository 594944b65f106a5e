"""``Checkpoint``: a handle on a snapshot of generation state kept by the kernel server."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path



class Checkpoint:
    """A server-side snapshot (KV cache, tokens, step, RNG, rules, breakpoints).

    ``session.checkpoint()`` returns it at once; the device-to-host copy may still run:
    ``ready()`` tells, ``wait()`` blocks until it is done."""

    def __init__(self, client, info: dict):
        self.client = client
        self._info = info
        self.id: str = info["id"]
        self.model: str = info["model"]
        self.step: int = info["step"]
        self.positions: int = info["positions"]
        self.nbytes: int = info["nbytes"]          # host memory held: KV cache + logit rows
        self.kv_nbytes: int = info["kv_nbytes"]    # the KV cache alone
        self.dispatch_ms: float = info.get("dispatch_ms", 0.0)

    def ready(self) -> bool:
        """True once the copy to host memory has finished."""
        return self.client.call("checkpoint_info", checkpoint=self.id)["ready"]

    def wait(self) -> "Checkpoint":
        """Block until the copy has finished."""
        self.client.call("checkpoint_info", checkpoint=self.id, wait=True)
        return self

    def save(self, path) -> Path:
        """Write the checkpoint to ``path`` on this machine (safetensors + JSON metadata),
        fetched over the bulk path; written to a temporary file first, then renamed."""
        path = Path(path)
        data = self.client.fetch_bulk(self.client.call("export_checkpoint", checkpoint=self.id))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".djckpt-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return path

    def delete(self) -> None:
        """Free the checkpoint's host memory on the server."""
        self.client.call("delete_checkpoint", checkpoint=self.id)

    def __repr__(self):
        return (f"<djinn_nb.Checkpoint {self.id} {self.model} step {self.step}, "
                f"{self.positions} positions, {self.nbytes / 2**20:.2f} MiB>")
