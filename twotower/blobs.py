"""Bytes for arrays and tables: msgpack with raw numpy buffers, never pickle.

Everything the publisher writes to Redis and the retriever reads back goes through these
pure functions, so a payload from the network can only ever become numbers and strings.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import numpy as np

from twotower.id_table import IdTable, IdTableError

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


def array_from_map(raw: object, copy: bool = True) -> np.ndarray:
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
    return {str(name): array_from_map(value) for name, value in raw.items()}


@dataclass(frozen=True)
class Rows:
    """A set of named rows: ``ids[i]`` owns ``matrix[i]`` (ids unique)."""

    ids: Sequence[str]
    matrix: np.ndarray

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2 or self.matrix.shape[0] != len(self.ids):
            raise BlobError(f"{len(self.ids)} ids for a matrix of shape {self.matrix.shape}")

    @staticmethod
    def empty(dim: int) -> Rows:
        return Rows([], np.zeros((0, dim), dtype=np.float32))


def pack_rows(rows: Rows) -> bytes:
    """msgpack bytes of the ids (as an :class:`~twotower.id_table.IdTable`) and their float32 matrix.

    Raises:
        BlobError: duplicate ids, or ids that are empty or contain NUL.
    """
    try:
        table = IdTable.of(rows.ids).to_map()
    except IdTableError as exc:
        raise BlobError(f"row ids: {exc}") from None
    ids = {"ranked": _array_map(table["ranked"]), "order": _array_map(table["order"]), "long": table["long"]}
    return msgpack.packb(
        {"ids": ids, "matrix": _array_map(rows.matrix.astype(np.float32, copy=False))}, use_bin_type=True
    )


def unpack_rows(payload: bytes) -> Rows:
    """Inverse of :func:`pack_rows` (the ids as a list, the matrix copied).

    Raises:
        BlobError: corrupt payload or ids that do not match the matrix.
    """
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise BlobError(f"not msgpack: {exc}") from None
    rows = _rows(raw, copy=True)
    return Rows(cast(IdTable, rows.ids).tolist(), rows.matrix)


def _rows(raw: object, copy: bool) -> Rows:
    """The rows of a decoded rows map, ids as an :class:`~twotower.id_table.IdTable`."""
    if not isinstance(raw, dict) or set(raw) != {"ids", "matrix"}:
        raise BlobError("not a rows map")
    ids = raw["ids"]
    if not isinstance(ids, dict) or set(ids) != {"ranked", "order", "long"}:
        raise BlobError("row ids are not an id table")
    try:
        table = IdTable.from_map(array_from_map(ids["ranked"], copy), array_from_map(ids["order"], copy), ids["long"])
    except IdTableError as exc:
        raise BlobError(f"row ids: {exc}") from None
    return Rows(table, array_from_map(raw["matrix"], copy))


UNPACK_READ_SIZE = 1 << 20
MAX_DEPTH = 8
"""Deepest nesting :func:`unpack_rows_gently` reads (a rows map has three levels)."""


def unpack_rows_gently(payload: bytes | memoryview | np.ndarray | mmap.mmap) -> Rows:
    """:func:`unpack_rows` without copies and without holding the GIL for long (the retriever
    decodes a full version's big rows parts with it, beside the thread that answers requests).

    ``msgpack.unpackb`` copies every bin value into a bytes object: one memcpy of a 256 MB
    matrix holds the GIL (measured: a 150 ms stall of the request thread at 1M items). Here
    every bin value (the matrix, the id bytes and order) comes out as a memoryview of
    ``payload`` (see :class:`_TreeReader`): the ids stay an :class:`~twotower.id_table.IdTable`
    over the payload and the matrix a read-only view of it.

    Raises:
        BlobError: the payload is not a rows map.
    """
    reader = _TreeReader(memoryview(payload).cast("B"))
    try:
        raw = reader.value()
        if reader.position() != len(reader.view):
            raise BlobError("trailing bytes after the rows map")
    except BlobError:
        raise
    except Exception as exc:
        raise BlobError(f"not msgpack rows: {exc}") from None
    return _rows(raw, copy=False)


_BIN_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4}
"""msgpack bin8/bin16/bin32 type bytes → width of the big-endian length that follows."""


def _container(head: int) -> str | None:
    """``map`` / ``array`` when the msgpack type byte ``head`` starts one."""
    if 0x80 <= head <= 0x8F or head in (0xDE, 0xDF):
        return "map"
    if 0x90 <= head <= 0x9F or head in (0xDC, 0xDD):
        return "array"
    return None


class _TreeReader:
    """Reads msgpack values from ``view`` with every bin value a memoryview of ``view``.

    A streaming unpacker is fed the bytes in 1 MiB pieces for everything but bin values
    (map and array headers, keys, numbers, strings). At a bin value the reader takes its
    header from ``view``, returns the slice, and starts a fresh unpacker after it: the value's
    bytes are never fed, copied or hashed here.
    """

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self._start(0)

    def _start(self, offset: int) -> None:
        self._base = self._fed = offset
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(UNPACK_READ_SIZE, len(self.view)))

    def position(self) -> int:
        """Offset in ``view`` of the next value."""
        return self._base + self._unpacker.tell()

    def _read(self, reader: Callable[[], Any]) -> Any:
        while True:
            try:
                return reader()
            except msgpack.OutOfData:
                if self._fed >= len(self.view):
                    raise BlobError("truncated payload") from None
                self._unpacker.feed(self.view[self._fed : self._fed + UNPACK_READ_SIZE])
                self._fed += UNPACK_READ_SIZE

    def value(self, depth: int = 0) -> Any:
        """The next value; maps and arrays are read element by element."""
        pos = self.position()
        if pos >= len(self.view):
            raise BlobError("truncated payload")
        head = self.view[pos]
        kind = _container(head)
        if kind is not None:
            if depth >= MAX_DEPTH:
                raise BlobError("payload nested too deeply")
            unpacker = self._unpacker
            if kind == "array":
                return [self.value(depth + 1) for _ in range(self._read(unpacker.read_array_header))]
            out: dict[Any, Any] = {}
            for _ in range(self._read(unpacker.read_map_header)):
                key = self._read(self._unpacker.unpack)
                out[key] = self.value(depth + 1)
            return out
        width = _BIN_HEADERS.get(head)
        if width is None:
            return self._read(self._unpacker.unpack)
        start = pos + 1 + width
        length = int.from_bytes(self.view[pos + 1 : start], "big")
        if start > len(self.view) or start + length > len(self.view):
            raise BlobError("truncated bin value")
        self._start(start + length)
        return self.view[start : start + length]


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
