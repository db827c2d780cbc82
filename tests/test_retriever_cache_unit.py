"""The retriever's per-process item-details cache: hits, expiry, eviction, invalidation on swaps."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from retriever.app import ItemDetailsCache


def state(base: int, changed: frozenset[str] | None) -> Any:
    return SimpleNamespace(base=base, changed_items=changed)


def test_hits_misses_and_expiry() -> None:
    cache = ItemDetailsCache(ttl_s=10.0)
    cached, missing = cache.get(["a", "b"], now=0.0)
    assert cached == [None, None] and missing == [0, 1]
    cache.put([("a", ("c1", "A")), ("b", (None, None))], cache.generation, now=0.0)
    cached, missing = cache.get(["b", "a", "z"], now=5.0)
    assert cached == [(None, None), ("c1", "A"), None] and missing == [2]
    assert cache.get(["a"], now=10.5) == ([None], [0])  # expired


def test_oldest_entries_are_evicted_beyond_the_cap() -> None:
    cache = ItemDetailsCache(max_entries=3)
    cache.put([(f"i{j}", ("c", str(j))) for j in range(3)], cache.generation, now=0.0)
    cache.put([("i3", ("c", "3")), ("i4", ("c", "4"))], cache.generation, now=0.0)
    assert len(cache) == 3
    assert cache.get(["i0", "i1", "i2", "i3", "i4"], now=0.0)[1] == [0, 1]


def test_a_fill_that_raced_an_invalidation_is_dropped() -> None:
    cache = ItemDetailsCache()
    generation = cache.generation  # a request starts reading Redis ...
    cache.invalidate(["a"])  # ... a delta touching "a" is swapped in meanwhile ...
    cache.put([("a", ("old", "stale"))], generation, now=0.0)  # ... its (maybe stale) read is not kept
    assert cache.get(["a"], now=0.0)[1] == [0]


def test_a_delta_swap_drops_only_its_items_and_a_full_swap_drops_everything() -> None:
    cache = ItemDetailsCache()
    cache.put([("a", ("c", "A")), ("b", ("c", "B")), ("c", ("c", "C"))], cache.generation, now=0.0)
    cache.on_swap(state(1, None), state(1, frozenset({"a", "new"})))
    assert cache.get(["a", "b", "c"], now=0.0)[1] == [0]
    cache.on_swap(state(1, None), state(1, frozenset()))  # a delta of user rows only
    assert cache.get(["b", "c"], now=0.0)[1] == []
    cache.on_swap(None, state(1, frozenset({"x"})))  # loaded whole (e.g. a rollback): everything
    assert cache.get(["b", "c"], now=0.0)[1] == [0, 1]
    cache.put([("b", ("c", "B"))], cache.generation, now=0.0)
    cache.on_swap(state(1, None), state(7, None))  # a new full version
    assert len(cache) == 0


def test_fast_query_takes_plain_queries_and_leaves_the_rest_to_fastapi() -> None:
    from retriever.app import fast_query

    assert fast_query(b"user_id=u1&k=7&exclude=a,%20b&category=c1&diversity=true&other=x") == (
        "u1",
        7,
        ["a", "b"],
        ["c1"],
        True,
    )
    assert fast_query(b"user_id=%C3%A9t%C3%A9") == ("\u00e9t\u00e9", None, [], None, False)
    assert fast_query(b"user_id=u1&k=-3") == ("u1", -3, [], None, False)  # the service answers 400
    for odd in (b"", b"k=3", b"user_id=", b"user_id=u1&k=many", b"user_id=u1&k=1.5", b"user_id=u1&user_id=u2"):
        assert fast_query(odd) is None, odd
    assert fast_query(b"user_id=u1&diversity=perhaps") is None
    assert fast_query(b"user_id=" + b"x" * 257) is None


def test_the_app_sets_the_configured_switch_interval_for_the_watchers_rebuilds() -> None:
    import sys

    from retriever.app import create_app
    from twotower.config import Config

    before = sys.getswitchinterval()
    try:
        create_app(Config().with_overrides({"retriever": {"gil_switch_interval_ms": 0.7}}))
        assert abs(sys.getswitchinterval() - 0.0007) < 1e-9
    finally:
        sys.setswitchinterval(before)
