"""Calendar days of the nightly retrain: their bounds in the configured timezone."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo


def day_bounds_ms(date: dt.date, timezone: str) -> tuple[int, int]:
    """[start, end) of a calendar day in ``timezone``, as epoch milliseconds."""
    tz = ZoneInfo(timezone)
    start = dt.datetime.combine(date, dt.time.min, tzinfo=tz)
    end = dt.datetime.combine(date + dt.timedelta(days=1), dt.time.min, tzinfo=tz)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def yesterday(timezone: str, now: dt.datetime | None = None) -> dt.date:
    now = now or dt.datetime.now(ZoneInfo(timezone))
    return (now.astimezone(ZoneInfo(timezone)) - dt.timedelta(days=1)).date()


def date_of(ts_ms: int, timezone: str) -> dt.date:
    """The calendar date in ``timezone`` of an epoch-millisecond time."""
    return dt.datetime.fromtimestamp(ts_ms / 1000, ZoneInfo(timezone)).date()


class DayStarts:
    """The start of the day (in one timezone) of event times, as epoch ms; the last day looked
    up is remembered, so a stream of times in one day costs two comparisons each."""

    def __init__(self, timezone: str) -> None:
        self.timezone = timezone
        self._day = (0, 0)

    def __call__(self, ts_ms: int) -> int:
        start, end = self._day
        if not start <= ts_ms < end:
            start, end = self._day = day_bounds_ms(date_of(ts_ms, self.timezone), self.timezone)
        return start
