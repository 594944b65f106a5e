"""The checkpoint file format, as far as both ends read it: a safetensors file whose
``__metadata__`` holds ``djinn`` (JSON: format, model identity, KV layout, versions, the
generation state) and ``sha256``. The server writes and fully verifies files; a client may
read the header (e.g. the KV layout and versions of a saved probe) without torch.
"""
from __future__ import annotations

import json
import struct

from .errors import CheckpointError

FORMAT = "djinn-checkpoint/1"
MAX_HEADER = 100 << 20


def read_header(data) -> dict:
    """The JSON header of a checkpoint (safetensors) file's bytes: tensor dtypes / shapes
    and ``__metadata__``; ``CheckpointError`` for anything that is not one."""
    if len(data) < 8:
        raise CheckpointError("not a djinn checkpoint: the file is too short")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > min(len(data) - 8, MAX_HEADER):
        raise CheckpointError("not a djinn checkpoint, or a truncated one: bad header length")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, RecursionError):
        raise CheckpointError("not a djinn checkpoint: unreadable header") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError("not a djinn checkpoint: the header is not a safetensors header")
    return header


def read_metadata(data) -> dict:
    """The djinn metadata of a checkpoint file's bytes (not verified: the server does that)."""
    meta = (read_header(data).get("__metadata__") or {}).get("djinn")
    if not meta or not isinstance(meta, str):
        raise CheckpointError("not a djinn checkpoint: no djinn metadata in the file")
    try:
        out = json.loads(meta)
        if not isinstance(out, dict) or not isinstance(out["identity"]["model"], str):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError("not a djinn checkpoint: unreadable metadata") from None
    return out
