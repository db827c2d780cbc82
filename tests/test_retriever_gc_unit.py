"""Unit tests of the retriever's garbage-collection pause timing and freezing (no Redis)."""

from __future__ import annotations

import gc
import weakref

from retriever.gc_pauses import GcPauseTimer, freeze_what_is_loaded


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_timer_times_each_collection_while_installed() -> None:
    seen: list[tuple[int, float]] = []
    ticks = iter(range(100))
    timer = GcPauseTimer(observe=lambda generation, s: seen.append((generation, s)), clock=lambda: next(ticks))
    timer.install()
    try:
        timer.install()  # once only
        gc.collect(2)
        gc.collect(0)
    finally:
        timer.uninstall()
    assert seen == [(2, 1), (0, 1)]  # one clock tick between each start and stop
    gc.collect()
    assert len(seen) == 2  # uninstalled: nothing more


def test_frozen_objects_are_skipped_by_collections_until_thawed() -> None:
    node = _Node()
    alive = weakref.ref(node)
    try:
        assert freeze_what_is_loaded() >= 1
        del node  # garbage now, but frozen: collections do not look at it
        gc.collect()
        assert alive() is not None
    finally:
        gc.unfreeze()
    gc.collect()
    assert alive() is None  # thawed: the cycle is collected
