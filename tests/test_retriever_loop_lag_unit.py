"""Unit tests of the event-loop lag monitor (no Redis, no server)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from retriever.loop_lag import LoopLagMonitor, lateness


def test_lateness_is_the_extra_time_and_never_negative() -> None:
    assert lateness(0.05, 0.08) == pytest.approx(0.03)
    assert lateness(0.05, 0.04) == 0.0


def test_monitor_sees_a_blocked_loop_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    observed: list[float] = []

    async def scenario() -> LoopLagMonitor:
        monitor = LoopLagMonitor(0.01, warn_s=0.1, observe=observed.append)
        monitor.start()
        await asyncio.sleep(0.1)  # quiet checks
        time.sleep(0.25)  # a stall: nothing on this loop runs meanwhile
        await asyncio.sleep(0.05)
        await monitor.stop()
        return monitor

    with caplog.at_level(logging.WARNING, logger="retriever.loop_lag"):
        monitor = asyncio.run(scenario())
    assert monitor.checks == len(observed) >= 5
    # the check that slept across the stall woke about 0.25 s late, the others on time
    assert max(observed) >= 0.2 and monitor.worst_s == max(observed)
    assert monitor.late == sum(1 for lag in observed if lag >= 0.1) >= 1
    assert [r.message for r in caplog.records if "event loop ran" in r.message]


def test_monitor_stops_cleanly_and_refuses_a_zero_interval() -> None:
    async def scenario() -> int:
        monitor = LoopLagMonitor(0.005, warn_s=1.0, observe=lambda _lag: None)
        monitor.start()
        await asyncio.sleep(0.05)
        await monitor.stop()
        checks = monitor.checks
        await asyncio.sleep(0.05)
        assert monitor.checks == checks  # no task left running
        return checks

    assert asyncio.run(scenario()) >= 2
    with pytest.raises(ValueError):
        LoopLagMonitor(0.0, warn_s=1.0)
