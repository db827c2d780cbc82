"""Calendar days of the nightly retrain: their bounds in the configured timezone."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from zoneinfo import ZoneInfo

from twotower.events import MAX_TS_MS


def day_bounds_ms(date: dt.date, timezone: str) -> tuple[int, int]:
    """[start, end) of a calendar day in ``timezone``, as epoch milliseconds."""
    tz = ZoneInfo(timezone)
    start = dt.datetime.combine(date, dt.time.min, tzinfo=tz)
    end = dt.datetime.combine(date + dt.timedelta(days=1), dt.time.min, tzinfo=tz)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def yesterday(timezone: str, now: dt.datetime | None = None) -> dt.date:
    now = now or dt.datetime.now(ZoneInfo(timezone))
    return (now.astimezone(ZoneInfo(timezone)) - dt.timedelta(days=1)).date()


LAST_DAY_MS = MAX_TS_MS - 2 * 86_400_000
"""Times after this are taken as this one: the day after it is still a date in every timezone."""


def date_of(ts_ms: int, timezone: str) -> dt.date:
    """The calendar date in ``timezone`` of an epoch-millisecond time (at most :data:`LAST_DAY_MS`'s)."""
    return dt.datetime.fromtimestamp(min(ts_ms, LAST_DAY_MS) / 1000, ZoneInfo(timezone)).date()


def day_starts_ms(dates: Iterable[dt.date], timezone: str) -> list[int]:
    """The start of each of ``dates`` in ``timezone`` (epoch ms), leaving out any without a next day."""
    return [day_bounds_ms(d, timezone)[0] for d in dates if d < dt.date.max]


def dates_around(date: dt.date, before: int, after: int) -> list[dt.date]:
    """The dates from ``before`` days before ``date`` to ``after`` days after it (those that exist)."""
    out = []
    for k in range(-before, after + 1):
        try:
            out.append(date + dt.timedelta(days=k))
        except OverflowError:
            continue
    return out


class DayStarts:
    """The start of the day (in one timezone) of event times, as epoch ms; the last day looked
    up is remembered, so a stream of times in one day costs two comparisons each."""

    def __init__(self, timezone: str) -> None:
        self.timezone = timezone
        self._day = (0, 0)

    def __call__(self, ts_ms: int) -> int:
        start, end = self._day
        ts_ms = min(ts_ms, LAST_DAY_MS)
        if not start <= ts_ms < end:
            start, end = self._day = day_bounds_ms(date_of(ts_ms, self.timezone), self.timezone)
        return start
