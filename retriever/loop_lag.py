"""How late a retriever worker's event loop runs: the stalls a request would have waited out.

Every request of a worker runs on its event loop, so anything that keeps the loop from running
(a long GIL hold by the snapshot watcher's thread, a slow step on the loop itself, the kernel or
the host not scheduling the process) delays every request in flight by as much. A small task
sleeps ``interval_s`` over and over and records how much later than asked it woke up: the
histogram ``twotower_retriever_event_loop_lag_seconds`` (summed over workers in multiprocess
mode) and a warning in the log when a check is ``warn_s`` late or more (at most one line per
``WARN_EVERY_S``, with the number of late checks since the last line).

A stall shorter than ``interval_s`` can fall between two checks, one of length ``L`` shows up
as a lag of up to ``L``: the histogram counts stalls, it does not time every request (that is
``twotower_retriever_latency_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from prometheus_client import Histogram

log = logging.getLogger(__name__)

LOOP_LAG = Histogram(
    "twotower_retriever_event_loop_lag_seconds",
    "How much later than asked a worker's event loop woke from a short sleep (stalls every "
    "request of that worker waits out), seconds.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
WARN_EVERY_S = 10.0
"""At most one log line about late checks per this many seconds."""


def lateness(asked_s: float, slept_s: float) -> float:
    """How much longer than ``asked_s`` a sleep of ``slept_s`` took (never negative)."""
    return max(0.0, slept_s - asked_s)


class LoopLagMonitor:
    """Measures the lag of the running event loop while :meth:`start`-ed (see the module doc).

    Args:
        interval_s: the sleep between checks.
        warn_s: a check this late or later is logged (rate-limited).
        observe: where each lag goes (default: the ``LOOP_LAG`` histogram).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        interval_s: float,
        warn_s: float,
        observe: Callable[[float], None] = LOOP_LAG.observe,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive (got {interval_s})")
        self.interval_s = interval_s
        self.warn_s = warn_s
        self._observe = observe
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.checks = 0
        self.late = 0
        """Checks at least ``warn_s`` late."""
        self.worst_s = 0.0

    def start(self) -> None:
        """Start checking on the running loop (call from a coroutine)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        clock, interval = self._clock, self.interval_s
        logged_at = -WARN_EVERY_S
        unlogged = 0
        while True:
            started = clock()
            await asyncio.sleep(interval)
            woke = clock()
            lag = lateness(interval, woke - started)
            self._observe(lag)
            self.checks += 1
            self.worst_s = max(self.worst_s, lag)
            if lag >= self.warn_s:
                self.late += 1
                unlogged += 1
                if woke - logged_at >= WARN_EVERY_S:
                    log.warning(
                        "event loop ran %.0f ms late (%d late checks of %.0f ms or more since the last line)",
                        lag * 1000,
                        unlogged,
                        self.warn_s * 1000,
                    )
                    logged_at, unlogged = woke, 0
