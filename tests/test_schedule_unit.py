"""The nightly schedule: cron and timezone from config, and which day counts as yesterday."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from trainer import schedule
from trainer.days import day_bounds_ms, yesterday
from trainer.nightly import NIGHTLY_LOCK, NightlyResult, dates_due, run_nightly
from trainer.schedule import Scheduler
from trainer.state import TrainerState
from trainer.stream import StateLock
from twotower import checkpoint
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


def _with_done(tmp_path, done: list[str], **trainer: object) -> Config:
    cfg = Config().with_overrides({"trainer": {"state_dir": tmp_path, **trainer}})
    if done:
        state = TrainerState(cfg.model, cfg.trainer)
        state.nightly_done = list(done)
        checkpoint.save(tmp_path, state.to_checkpoint({}))
    return cfg


def test_the_days_a_missed_failed_or_stopped_run_left_are_due_oldest_first(tmp_path) -> None:
    """A scheduled run once retrained yesterday only: a day missed while the scheduler was down,
    or whose run failed or was stopped, was never retrained."""
    newest = dt.date(2024, 3, 10)
    assert dates_due(_with_done(tmp_path / "fresh", []), newest) == [newest]  # nothing done yet: no backlog
    assert dates_due(_with_done(tmp_path / "a", ["2024-03-07", "2024-03-08"]), newest) == [
        dt.date(2024, 3, 9),
        newest,
    ]
    assert dates_due(_with_done(tmp_path / "b", ["2024-03-10"]), newest) == []
    assert dates_due(_with_done(tmp_path / "c", ["2024-02-01"]), newest) == [
        dt.date(2024, 3, 8),
        dt.date(2024, 3, 9),
        newest,
    ]  # at most nightly_catch_up_days
    assert dates_due(_with_done(tmp_path / "d", ["2024-02-01"], nightly_catch_up_days=1), newest) == [newest]


def test_a_scheduled_run_retrains_the_due_days_in_order_and_stops_at_a_failure(tmp_path, monkeypatch) -> None:
    cfg = Config().with_overrides({"trainer": {"state_dir": tmp_path}})
    ran: list[dt.date] = []
    outcome = {dt.date(2024, 3, 9): "stopped"}

    def fake_run(_cfg, date, **_kwargs) -> NightlyResult:
        ran.append(date)
        if date == dt.date(2024, 3, 8):
            raise RuntimeError("injected: Kafka is down")
        return NightlyResult(date.isoformat(), outcome.get(date, "trained"))

    monkeypatch.setattr(schedule, "run_nightly", fake_run)
    monkeypatch.setattr(schedule, "yesterday", lambda _tz: dt.date(2024, 3, 10))
    days = [dt.date(2024, 3, 7), dt.date(2024, 3, 8), dt.date(2024, 3, 9), dt.date(2024, 3, 10)]
    monkeypatch.setattr(schedule, "dates_due", lambda _cfg, _newest: list(days))
    Scheduler(cfg).run_once()
    assert ran == days[:2]  # the failure ends the run: the next one starts again from it
    ran.clear()
    days.pop(1)
    Scheduler(cfg).run_once()
    assert ran == [dt.date(2024, 3, 7), dt.date(2024, 3, 9)]  # stopped: nothing after it


def test_a_day_not_over_yet_is_not_retrained(tmp_path) -> None:
    """Retrained before it ended, the rest of the day would never be: it was marked done."""
    cfg = Config().with_overrides({"trainer": {"state_dir": tmp_path}})
    today = dt.datetime.now(dt.UTC).date()
    assert run_nightly(cfg, today).status == "not_over"
    margin = Config().with_overrides({"trainer": {"state_dir": tmp_path, "nightly_margin_ms": 3 * 86_400_000}})
    assert run_nightly(margin, today - dt.timedelta(days=1)).status == "not_over"  # its read margin too


def test_a_run_waiting_for_another_stops_when_asked(tmp_path) -> None:
    """It waited on the other run's lock without limit, past a container's stop grace period."""
    cfg = Config().with_overrides({"trainer": {"state_dir": tmp_path}})
    other = StateLock(tmp_path, NIGHTLY_LOCK)
    assert other.acquire(blocking=False)
    try:
        assert run_nightly(cfg, dt.date(2024, 3, 10), should_stop=lambda: True).status == "stopped"
    finally:
        other.release()
