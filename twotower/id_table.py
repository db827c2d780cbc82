"""Ids as numpy bytes: position ↔ id without a Python object per id.

A catalogue of a million items held as a Python list and dict is two million objects built one
by one in every retriever process for every full version: about 1 s of CPU, and dict resizes
that hold the GIL for tens of ms at a time while the process is answering requests (measured
at 1M ids). An :class:`IdTable` is arrays instead — the ids as fixed-width UTF-8 bytes in
sorted order, and the position of each — that the publisher computes once and the retriever
maps as they are (adding only the inverse permutation): id → position is a binary search
(``np.searchsorted``), position → id two array indexes, both vectorised over a request's ids.
(``searchsorted`` over ids by position with the order as ``sorter`` would spare the sorted copy,
but numpy checks the sorter's bounds on every call: 0.8 ms per lookup at 1M ids, measured.)

The width is that of all but the longest 0.1 % of ids; those few (``long``) are kept apart in
a dict, so one odd id cannot widen every row. Their rows are empty (an id is never empty).
Ids never contain NUL (the event schema refuses it): numpy's fixed-width bytes strip
trailing NULs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

LONG_ID_SHARE = 0.001
"""At most this share of the ids is longer than the table's width (kept in a dict instead)."""
MEMO_MAX = 1 << 18
"""Lookups a table remembers in each direction (dicts, emptied when full): the ids a retriever
is asked about again and again (popular items, active users) cost a dict lookup, not a search
(which costs about 1 µs per id at 1M ids plus a few µs per call, measured)."""
REMEMBER_BLOCK = 1024
"""Keys :meth:`IdTable.remember` searches per numpy call (each holds the GIL for about 1 ms)."""
CHECK_BLOCK = 1 << 16
"""Ids checked per numpy call when a table is read (each call holds the GIL for well under 1 ms)."""
_UNKNOWN = -2


class IdTableError(ValueError):
    """Ids that cannot form a table (duplicates, empty or NUL-bearing ids), or a corrupt table."""


def _encode(key: str) -> bytes | None:
    """The UTF-8 bytes of a lookup key; ``None`` for a key no table can hold."""
    try:
        raw = key.encode()
    except (UnicodeEncodeError, AttributeError):
        return None
    return raw if raw and b"\0" not in raw else None


