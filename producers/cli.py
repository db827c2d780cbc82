"""``twotower produce ...``: the simulator daemon and the dataset replayer."""

from __future__ import annotations

import inspect
import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from kafka.errors import KafkaError

from producers.replay_formats import LogSpec, TimeUnit, delimiter_arg
from twotower.cli_args import finite
from twotower.config import load_config
from twotower.daemon import ShutdownFlag, install_signal_handlers, run_daemon, setup_logging

app = typer.Typer(
    help="Push events to Kafka: a simulated stream or a replayed log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _one_line_paragraphs(doc: str | None) -> str:
    """A docstring with the line breaks inside its paragraphs removed (rich help would keep them)."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc or "").split("\n\n"))


class ReplayFormat(StrEnum):
    """Input formats of ``replay``."""

    movielens_100k = "movielens-100k"
    movielens_csv = "movielens-csv"
    csv = "csv"


def simulate_command(
    rate: float | None = typer.Option(
        None, "--rate", help="Requests per second. Default: config simulator.rate_per_s.", callback=finite
    ),
    duration: float = typer.Option(
        0.0, "--duration", help="Stop after this many seconds; 0 runs until SIGTERM.", callback=finite
    ),
    users: int | None = typer.Option(None, "--users", help="Simulated users. Default: config simulator.n_users."),
    items: int | None = typer.Option(
        None, "--items", help="Starting catalogue size. Default: config simulator.n_items."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of the ground truth and draws. Default: config simulator.seed."
    ),
    retriever_url: str | None = typer.Option(
        None,
        "--retriever-url",
        help="Retriever base URL for closed-loop slates, '' for popularity-random slates. "
        "Default: config simulator.retriever_url.",
    ),
    max_events: int | None = typer.Option(
        None, "--max-events", help="Stop once this many impressions + clicks were produced.", min=1
    ),
) -> None:
    """Simulate users, items and their clicks, and stream them to Kafka.

    Publishes the catalogue (items with category and content features) and user profiles,
    then simulates RATE recommendation requests per second: a user (activity-skewed) is shown
    a slate (from the retriever if --retriever-url is set and answers within 0.3 s, else
    popularity-random), produces an impression per slot, a click per slot they like, and one
    organic click drawn from their true preferences over the whole catalogue. User interests
    drift and new items keep arriving. Prometheus metrics (twotower_sim_*) include the
    ground-truth hit rate of the served slates versus a random baseline; they are served on
    observability.metrics_port. Stops cleanly on SIGTERM/SIGINT.
    """
    cfg = load_config()
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("rate_per_s", rate),
            ("n_users", users),
            ("n_items", items),
            ("seed", seed),
            ("retriever_url", retriever_url),
        )
        if value is not None
    }
    if overrides:
        cfg = cfg.with_overrides({"simulator": overrides})
    if duration < 0:  # (not finite: refused by its callback)
        raise typer.BadParameter("must be >= 0", param_hint="--duration")
    from producers.simulate import SimulatorDaemon

    daemon = SimulatorDaemon(cfg, duration_s=duration, max_events=max_events)
    raise typer.Exit(run_daemon(daemon, cfg.observability))


def replay_command(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="The interaction log."),
    fmt: ReplayFormat | None = typer.Option(
        None,
        "--format",
        help="Input format; default: movielens-100k for a file named u.data, csv otherwise.",
        case_sensitive=False,
    ),
    user_col: str | None = typer.Option(
        None, "--user-col", help="csv: user column, by name or 0-based number (guessed from the header if omitted)."
    ),
    item_col: str | None = typer.Option(None, "--item-col", help="csv: item column, by name or 0-based number."),
    time_col: str | None = typer.Option(None, "--time-col", help="csv: timestamp column, by name or 0-based number."),
    no_header: bool = typer.Option(False, "--no-header", help="csv: the first line is data, not column names."),
    columns: str | None = typer.Option(
        None, "--columns", help="csv: comma-separated column names (for a file without a header, or to rename)."
    ),
    delimiter: str = typer.Option(",", "--delimiter", help="csv: field separator; 'tab' for a tab."),
    time_unit: TimeUnit = typer.Option(
        TimeUnit.auto,
        "--time-unit",
        help="csv: auto tells seconds from milliseconds by magnitude (>= 1e11 is ms; below 1e8, which looks "
        "like a date written as digits, it asks for the unit) and also reads ISO dates.",
    ),
    speed: float | None = typer.Option(
        None,
        "--speed",
        help="Replay speed-up: event-time gaps / SPEED become wall-clock gaps (3600 = an hour per second). "
        "Default: as fast as possible.",
        callback=finite,
    ),
    limit: int | None = typer.Option(None, "--limit", help="Send only the first N events in time order.", min=0),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Replay a logged dataset into Kafka as clicks with their original timestamps.

    Rows are sent in event-time order as click interactions whose event time and Kafka record
    timestamp are the logged ones, with deterministic event ids (format:file:line). For
    MovieLens-100K, the catalogue in u.item beside u.data (genres as category and features)
    is sent first. Examples:

    twotower produce replay data/ml-100k/u.data

    twotower produce replay ratings.csv --format movielens-csv --speed 86400

    twotower produce replay log.tsv --delimiter tab --no-header --columns ts,item,user
    """
    cfg = load_config()
    setup_logging(cfg.observability, "replay")
    # a one-shot command: kafka-python's own log of each failed connection attempt is noise here;
    # what fails is reported below in one line
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    flag = ShutdownFlag()
    install_signal_handlers(flag)
    if fmt is None:
        fmt = ReplayFormat.movielens_100k if path.name == "u.data" else ReplayFormat.csv
    names = [c.strip() for c in columns.split(",")] if columns else None
    from producers.replay import DeliveryError, replay

    try:
        log_spec = LogSpec(
            fmt.value,
            user_col=user_col,
            item_col=item_col,
            time_col=time_col,
            has_header=not no_header,
            columns=names,
            delimiter=delimiter_arg(delimiter),
            time_unit=time_unit.value,
        )
        result = replay(cfg, path, log_spec, speed=speed, limit=limit, shutdown_flag=flag, progress=progress)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KafkaError as exc:
        typer.echo(
            f"error: Kafka at {cfg.kafka.bootstrap} failed: {exc} (is a broker running? "
            "`twotower infra up` starts one)",
            err=True,
        )
        raise typer.Exit(1) from None
    except DeliveryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if result.events == 0 and limit != 0 and not result.interrupted:
        typer.echo(f"warning: {path} has no rows to send", err=True)
    typer.echo(json.dumps(result.__dict__))
    if result.interrupted:
        raise typer.Exit(130)


app.command("simulate", help=_one_line_paragraphs(simulate_command.__doc__))(simulate_command)
app.command("replay", help=_one_line_paragraphs(replay_command.__doc__))(replay_command)
