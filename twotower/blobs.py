"""Bytes for arrays and tables: msgpack with raw numpy buffers, never pickle.

Everything the publisher writes to Redis and the retriever reads back goes through these
pure functions, so a payload from the network can only ever become numbers and strings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

_ALLOWED_DTYPES = {"float32", "float16", "int64", "int32", "uint8"}


class BlobError(ValueError):
    """A payload that is corrupt, truncated or of an unexpected type."""


def checksum(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _array_map(array: np.ndarray) -> dict[str, object]:
    array = np.ascontiguousarray(array)
    if array.dtype.name not in _ALLOWED_DTYPES:
        raise BlobError(f"dtype {array.dtype} is not allowed in a blob")
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes()}


def _array_from_map(raw: object, copy: bool = True) -> np.ndarray:
    """The array of an array map; ``copy=False`` gives a read-only view of ``data`` (bytes or a
    memoryview of them) instead of a copy."""
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data"}:
        raise BlobError("not an array map")
    dtype, shape, data = raw["dtype"], raw["shape"], raw["data"]
    if dtype not in _ALLOWED_DTYPES or not isinstance(data, (bytes, memoryview)):
        raise BlobError(f"bad array dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise BlobError("bad array shape")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise BlobError(f"array data has {len(data)} bytes, shape {shape} {dtype} needs {expected}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.copy() if copy else array


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """msgpack bytes of named arrays."""
    return msgpack.packb({name: _array_map(a) for name, a in arrays.items()}, use_bin_type=True)


def unpack_arrays(payload: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays`.

    Raises:
        BlobError: the payload is not a map of arrays.
    """
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise BlobError(f"not msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise BlobError("not a map of arrays")
    return {str(name): _array_from_map(value) for name, value in raw.items()}


@dataclass(frozen=True)
class Rows:
    """A set of named rows: ``ids[i]`` owns ``matrix[i]``."""

    ids: list[str]
    matrix: np.ndarray

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2 or self.matrix.shape[0] != len(self.ids):
            raise BlobError(f"{len(self.ids)} ids for a matrix of shape {self.matrix.shape}")

    @staticmethod
    def empty(dim: int) -> Rows:
        return Rows([], np.zeros((0, dim), dtype=np.float32))


def pack_rows(rows: Rows) -> bytes:
    """msgpack bytes of ids and their float32 matrix."""
    return msgpack.packb(
        {"ids": list(rows.ids), "matrix": _array_map(rows.matrix.astype(np.float32, copy=False))},
        use_bin_type=True,
    )


def unpack_rows(payload: bytes) -> Rows:
    """Inverse of :func:`pack_rows`.

    Raises:
        BlobError: corrupt payload or ids that do not match the matrix.
    """
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise BlobError(f"not msgpack: {exc}") from None
    if not isinstance(raw, dict) or set(raw) != {"ids", "matrix"}:
        raise BlobError("not a rows map")
    ids = raw["ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BlobError("row ids must be strings")
    return Rows(ids, _array_from_map(raw["matrix"]))


def pack_strings(values: Sequence[str]) -> bytes:
    """msgpack bytes of a list of strings."""
    return msgpack.packb(list(values), use_bin_type=True)


def unpack_strings(payload: bytes) -> list[str]:
    """Inverse of :func:`pack_strings`."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise BlobError(f"not msgpack: {exc}") from None
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise BlobError("not a list of strings")
    return raw
