"""The request path's cache of Redis reads (retriever.tracked_cache): bookkeeping only."""

from __future__ import annotations

import asyncio

from retriever.tracked_cache import ENTRY_OVERHEAD_BYTES, MISSING, TrackedCache, reply_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cache(max_bytes: int = 10_000, max_age_s: float = 60.0) -> tuple[TrackedCache, list[str], Clock]:
    events: list[str] = []
    clock = Clock()
    return TrackedCache(max_bytes, max_age_s, note=events.append, clock=clock), events, clock


def test_a_reply_is_served_for_the_same_command_only() -> None:
    cache, events, _ = _cache()
    assert cache.get(b"h:1", b"LRANGE h:1 0 99") is MISSING
    cache.put(b"h:1", b"LRANGE h:1 0 99", [b"a", b"b"])
    assert cache.get(b"h:1", b"LRANGE h:1 0 99") == [b"a", b"b"]
    assert cache.get(b"h:1", b"LRANGE h:1 0 9") is MISSING  # another command on the key
    cache.put(b"p:1", b"GET p:1", None)  # a missing key is an answer too
    assert cache.get(b"p:1", b"GET p:1") is None
    assert events == ["miss", "hit", "miss", "hit"]


def test_invalidation_drops_the_named_keys_or_everything() -> None:
    cache, events, _ = _cache()
    for i in range(3):
        cache.put(f"k{i}".encode(), f"GET k{i}".encode(), b"v")
    cache.invalidate([b"k0", b"unknown"])
    assert cache.get(b"k0", b"GET k0") is MISSING and cache.get(b"k1", b"GET k1") == b"v"
    assert events.count("invalidated") == 1  # a key it did not hold is no event
    cache.invalidate(None)
    assert len(cache) == 0 and cache.bytes == 0 and "flushed" in events


def test_least_recently_used_entries_go_beyond_the_byte_bound() -> None:
    size = ENTRY_OVERHEAD_BYTES + len(b"k0") + len(b"GET k0") + reply_bytes(b"x" * 100)
    cache, events, _ = _cache(max_bytes=3 * size)
    for i in range(3):
        cache.put(f"k{i}".encode(), f"GET k{i}".encode(), b"x" * 100)
    assert cache.bytes == 3 * size
    cache.get(b"k0", b"GET k0")  # k0 is now the most recently used: k1 goes first
    cache.put(b"k3", b"GET k3", b"x" * 100)
    assert cache.get(b"k1", b"GET k1") is MISSING
    assert all(cache.get(k, b"GET " + k) == b"x" * 100 for k in (b"k0", b"k2", b"k3"))
    assert events.count("evicted") == 1 and cache.bytes == 3 * size
    cache.put(b"big", b"GET big", b"x" * (4 * size))  # larger than the whole cache: not kept
    assert cache.get(b"big", b"GET big") is MISSING and len(cache) == 3


def test_replacing_an_entry_keeps_the_byte_count_exact() -> None:
    cache, _, _ = _cache()
    cache.put(b"k", b"GET k", b"x" * 10)
    cache.put(b"k", b"GET k", [b"y" * 50, b"z"])
    assert cache.bytes == ENTRY_OVERHEAD_BYTES + len(b"k") + len(b"GET k") + reply_bytes([b"y" * 50, b"z"])
    cache.invalidate([b"k"])
    assert cache.bytes == 0


def test_an_entry_older_than_max_age_is_not_served() -> None:
    cache, _, clock = _cache(max_age_s=5.0)
    cache.put(b"k", b"GET k", b"v")
    clock.now = 5.0
    assert cache.get(b"k", b"GET k") == b"v"
    clock.now = 5.1
    assert cache.get(b"k", b"GET k") is MISSING


class _Transport:
    """Just enough of an asyncio transport for a _Connection fed by hand."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


INVALIDATE_K = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
REPLY_V = b"$1\r\nv\r\n"


def _fed(data: bytes) -> tuple[TrackedCache, object]:
    """A tracking connection with one read of key ``k`` in flight, then ``data`` arriving in one
    chunk; the cache and the read's result."""
    from retriever.resp import _Connection

    loop = asyncio.new_event_loop()
    try:
        conn = _Connection()
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        conn.cache = TrackedCache(1 << 20, 60.0)
        future = conn.send(b"GET k", 1, loop, fills=[(0, b"k", b"GET k")])
        conn.data_received(data)
        return conn.cache, future.result()
    finally:
        loop.close()


def test_an_invalidation_after_a_reply_drops_it_even_in_the_same_chunk() -> None:
    # Redis modified the key after answering: the reply must not stay cached
    cache, result = _fed(REPLY_V + INVALIDATE_K)
    assert result == [b"v"]
    assert cache.get(b"k", b"GET k") is MISSING


def test_an_invalidation_before_a_reply_leaves_the_newer_reply_cached() -> None:
    # the invalidation was for an earlier read; the reply already holds the new value
    cache, result = _fed(INVALIDATE_K + REPLY_V)
    assert result == [b"v"]
    assert cache.get(b"k", b"GET k") == b"v"
