"""The open-loop generator's timer: never wakes before its deadline, lets the loop run meanwhile."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

import pytest
import uvloop

from bench import deadline_timer
from bench.deadline_timer import DeadlineTimer

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def _run(make_loop: Callable[[], asyncio.AbstractEventLoop], main: Callable[[DeadlineTimer], object]) -> object:
    loop = make_loop()
    try:

        async def wrapped() -> object:
            timer = DeadlineTimer(asyncio.get_running_loop())
            try:
                return await main(timer)  # type: ignore[misc]
            finally:
                timer.close()

        return loop.run_until_complete(wrapped())
    finally:
        loop.close()


async def _earliness(timer: DeadlineTimer) -> tuple[str, list[float]]:
    """How far after each deadline the timer returned, for deadlines 0.1-1.9 ms away (under a
    millisecond is where uvloop's own timer returns early)."""
    after = []
    for i in range(40):
        deadline = time.perf_counter() + 0.0001 + (i % 10) * 0.0002
        await timer.sleep_until(deadline)
        after.append(time.perf_counter() - deadline)
    return timer.kind, after


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_sleep_never_ends_before_its_deadline(loop_name: str) -> None:
    kind, after = _run(LOOPS[loop_name], _earliness)  # type: ignore[misc]
    assert kind == ("timerfd" if sys.platform == "linux" else "loop")
    assert min(after) >= 0


def test_without_a_timerfd_it_falls_back_to_the_loop_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadline_timer, "_libc", lambda: None)
    kind, after = _run(LOOPS["uvloop"], _earliness)  # type: ignore[misc]
    assert kind == "loop" and min(after) >= 0


def test_a_deadline_passed_returns_at_once_and_the_loop_runs_while_it_waits() -> None:
    async def main(timer: DeadlineTimer) -> tuple[float, bool]:
        started = time.perf_counter()
        await timer.sleep_until(started - 1.0)
        at_once = time.perf_counter() - started
        ran = asyncio.Event()
        asyncio.get_running_loop().call_later(0.005, ran.set)
        await timer.sleep_until(time.perf_counter() + 0.05)
        return at_once, ran.is_set()

    at_once, ran = _run(LOOPS["uvloop"], main)  # type: ignore[misc]
    assert at_once < 0.01 and ran


def test_a_cancelled_sleep_leaves_the_next_one_on_time() -> None:
    async def main(timer: DeadlineTimer) -> float:
        task = asyncio.ensure_future(timer.sleep_until(time.perf_counter() + 0.002))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the cancelled one's expiration comes while the next sleep waits: it must not end it
        await asyncio.sleep(0.001)
        deadline = time.perf_counter() + 0.02
        await timer.sleep_until(deadline)
        return time.perf_counter() - deadline

    assert _run(LOOPS["uvloop"], main) >= 0  # type: ignore[operator]
