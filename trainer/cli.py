"""``twotower train …`` and ``twotower schedule``."""

from __future__ import annotations

import datetime as dt
import json

import typer

from twotower.config import load_config

app = typer.Typer(no_args_is_help=True)


@app.command("stream")
def stream_command(
    max_idle_s: float | None = typer.Option(None, help="Stop after this many seconds without records (tests)."),
) -> None:
    """Consume events in event-time order and update only the ID-embedding rows (towers frozen).

    Checkpoints state and Kafka offsets together every trainer.checkpoint_interval_s; the
    publisher turns each checkpoint into a delta. SIGTERM checkpoints and exits.
    """
    from trainer.stream import StreamTrainer
    from twotower.daemon import run_daemon

    cfg = load_config()
    raise typer.Exit(run_daemon(StreamTrainer(cfg, max_idle_s=max_idle_s), cfg.observability))


@app.command("nightly")
def nightly_command(
    date: str | None = typer.Option(None, help="Day to retrain on, YYYY-MM-DD (default: yesterday)."),
    force: bool = typer.Option(False, help="Retrain even if this date was done before."),
) -> None:
    """Shuffled one-epoch retrain over one day's events, warm-started from the last weights."""
    from trainer.days import yesterday
    from trainer.nightly import run_nightly
    from twotower.daemon import setup_logging

    cfg = load_config()
    setup_logging(cfg.observability, "nightly")
    try:
        day = dt.date.fromisoformat(date) if date else yesterday(cfg.trainer.schedule_timezone)
    except ValueError:
        raise typer.BadParameter(f"--date must be YYYY-MM-DD, got {date!r}") from None
    result = run_nightly(cfg, day, force=force)
    typer.echo(json.dumps(result.__dict__))


def schedule_command(
    run_now: bool = typer.Option(False, help="Also run yesterday's retrain once at start."),
) -> None:
    """Run the nightly retrain on a cron schedule (trainer.schedule_cron, default 02:00 UTC)."""
    from trainer.schedule import Scheduler
    from twotower.daemon import run_daemon

    cfg = load_config()
    raise typer.Exit(run_daemon(Scheduler(cfg, run_now=run_now), cfg.observability))
