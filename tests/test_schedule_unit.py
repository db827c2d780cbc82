"""The nightly schedule: cron and timezone from config, and which day counts as yesterday."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from trainer.days import day_bounds_ms, yesterday
from trainer.schedule import Scheduler
from twotower.config import Config


def test_scheduler_runs_nightly_at_the_configured_time_and_zone(tmp_path) -> None:
    cfg = Config().with_overrides(
        {"trainer": {"state_dir": tmp_path, "schedule_cron": "30 3 * * *", "schedule_timezone": "Europe/Paris"}}
    )
    scheduler = Scheduler(cfg)
    scheduler.startup()
    try:
        job = scheduler.scheduler.get_job("nightly")
        when = job.next_run_time.astimezone(ZoneInfo("Europe/Paris"))
        assert (when.hour, when.minute) == (3, 30)
        assert scheduler.health()["next_run"] is not None
    finally:
        scheduler.shutdown()


def test_yesterday_and_day_bounds_follow_the_timezone() -> None:
    late_evening_utc = dt.datetime(2024, 3, 10, 23, 30, tzinfo=dt.UTC)
    assert yesterday("UTC", late_evening_utc) == dt.date(2024, 3, 9)
    assert yesterday("Asia/Tokyo", late_evening_utc) == dt.date(2024, 3, 10)  # already the 11th in Tokyo
    start, end = day_bounds_ms(dt.date(2024, 3, 10), "UTC")
    assert end - start == 86_400_000
    assert start == int(dt.datetime(2024, 3, 10, tzinfo=dt.UTC).timestamp() * 1000)
    # a DST change day in Paris has 23 hours
    start, end = day_bounds_ms(dt.date(2024, 3, 31), "Europe/Paris")
    assert end - start == 23 * 3_600_000