class IdTable(Sequence[str]):
    """Unique string ids by position, looked up both ways without per-id Python objects.

    Build one with :meth:`of`; :meth:`to_map` / :meth:`from_map` are its msgpack-ready form.

    Args:
        ranked: ``[n]`` fixed-width bytes (dtype ``S<width>``), the ids in sorted order (the
            long ids' empty rows first).
        order: ``[n]`` the position of each of ``ranked``.
        long: position → id of the ids longer than the width.
    """

    __slots__ = ("_ids", "_long_by_id", "_long_by_pos", "_order", "_positions", "_rank", "_ranked")

    def __init__(self, ranked: np.ndarray, order: np.ndarray, long: dict[int, str]) -> None:
        self._ranked = ranked
        self._order = order
        self._rank = np.empty(0, dtype=order.dtype)
        self._long_by_pos = long
        self._long_by_id = {item_id: pos for pos, item_id in long.items()}
        self._positions: dict[str, int] = {}  # remembered lookups (-1: absent); the table never changes
        self._ids: dict[int, str] = {}

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def of(cls, ids: Iterable[str]) -> IdTable:
        """The table of ``ids`` (positions in the order given).

        Raises:
            IdTableError: a duplicate, empty, NUL-bearing or non-string id.
        """
        if isinstance(ids, IdTable):
            return ids
        raw = []
        for item_id in ids:
            encoded = _encode(item_id) if isinstance(item_id, str) else None
            if encoded is None:
                raise IdTableError(f"id {item_id!r} is not a non-empty string without NUL")
            raw.append(encoded)
        lengths = np.fromiter((len(r) for r in raw), dtype=np.int64, count=len(raw))
        width = int(np.quantile(lengths, 1.0 - LONG_ID_SHARE, method="higher")) if len(raw) else 1
        long = {pos: r.decode() for pos, r in enumerate(raw) if len(r) > width}
        for pos in long:
            raw[pos] = b""
        by_position = np.array(raw, dtype=f"S{width}")
        order = np.argsort(by_position, kind="stable").astype(np.int32 if len(raw) < 2**31 else np.int64)
        table = cls(by_position[order], order, long)
        table._check()
        return table

    def to_map(self) -> dict[str, Any]:
        """The table as msgpack-ready values: ``ranked`` ``[n, width]`` uint8 and ``order`` as
        arrays, ``long`` as ``[position, id]`` pairs."""
        n, width = len(self._ranked), self._ranked.dtype.itemsize
        return {
            "ranked": np.ascontiguousarray(self._ranked).view(np.uint8).reshape(n, width),
            "order": self._order,
            "long": [[pos, item_id] for pos, item_id in sorted(self._long_by_pos.items())],
        }

    @classmethod
    def from_map(cls, ranked: np.ndarray, order: np.ndarray, long: object) -> IdTable:
        """Inverse of :meth:`to_map` (the arrays are used as they are, not copied), checked:
        the ids must be strictly increasing (so unique) and ``order`` a permutation.

        Raises:
            IdTableError: the parts do not form a table.
        """
        if ranked.dtype != np.uint8 or ranked.ndim != 2 or ranked.shape[1] < 1:
            raise IdTableError(f"id bytes must be [n, width >= 1] uint8, got {ranked.dtype} {ranked.shape}")
        if order.dtype not in (np.int32, np.int64) or order.shape != (ranked.shape[0],):
            raise IdTableError(f"id order must be [{ranked.shape[0]}] int32/int64, got {order.dtype} {order.shape}")
        if not isinstance(long, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and isinstance(pair[1], str)
            for pair in long
        ):
            raise IdTableError("long ids must be [position, id] pairs")
        n = ranked.shape[0]
        long_by_pos = {pos: item_id for pos, item_id in long}
        if len(long_by_pos) != len(long) or any(not 0 <= pos < n for pos in long_by_pos):
            raise IdTableError("long id positions must be distinct positions of the table")
        table = cls(ranked.reshape(-1).view(f"S{ranked.shape[1]}"), order, long_by_pos)
        table._check()
        return table

    def _check(self) -> None:
        """Validate the table and compute the rank of each position (vectorised: 1M ids in
        tens of ms)."""
        ranked, order, width = self._ranked, self._order, self._ranked.dtype.itemsize
        n, n_long = len(ranked), len(self._long_by_pos)
        if len(self._long_by_id) != n_long:
            raise IdTableError("duplicate long ids")
        if any(_encode(item_id) is None or len(item_id.encode()) <= width for item_id in self._long_by_id):
            raise IdTableError("a long id fits the table's width or is not a valid id")
        if n == 0:
            return
        rank = np.full(n, -1, dtype=order.dtype)
        # in blocks: numpy holds the GIL through these, and a retriever checks a table beside
        # the thread that answers requests
        for start in range(0, n, CHECK_BLOCK):
            block = order[start : start + CHECK_BLOCK]
            if int(block.min()) < 0 or int(block.max()) >= n:
                raise IdTableError("id order names positions outside the table")
            rank[block] = np.arange(start, start + len(block), dtype=order.dtype)
        for start in range(0, n, CHECK_BLOCK):
            if int(rank[start : start + CHECK_BLOCK].min()) < 0:
                raise IdTableError("id order repeats a position")
        # the long ids' empty rows first, then every id strictly above the one before
        if n_long and (ranked[n_long - 1] != b"" or set(order[:n_long].tolist()) != set(self._long_by_pos)):
            raise IdTableError("the long ids' rows are not the first in id order")
        if n > n_long and ranked[n_long] == b"":
            raise IdTableError("an empty id")
        for start in range(n_long, n - 1, CHECK_BLOCK):
            end = min(start + CHECK_BLOCK, n - 1)
            if not bool(np.all(ranked[start + 1 : end + 1] > ranked[start:end])):
                raise IdTableError("ids are not unique and sorted")
        self._rank = rank

    # --- lookups ----------------------------------------------------------------------------
    def position(self, key: str) -> int | None:
        """The position of ``key``, ``None`` when absent."""
        return self.positions([key])[0]

    def positions(self, keys: Sequence[str]) -> list[int | None]:
        """The position of each key (``None`` where absent): remembered answers first, the
        rest in one vectorised search."""
        memo = self._positions
        found = [memo.get(key, _UNKNOWN) for key in keys]
        if _UNKNOWN in found:
            missed = [i for i, pos in enumerate(found) if pos == _UNKNOWN]
            searched = self._search([keys[i] for i in missed])
            if len(memo) + len(missed) > MEMO_MAX:
                memo.clear()
            for i, pos in zip(missed, searched, strict=True):
                found[i] = memo[keys[i]] = pos
        return [pos if pos >= 0 else None for pos in found]

    def remember(self, keys: Sequence[str]) -> None:
        """Look ``keys`` up now, in blocks, so that later lookups of them (and of the ids at
        their positions) cost a dict lookup: a delta's ids are looked up this way before it is
        applied one id at a time."""
        keys = keys[:MEMO_MAX]
        if len(self._positions) + len(keys) > MEMO_MAX:
            self._positions.clear()
            self._ids.clear()
        for start in range(0, len(keys), REMEMBER_BLOCK):
            block = keys[start : start + REMEMBER_BLOCK]
            found = self._search(block)
            self._positions.update(zip(block, found, strict=True))
            self._ids.update((pos, key) for key, pos in zip(block, found, strict=True) if pos >= 0)

    def _search(self, keys: Sequence[str]) -> list[int]:
        """The position of each key, -1 where absent (no memo)."""
        n = len(self._ranked)
        if n == 0 or not keys:
            return [-1] * len(keys)
        width = self._ranked.dtype.itemsize
        try:
            probes = [key.encode() for key in keys]
        except (UnicodeEncodeError, AttributeError):
            probes = [_encode(key) or b"" for key in keys]
        # the usual case, every key of a width the table can hold, needs no per-key Python
        if min(map(len, probes)) == 0 or max(map(len, probes)) > width or b"\0" in b"".join(probes):
            return self._search_one_by_one(keys)
        wanted = np.array(probes, dtype=self._ranked.dtype)
        found = np.minimum(np.searchsorted(self._ranked, wanted), n - 1)
        return np.where(self._ranked[found] == wanted, self._order[found], -1).tolist()

    def _search_one_by_one(self, keys: Sequence[str]) -> list[int]:
        """:meth:`_search` for keys among which some are long or not ids at all."""
        out = [-1] * len(keys)
        width = self._ranked.dtype.itemsize
        short: list[int] = []
        for i, key in enumerate(keys):
            raw = _encode(key)
            if raw is not None and len(raw) > width:
                out[i] = self._long_by_id.get(key, -1)
            elif raw is not None:
                short.append(i)
        if short:
            for i, pos in zip(short, self._search([keys[i] for i in short]), strict=True):
                out[i] = pos
        return out

    def ids_at(self, positions: Sequence[int]) -> list[str]:
        """The ids at ``positions`` (each in ``0..len-1``): remembered answers first, the rest
        read in one vectorised gather."""
        memo = self._ids
        out = [memo.get(pos, "") for pos in positions]
        if "" in out:
            missed = [i for i, item_id in enumerate(out) if not item_id]
            if len(memo) + len(missed) > MEMO_MAX:
                memo.clear()
            raw = self._ranked[self._rank[np.asarray([positions[i] for i in missed], dtype=np.int64)]].tolist()
            for i, item_bytes in zip(missed, raw, strict=True):
                pos = positions[i]
                out[i] = memo[pos] = item_bytes.decode() if item_bytes else self._long_by_pos[pos]
        return out

    def tolist(self) -> list[str]:
        """Every id, by position (one Python string each: for small tables and tests)."""
        return self.ids_at(range(len(self)))  # type: ignore[arg-type]

    # --- Sequence ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ranked)

    @overload
    def __getitem__(self, pos: int) -> str: ...
    @overload
    def __getitem__(self, pos: slice) -> list[str]: ...
    def __getitem__(self, pos: int | slice) -> str | list[str]:
        if isinstance(pos, slice):
            return self.ids_at(range(*pos.indices(len(self))))  # type: ignore[arg-type]
        n = len(self._ranked)
        if not -n <= pos < n:
            raise IndexError(pos)
        pos %= n
        return self.ids_at([pos])[0]

    def __iter__(self) -> Iterator[str]:
        step = 4096
        for start in range(0, len(self), step):
            yield from self.ids_at(range(start, min(start + step, len(self))))  # type: ignore[arg-type]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.position(key) is not None

    def __repr__(self) -> str:
        return f"IdTable({len(self)} ids, width {self._ranked.dtype.itemsize}, {len(self._long_by_pos)} long)"
