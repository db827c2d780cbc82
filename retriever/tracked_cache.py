"""Replies a worker read from Redis, kept until Redis says their key changed.

Redis's server-assisted client-side caching (``CLIENT TRACKING``): a connection that turned
tracking on is told, by a RESP3 *push* message on that same connection, whenever a key it read
is modified afterwards (or all keys, after a flush or when the server's tracking table is full).
:class:`retriever.resp.RespClient` keeps the replies of the reads it is asked to cache here and
drops them on those messages, so a user's history and profile cost a Redis round trip only when
they changed since this worker last read them, or fell out of the cache.

Why no reply can be kept after its invalidation: Redis writes replies and push messages of one
connection in the order it produced them, and the connection's reader handles them in that
order, storing a reply here the moment it is parsed (before it reads whatever came after it). A
modification after a read reaches this cache after that read's reply; one before the read is
already in the reply. What the cache cannot see is a connection that died: its invalidations are
lost, so the client clears the cache whenever a tracking connection ends, and ``max_age_s``
bounds what a silent failure could serve.

Pure bookkeeping, no I/O: the client feeds it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

ENTRY_OVERHEAD_BYTES = 200
"""Rough bytes of the Python objects around one entry (tuple, keys, list headers)."""

MISSING = object()
"""What :meth:`TrackedCache.get` returns for a key it does not hold."""

EVENTS = ("hit", "miss", "invalidated", "evicted", "flushed")
"""What :class:`TrackedCache` reports through its ``note`` callback: a lookup answered or not, an
entry dropped because Redis said its key changed or to make room, the whole cache dropped."""


def _ignore(_event: str) -> None:
    return None


def reply_bytes(reply: Any) -> int:
    """A rough size of a parsed reply: the bytes it holds plus a pointer per list element."""
    if isinstance(reply, bytes | bytearray):
        return len(reply)
    if isinstance(reply, list):
        return sum(8 + reply_bytes(item) for item in reply)
    return 8


class TrackedCache:
    """Replies of read commands, one per Redis key, least recently used evicted beyond ``max_bytes``.

    Each entry remembers the exact command it answers (the packed bytes), so another command on
    the same key is a miss rather than a wrong answer.
    """

    def __init__(
        self,
        max_bytes: int,
        max_age_s: float,
        note: Callable[[str], object] = _ignore,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._note = note
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[bytes, Any, int, float]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, packed: bytes) -> Any:
        """The cached reply of ``packed`` (a command reading ``key``), or :data:`MISSING`."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != packed or self._clock() - entry[3] > self.max_age_s:
            self._note("miss")
            return MISSING
        self._entries.move_to_end(key)
        self._note("hit")
        return entry[1]

    def put(self, key: bytes, packed: bytes, reply: Any) -> None:
        """Keep ``reply`` as the answer of ``packed``; call it when the reply is parsed, in order."""
        size = ENTRY_OVERHEAD_BYTES + len(key) + len(packed) + reply_bytes(reply)
        if size > self.max_bytes:
            return
        self._drop(key)
        self._entries[key] = (packed, reply, size, self._clock())
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, dropped, _) = self._entries.popitem(last=False)
            self.bytes -= dropped
            self._note("evicted")

    def invalidate(self, keys: Iterable[bytes] | None) -> None:
        """Redis says ``keys`` changed (``None``: every key, e.g. after FLUSHALL)."""
        if keys is None:
            self.clear()
            return
        for key in keys:
            if self._drop(key):
                self._note("invalidated")

    def clear(self) -> None:
        """Forget everything (a tracking connection ended: its invalidations are lost)."""
        if self._entries:
            self._note("flushed")
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: bytes) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.bytes -= entry[2]
        return True
