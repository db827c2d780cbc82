"""Python's cyclic garbage collector in a retriever worker: its pauses, timed, and kept short.

A collection of the oldest generation walks every object the process tracks: in a retriever
worker about 240,000 after the imports alone (torch, Faiss, FastAPI, pydantic), about 100 ms
during which no request of that worker runs. Such collections come whenever the objects that
survived younger collections since the last one reach a quarter of the old ones.

* :class:`GcPauseTimer` times every collection (``gc.callbacks``) into the histogram
  ``twotower_retriever_gc_pause_seconds{generation}``.
* :func:`freeze_what_is_loaded` collects once and moves every object alive into the permanent
  generation (``gc.freeze``), which later collections skip: a worker calls it once its app is
  built, before it loads a snapshot, so that what the collector walks afterwards is what the
  process made since (the serving states are mostly numpy arrays, which it does not track).
  Frozen objects are still freed when their last reference goes; only garbage in a reference
  cycle among them would stay, and what is frozen then (modules, the app) lives as long as
  the process anyway.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram

GC_PAUSE = Histogram(
    "twotower_retriever_gc_pause_seconds",
    "Pauses of Python's cyclic garbage collector in a retriever worker, by generation "
    "(2: the oldest, which walks every object not frozen), seconds.",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)


class GcPauseTimer:
    """Times each garbage collection of this process while installed.

    Args:
        observe: receives (generation, seconds) per collection; default: the ``GC_PAUSE``
            histogram.
        clock: monotonic seconds.
    """

    def __init__(
        self, observe: Callable[[int, float], None] | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._observe = observe if observe is not None else _observe_histogram
        self._clock = clock
        self._started = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # collections do not nest and run under the GIL: one start time is enough
        if phase == "start":
            self._started = self._clock()
        else:
            self._observe(int(info["generation"]), self._clock() - self._started)


_BY_GENERATION = {generation: GC_PAUSE.labels(generation=str(generation)) for generation in range(3)}


def _observe_histogram(generation: int, seconds: float) -> None:
    _BY_GENERATION[generation].observe(seconds)


def freeze_what_is_loaded() -> int:
    """Collect once, then exempt every object alive from later collections (see the module
    doc); returns how many objects are frozen now."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
