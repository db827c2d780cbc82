"""Bytes for arrays and tables: msgpack with raw numpy buffers, never pickle.

Everything the publisher writes to Redis and the retriever reads back goes through these
pure functions, so a payload from the network can only ever become numbers and strings.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    return Rows(ids, array_from_map(raw["matrix"]))


UNPACK_READ_SIZE = 1 << 20


ID_BATCH = 1024
"""Ids decoded per C call by :func:`unpack_rows_gently`: each call holds the GIL for well under
a ms (16,384 per call measured worse: a 1 ms ticker thread's p99 GIL wait 13-14 ms, against 8 ms)."""


def unpack_rows_gently(payload: bytes | memoryview | np.ndarray | mmap.mmap) -> Rows:
    """:func:`unpack_rows`, without holding the GIL for long (the retriever decodes a full
    version's big rows parts with it, beside the thread that answers requests).

    ``msgpack.unpackb`` over a million ids is one C call that holds the GIL for more than a
    second (measured 1.3 s at 1M items on a busy 2-core machine), stalling the request thread
    of the process for as long. Here a streaming unpacker is fed the payload in 1 MiB pieces
    and the ids are decoded :data:`ID_BATCH` per call by the unpacker's own iterator (1M ids in
    about a fifth of the CPU of one call each), so the interpreter can hand the GIL to the
    request thread between them. The matrix stays a read-only view of ``payload`` (no copy).

    Raises:
        BlobError: the payload is not a rows map.
    """
    size = max(len(payload), UNPACK_READ_SIZE)
    # read_size is the initial buffer: the whole payload, so the buffer never regrows (copies)
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=size, read_size=size)
    view = memoryview(payload).cast("B")
    fed = 0

    def feed() -> None:
        nonlocal fed
        if fed >= len(view):
            raise BlobError("truncated rows payload")
        unpacker.feed(view[fed : fed + UNPACK_READ_SIZE])
        fed += UNPACK_READ_SIZE

    def read(reader: Callable[[], Any]) -> Any:
        while True:
            try:
                return reader()
            except msgpack.OutOfData:
                feed()

    def read_ids() -> list[Any]:
        n = read(unpacker.read_array_header)
        out: list[Any] = []
        while len(out) < n:
            before = len(out)
            out.extend(itertools.islice(unpacker, min(ID_BATCH, n - len(out))))  # stops when out of data
            if len(out) == before:
                feed()
        return out

    ids: list[Any] | None = None
    matrix: object = None
    try:
        n_keys = read(unpacker.read_map_header)
        if n_keys != 2:
            raise BlobError("not a rows map")
        for _ in range(n_keys):
            key = read(unpacker.unpack)
            if key == "ids" and ids is None:
                ids = read_ids()
            elif key == "matrix" and matrix is None:
                matrix = read_array_map(read, unpacker, view)
            else:
                raise BlobError("not a rows map")
        if fed < len(view) or unpacker.tell() != len(view):
            raise BlobError("trailing bytes after the rows map")
    except BlobError:
        raise
    except Exception as exc:
        raise BlobError(f"not msgpack rows: {exc}") from None
    assert ids is not None
    if not all(isinstance(i, str) for i in ids):
        raise BlobError("row ids must be strings")
    # the same checks as unpack_rows (Rows checks the shapes)
    return Rows(ids, array_from_map(matrix, copy=False))


_BIN_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4}
"""msgpack bin8/bin16/bin32 type bytes → width of the big-endian length that follows."""


def read_array_map(read: Callable[[Callable[[], Any]], Any], unpacker: msgpack.Unpacker, view: memoryview) -> dict:
    """An array map (``dtype``, ``shape``, ``data``) read from ``unpacker`` with ``data`` as a
    memoryview of ``view`` rather than a bytes object: building a 256 MB bytes object is one
    memcpy inside msgpack that holds the GIL (measured: a 150 ms stall of the request thread
    at 1M items). The data's bin header is read from ``view`` at the unpacker's position and
    the value itself is skipped."""
    out: dict[str, Any] = {}
    for _ in range(read(unpacker.read_map_header)):
        key = read(unpacker.unpack)
        if key != "data" or key in out:
            out[key] = read(unpacker.unpack)
            continue
        pos = unpacker.tell()
        width = _BIN_HEADERS.get(view[pos]) if pos < len(view) else None
        if width is None:
            raise BlobError("array data is not msgpack bin")
        length = int.from_bytes(view[pos + 1 : pos + 1 + width], "big")
        start = pos + 1 + width
        if start + length > len(view):
            raise BlobError("truncated array data")
        read(unpacker.skip)
        out[key] = view[start : start + length]
    return out


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
