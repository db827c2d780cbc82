"""``schedule``: an APScheduler cron that runs the nightly retrain over yesterday's events, and
over the days before it that a missed, failed or stopped run left (``trainer.nightly_catch_up_days``)."""

from __future__ import annotations

import logging
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import Counter, Gauge

from trainer.days import yesterday
from trainer.nightly import dates_due, run_nightly
from twotower.config import Config
from twotower.daemon import Daemon

log = logging.getLogger(__name__)
RUNS = Counter("twotower_nightly_runs_total", "Nightly retrains run by the scheduler", ["status"])
LAST_RUN = Gauge("twotower_nightly_last_run_timestamp", "Wall-clock time of the last finished nightly run")


class Scheduler(Daemon):
    """Runs ``train nightly`` for yesterday on the configured cron (one run at a time, misfires coalesced)."""

    name = "scheduler"

    def __init__(self, cfg: Config, run_now: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.run_now = run_now
        self.scheduler = BackgroundScheduler(timezone=cfg.trainer.schedule_timezone)

    def startup(self) -> None:
        trigger = CronTrigger.from_crontab(self.cfg.trainer.schedule_cron, timezone=self.cfg.trainer.schedule_timezone)
        job = self.scheduler.add_job(
            self.run_once, trigger, id="nightly", max_instances=1, coalesce=True, misfire_grace_time=3_600
        )
        if self.run_now:
            self.scheduler.add_job(self.run_once, id="nightly-now", max_instances=1)
        self.scheduler.start()
        log.info("nightly retrain scheduled: %s %s", self.cfg.trainer.schedule_cron, self.cfg.trainer.schedule_timezone)
        self.next_run = job.next_run_time

    def run_once(self) -> None:
        """Retrain yesterday, and before it the days a missed, failed or stopped run left
        (:func:`~trainer.nightly.dates_due`), oldest first; stop at the first that fails."""
        newest = yesterday(self.cfg.trainer.schedule_timezone)
        try:
            dates = dates_due(self.cfg, newest)
        except Exception:
            log.exception("cannot read which days were retrained; retraining %s only", newest)
            dates = [newest]
        for date in dates:
            if self.shutdown_flag.is_set():
                break
            try:
                result = run_nightly(self.cfg, date, progress=False, should_stop=self.shutdown_flag.is_set)
            except Exception:
                RUNS.labels("failed").inc()
                log.exception("nightly retrain of %s failed", date)
                break  # the next run starts again from it
            RUNS.labels(result.status).inc()
            log.info("nightly %s: %s", result.date, result.status, extra={"examples": result.examples})
            if result.status == "stopped":
                break
        LAST_RUN.set_to_current_time()

    def main_loop(self) -> None:
        while not self.shutdown_flag.wait(1.0):
            pass

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def health(self) -> dict[str, Any]:
        out = super().health()
        job = self.scheduler.get_job("nightly") if self.scheduler.running else None
        out["next_run"] = str(job.next_run_time) if job else None
        return out
