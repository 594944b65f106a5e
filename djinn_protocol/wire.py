"""The one wire codec: plain builtins plus numpy arrays, as (json text, raw byte blobs).

rpyc's brine only moves simple immutable values by value; a list or dict would
travel as a netref (a live proxy back to the other side). Every argument and
result therefore crosses the connection as ``(str, tuple[bytes, ...])``:
JSON for the structure, one raw buffer per array, described by dtype and shape.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

#: dtypes an array may have on the wire (bfloat16 travels as float32).
WIRE_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64",
                         "uint8", "bool"})
_ARRAY_KEY = "__ndarray__"
#: a reply value that stands for an array offered on the bulk path: {key: {port, nonce}, dtype, shape}
BULK_ARRAY_KEY = "__bulk_array__"

Packed = tuple  # (str, tuple[bytes, ...])


def encode_array(array: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, raw little-endian C-order bytes) of ``array``."""
    array = np.asarray(array, order="C")   # (ascontiguousarray would make 0-d arrays 1-d)
    if array.dtype.name not in WIRE_DTYPES:
        raise InvalidArgumentError(f"arrays of dtype {array.dtype.name} cannot be sent; "
                                   f"use one of {sorted(WIRE_DTYPES)}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.dtype.name, tuple(int(n) for n in array.shape), array.tobytes()


def encode_array_view(array: np.ndarray) -> tuple[str, tuple[int, ...], memoryview]:
    """Like :func:`encode_array`, but the bytes are a flat view of the array's memory: no copy
    when it is already C-contiguous little-endian (the control channel sends it as is)."""
    array = np.asarray(array)
    if array.dtype.name not in WIRE_DTYPES:
        raise InvalidArgumentError(f"arrays of dtype {array.dtype.name} cannot be sent; "
                                   f"use one of {sorted(WIRE_DTYPES)}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return array.dtype.name, tuple(int(n) for n in array.shape), memoryview(flat)


def array_nbytes(dtype: Any, shape: Any) -> int:
    """Bytes of an array of ``dtype`` and ``shape`` as described on the wire (both checked)."""
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise InvalidArgumentError(f"array dtype {dtype!r} is not allowed on the wire")
    if (not isinstance(shape, (list, tuple)) or len(shape) > 8
            or not all(type(n) is int and 0 <= n < 2**40 for n in shape)):
        raise InvalidArgumentError(f"bad array shape {shape!r}")
    return math.prod(shape) * np.dtype(dtype).itemsize


def decode_array(dtype: str, shape: Any, data: Any) -> np.ndarray:
    """The array back from :func:`encode_array`'s parts, checked against each other."""
    expected = array_nbytes(dtype, shape)
    if type(data) is not bytes:
        raise InvalidArgumentError("array data must be bytes")
    if len(data) != expected:
        raise InvalidArgumentError(f"array of shape {tuple(shape)} and dtype {dtype} needs "
                                   f"{expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(tuple(shape))


_PLAIN = frozenset({str, int, float, bool, type(None)})   # exact types that go as they are


def _to_plain(obj: Any, blobs: list, views: bool = False) -> Any:
    t = type(obj)
    if t in _PLAIN:
        return obj
    if t is dict or t is list:     # the common case, without a call per plain value
        if t is list:
            return [v if type(v) in _PLAIN else _to_plain(v, blobs, views) for v in obj]
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(f"dict keys must be str, got {type(key).__name__}")
            out[key] = value if type(value) in _PLAIN else _to_plain(value, blobs, views)
        return out
    if isinstance(obj, (np.bool_, np.integer, np.floating)):   # (np.float64 is a float too)
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(f"dict keys must be str, got {type(key).__name__}")
            out[key] = _to_plain(value, blobs, views)
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v, blobs, views) for v in obj]
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        dtype, shape, data = (encode_array_view if views else encode_array)(np.asarray(obj))
        blobs.append(data)
        return {_ARRAY_KEY: len(blobs) - 1, "dtype": dtype, "shape": list(shape)}
    raise InvalidArgumentError(f"values of type {type(obj).__name__} cannot be sent")


def _from_plain(obj: Any, blobs: tuple) -> Any:
    if isinstance(obj, dict):
        if _ARRAY_KEY in obj:
            index = obj[_ARRAY_KEY]
            if type(index) is not int or not 0 <= index < len(blobs):
                raise InvalidArgumentError("array reference out of range")
            return decode_array(obj.get("dtype"), obj.get("shape"), blobs[index])
        return {k: _from_plain(v, blobs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_plain(v, blobs) for v in obj]
    return obj


def _encode(obj: Any, blobs: list, views: bool) -> str:
    try:
        return json.dumps(_to_plain(obj, blobs, views), separators=(",", ":"))
    except RecursionError:
        raise InvalidArgumentError("a value nested too deeply to send") from None


def pack(obj: Any) -> Packed:
    """``obj`` (builtins, dicts, lists, numpy arrays) as ``(json text, blobs)``."""
    blobs: list[bytes] = []
    return _encode(obj, blobs, False), tuple(blobs)


def unpack(packed: Any) -> Any:
    """The value back from :func:`pack`; anything that is not exactly that shape is refused."""
    if (type(packed) is not tuple or len(packed) != 2 or type(packed[0]) is not str
            or type(packed[1]) is not tuple or not all(type(b) is bytes for b in packed[1])):
        raise InvalidArgumentError("malformed request: expected (json text, tuple of bytes)")
    try:
        plain = json.loads(packed[0])
        return _from_plain(plain, packed[1])
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"malformed request: {str(exc)[:200]}") from None


# ---- zero-copy framing, used by the control channel (djinn_protocol.framing) -----------------
def pack_views(obj: Any) -> tuple[str, list[memoryview]]:
    """Like :func:`pack`, but each array's bytes are a view of its memory, not a copy."""
    blobs: list[memoryview] = []
    return _encode(obj, blobs, True), blobs


def array_specs(plain: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """The arrays a parsed :func:`pack_views` structure refers to, in blob order:
    ``(dtype, shape, nbytes)``, each checked; every blob index must appear exactly once."""
    found: dict[int, tuple] = {}

    def walk(obj):
        if isinstance(obj, dict):
            if _ARRAY_KEY in obj:
                index = obj[_ARRAY_KEY]
                if type(index) is not int or index in found or not 0 <= index < 2**20:
                    raise InvalidArgumentError("bad array reference")
                dtype, shape = obj.get("dtype"), obj.get("shape")
                found[index] = (dtype, tuple(shape) if isinstance(shape, list) else shape,
                                array_nbytes(dtype, shape))
                return
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)
    walk(plain)
    if sorted(found) != list(range(len(found))):
        raise InvalidArgumentError("array references must be 0..n-1")
    return [found[i] for i in range(len(found))]


def fill_arrays(plain: Any, arrays: list) -> Any:
    """``plain`` with each array placeholder replaced by ``arrays[index]``."""
    if isinstance(plain, dict):
        if _ARRAY_KEY in plain:
            return arrays[plain[_ARRAY_KEY]]
        return {k: fill_arrays(v, arrays) for k, v in plain.items()}
    if isinstance(plain, list):
        return [fill_arrays(v, arrays) for v in plain]
    return plain
