"""``twotower evaluate replay``: the shell around the replay core (progress bar, JSON, PNG).

The lead registers :data:`app` as ``twotower evaluate``. The two-tower policies read the
model and trainer sections of the usual configuration (defaults, ``--config``/
``TWOTOWER_CONFIG``, ``TWOTOWER_<SECTION>__<FIELD>`` variables), with the trainer seed
replaced by ``--seed``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from evaluation.protocol import Event, Protocol
from evaluation.variants import split_policies
from producers.replay_formats import LogSpec, TimeUnit, delimiter_arg
from twotower.cli_args import finite

log = logging.getLogger(__name__)

app = typer.Typer(
    help="Evaluate policies by replaying a log (prequential: score each event, then learn from it).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class LogFormat(StrEnum):
    """Input formats (those of ``producers.replay_formats``)."""

    movielens_100k = "movielens-100k"
    movielens_csv = "movielens-csv"
    csv = "csv"


def load_events(path: Path, log_spec: LogSpec | str, limit: int | None = None) -> list[Event]:
    """Events of a log, sorted by time (stable), optionally only the first ``limit``.

    Raises:
        ValueError: a bad file, format or mapping (the message names the line or column).
    """
    rows = LogSpec.of(log_spec).read(path)
    if limit is not None:
        rows = rows[:limit]
    return [Event(r.user_id, r.item_id, r.ts_ms) for r in rows]


def load_item_side(path: Path, log_spec: LogSpec | str, category_col: str | None = None) -> dict:
    """The catalogue side information of a log (:mod:`evaluation.catalog`); empty when it has none.

    Raises:
        ValueError: ``category_col`` for a format other than csv, or a missing column.
    """
    from evaluation.catalog import csv_category_side, movielens_100k_side

    spec = LogSpec.of(log_spec)
    fmt, item_col, has_header, delimiter = spec.fmt, spec.item_col, spec.has_header, spec.delimiter
    columns = list(spec.columns) if spec.columns else None
    if category_col is not None:
        if fmt != "csv":
            raise ValueError(f"--category-col only applies to csv (format {fmt} brings its own item file)")
        from producers.replay_formats import guess_columns

        if item_col is None:
            if columns is None and has_header:
                with Path(path).open(newline="", encoding="utf-8-sig") as handle:
                    rows = csv.reader(handle, delimiter=delimiter)
                    header = next((r for r in rows if any(f.strip() for f in r)), None)
                columns = [c.strip() for c in header] if header is not None else None
            if columns is None:
                raise ValueError("--category-col needs --item-col when the file has no header")
            item_col = guess_columns(columns)[1]
        return csv_category_side(path, str(item_col), category_col, has_header, columns, delimiter)
    if fmt == "movielens-100k":
        return movielens_100k_side(path)
    return {}


@app.callback()
def _group() -> None:
    """Evaluate policies by replaying a log (prequential: score each event, then learn from it)."""


def _table(results: dict) -> str:
    if not results:
        return "(no policies)"
    skip = ("cold_item_events", "new_user_events", "truth_events", "cold_truth_items")
    keys = [k for k in next(iter(results.values())) if k not in skip]
    width = max(len(n) for n in results) + 2
    widths = {key: max(10, len(key)) for key in keys}
    lines = ["policy".ljust(width) + "  ".join(f"{k:>{widths[k]}}" for k in keys)]
    for name, row in results.items():
        cells = []
        for key in keys:
            value, w = row[key], widths[key]
            cells.append(
                f"{'-':>{w}}" if value is None else f"{value:>{w}.4f}" if isinstance(value, float) else f"{value:>{w}}"
            )
        lines.append(name.ljust(width) + "  ".join(cells))
    return "\n".join(lines)


@app.command("replay")
def replay_command(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="The interaction log."),
    fmt: LogFormat = typer.Option(..., "--format", help="Log format."),
    user_col: str | None = typer.Option(None, "--user-col", help="csv: user column (name or 0-based number)."),
    item_col: str | None = typer.Option(None, "--item-col", help="csv: item column (name or 0-based number)."),
    time_col: str | None = typer.Option(None, "--time-col", help="csv: time column (name or 0-based number)."),
    no_header: bool = typer.Option(False, "--no-header", help="csv: the file has no header line."),
    columns: str | None = typer.Option(None, "--columns", help="csv: comma-separated column names (a,b,c)."),
    delimiter: str = typer.Option(",", "--delimiter", help="csv: field separator; 'tab' for a tab."),
    time_unit: TimeUnit = typer.Option(
        TimeUnit.auto,
        "--time-unit",
        help="csv: auto tells seconds from milliseconds by magnitude (>= 1e11 is ms) and also reads ISO dates.",
    ),
    category_col: str | None = typer.Option(
        None, "--category-col", help="csv: item category column, fed to the two-tower item tower as catalogue."
    ),
    item_side: bool = typer.Option(
        True,
        "--item-side/--no-item-side",
        help="Give the two-tower policies the log's item side information (movielens-100k: u.item; csv: "
        "--category-col).",
    ),
    k: int = typer.Option(10, "--k", min=1, help="List length of HR@K, NDCG@K and coverage."),
    seed: int = typer.Option(0, "--seed", help="Seed of every policy (results are deterministic for a seed)."),
    json_out: Path = typer.Option(..., "--json", dir_okay=False, help="Write the results here (JSON)."),
    plot_out: Path | None = typer.Option(None, "--plot", dir_okay=False, help="Write HR@K over time here (PNG)."),
    publish_every: float = typer.Option(
        5.0,
        "--publish-every",
        min=0.0,
        help="Seconds of event time before a streaming update is visible.",
        callback=finite,
    ),
    history_delay: float = typer.Option(
        0.0,
        "--history-delay",
        min=0.0,
        help="Diagnostic: seconds of event time before an interaction enters the pooled history (0: at once, "
        "the protocol).",
        callback=finite,
    ),
    policies: str = typer.Option(
        "popularity_7d,als_nightly,itemknn_stream,two_tower_nightly,two_tower_streaming",
        "--policies",
        help="Comma-separated policies to run side by side; a two-tower policy takes settings: "
        "two_tower_streaming[loss=bce,temperature=0.1] (any model/trainer field).",
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N events (by time)."),
    bootstrap_epochs: int | None = typer.Option(
        None, "--bootstrap-epochs", min=0, help="Two-tower warm-up epochs (default: the harness's documented value)."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads (1 keeps runs reproducible and frugal)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    live: bool = typer.Option(
        False, "--live", help="Replay through Kafka and the running daemons (trainer, publisher, retriever) instead."
    ),
    speed: float = typer.Option(
        86_400.0,
        "--speed",
        min=1e-6,
        help="--live: event-time seconds per wall second (as fast as it keeps up).",
        callback=finite,
    ),
    compare: bool = typer.Option(
        True, "--compare/--no-compare", help="--live: also run the offline two_tower_streaming, same publish delay."
    ),
    state_root: Path = typer.Option(
        Path("var/live"), "--state-root", help="--live: trainer state, daemon logs (and local Kafka/Redis) here."
    ),
) -> None:
    """Replay a log prequentially and score every policy side by side.

    The first 60% of the events (by time) are warm-up; every later event is first scored
    against what each policy has published (top-K, seen items excluded), then learned from.
    UTC day boundaries trigger the nightly retrains; streaming updates become visible after
    --publish-every seconds of event time.

    With --live the log goes through the real stack instead (Kafka, train stream, publish,
    serve; KAFKA_BOOTSTRAP/REDIS_URL or a local Kafka and Redis): the warm-up is produced and
    bootstrapped as offline, then each event is scored by the retriever's answer before it is
    produced; day boundaries run the nightly retrain, handed over to the streaming trainer.
    --policies and --publish-every do not apply (the stack's own delays do).
    """
    import torch

    from evaluation.replay import make_policies

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # kafka-python warns of every slow IO-loop task; under a loaded replay that is noise, not news
    logging.getLogger("kafka").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    names = _policy_names(policies)
    _check_outputs(json_out, plot_out)
    protocol = Protocol(
        k=k, recall_k=max(50, k), publish_every_s=publish_every, history_delay_s=history_delay, seed=seed
    )
    column_names = [c.strip() for c in columns.split(",")] if columns else None
    try:
        log_spec = LogSpec(
            fmt.value,
            user_col=user_col,
            item_col=item_col,
            time_col=time_col,
            has_header=not no_header,
            columns=column_names,
            delimiter=delimiter_arg(delimiter),
            time_unit=time_unit.value,
        )
        events = load_events(data, log_spec, limit)
        side = load_item_side(data, log_spec, category_col) if item_side else {}
        chosen = make_policies(names, protocol, bootstrap_epochs=bootstrap_epochs, item_side=side)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if len(events) < 2:
        raise typer.BadParameter(f"{data}: {len(events)} events; need at least 2")
    typer.echo(f"{len(events)} events from {data}; warm-up on the first {protocol.warmup_fraction:.0%}", err=True)

    title = f"{data.name}: HR@{k} over time"
    if live:
        report, seconds = _live(events, protocol, speed, compare, state_root, bootstrap_epochs, progress)
        report["data"] = {"path": str(data), "format": fmt.value, "limit": limit, "read_as": _read_as(log_spec)}
        _write_report(report, json_out, plot_out, title + " (live)", seconds)
        return
    result = _run_with_progress(events, chosen, protocol, progress)
    report = result.to_json()
    report["data"] = {
        "path": str(data),
        "format": fmt.value,
        "limit": limit,
        "read_as": _read_as(log_spec),
        "category_col": category_col,
        "catalogue_items": len(side),
    }
    _write_report(report, json_out, plot_out, title, result.seconds)


def _live(
    events: list[Event],
    protocol: Protocol,
    speed: float,
    compare: bool,
    state_root: Path,
    bootstrap_epochs: int | None,
    progress: bool,
) -> tuple[dict, float]:
    """The ``--live`` replay (and the offline comparison); returns the report and wall seconds."""
    from dataclasses import replace

    from tqdm import tqdm

    from evaluation.live import LIVE_POLICY, LiveSettings, publish_delay_s, run_live
    from evaluation.replay import make_policies
    from evaluation.two_tower import DEFAULT_BOOTSTRAP_EPOCHS
    from twotower.config import load_config

    cfg = load_config()
    epochs = DEFAULT_BOOTSTRAP_EPOCHS if bootstrap_epochs is None else bootstrap_epochs
    settings = LiveSettings(speed=speed, state_root=state_root, bootstrap_epochs=epochs)
    delay_s = publish_delay_s(cfg)
    bar = tqdm(total=None, desc="live replay", unit="ev", disable=not progress, file=sys.stderr, mininterval=1.0)

    def on_event(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.update(done - bar.n)

    try:
        live_run = run_live(events, protocol, settings, cfg, on_event)
    finally:
        bar.close()
    n_items = len({e.item for e in events})
    report = {
        "protocol": protocol.as_dict(),
        "log": {
            "events": len(events),
            "warmup_events": live_run.warmup_events,
            "evaluated_events": len(events) - live_run.warmup_events,
            "items": n_items,
            "users": len({e.user for e in events}),
        },
        "results": {LIVE_POLICY: live_run.metrics.summary(n_items)},
        "live": live_run.describe(settings, delay_s),
    }
    series = live_run.series
    seconds = live_run.seconds
    if compare:
        # the delay in event time is the wall delay at the pace the stack really kept
        pace = min(speed, live_run.effective_speed) if live_run.effective_speed > 0 else speed
        offline_protocol = replace(protocol, publish_every_s=delay_s * pace)
        chosen = make_policies(["two_tower_streaming"], offline_protocol, bootstrap_epochs=epochs)
        offline = _run_with_progress(events, chosen, offline_protocol, progress)
        report["results"].update(offline.to_json()["results"])
        report["offline_protocol"] = offline_protocol.as_dict()
        series.hits.update(offline.series.hits)
        seconds += offline.seconds
    report["hr_over_time"] = series.binned(20)
    return report, seconds


def _run_with_progress(
    events: list[Event], chosen: list, protocol: Protocol, progress: bool, on_step: Callable | None = None
):
    """:func:`evaluation.replay.run` under a progress bar showing each policy's running HR@K."""
    from tqdm import tqdm

    from evaluation.replay import Step, run

    k = protocol.k
    bar = tqdm(total=None, desc="warm-up", unit="ev", disable=not progress, file=sys.stderr, mininterval=1.0)
    seen = {"n": 0, "hits": {p.name: 0.0 for p in chosen}}

    def note(step: object) -> None:
        if on_step is not None:
            on_step(step)
        if not isinstance(step, Step):
            bar.reset(total=len(events) - step.warmup_events)  # type: ignore[attr-defined]
            bar.set_description("replay")
            return
        seen["n"] += 1
        for name, recs in step.recs.items():
            seen["hits"][name] += step.event.item in recs[:k]
        bar.update(1)
        if seen["n"] % 500 == 0:
            bar.set_postfix_str(" ".join(f"{n}={h / seen['n']:.3f}" for n, h in seen["hits"].items()))

    try:
        return run(events, chosen, protocol, note)
    finally:
        bar.close()


def _read_as(log_spec: LogSpec) -> dict[str, Any]:
    """How the log was read, for the report: the options a rerun needs (csv: columns, header,
    delimiter, time unit)."""
    spec = asdict(log_spec)
    spec.pop("fmt")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}


def _policy_names(text: str) -> list[str]:
    names = split_policies(text)
    if not names or len(set(names)) != len(names):
        raise typer.BadParameter(f"give one or more distinct policies, got {text!r}", param_hint="--policies")
    return names


def _check_outputs(*paths: Path | None) -> None:
    """Fail before a run that takes an hour, not after it: each output's directory must exist
    (it is made) and be writable."""
    for path in paths:
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise typer.BadParameter(f"cannot write {path}: {exc}") from None
        if not os.access(path.parent, os.W_OK) or path.is_dir():
            raise typer.BadParameter(f"cannot write {path}")


def _write_report(report: dict, json_out: Path, plot_out: Path | None, title: str, seconds: float) -> None:
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(_table(report["results"]))
    if "truth" in report:
        typer.echo("\nagainst the true preferences:")
        typer.echo(_table(report["truth"]))
    typer.echo(f"wrote {json_out} ({seconds:.0f} s)", err=True)
    if plot_out is not None:
        from evaluation.plot import plot_hr_over_time

        plot_hr_over_time(report, plot_out, title=title)
        typer.echo(f"wrote {plot_out}", err=True)


@app.command("simulate")
def simulate_command(
    json_out: Path = typer.Option(..., "--json", dir_okay=False, help="Write the results here (JSON)."),
    plot_out: Path | None = typer.Option(None, "--plot", dir_okay=False, help="Write HR@K over time here (PNG)."),
    days: float = typer.Option(8.0, "--days", min=1.0, help="Simulated days of traffic.", callback=finite),
    events_per_day: int = typer.Option(4_000, "--events-per-day", min=10, help="Clicks per simulated day."),
    users: int = typer.Option(1_000, "--users", min=1, help="Simulated users."),
    items: int = typer.Option(2_000, "--items", min=10, help="Items at the start."),
    categories: int = typer.Option(20, "--categories", min=1, help="Item categories."),
    drift_per_day: float = typer.Option(
        0.6, "--drift-per-day", min=0.0, help="Interest drift, radians per day.", callback=finite
    ),
    new_items_per_day: float = typer.Option(
        60.0, "--new-items-per-day", min=0.01, help="Arriving items per day.", callback=finite
    ),
    truth_every: int = typer.Option(4, "--truth-every", min=1, help="Score the true top-K at every N-th event."),
    k: int = typer.Option(10, "--k", min=1, help="List length of HR@K, NDCG@K, coverage and true recall."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world and of every policy."),
    publish_every: float = typer.Option(
        5.0,
        "--publish-every",
        min=0.0,
        help="Seconds of event time before a streaming update is visible.",
        callback=finite,
    ),
    policies: str = typer.Option(
        "popularity_7d,als_nightly,itemknn_stream,two_tower_nightly,two_tower_streaming",
        "--policies",
        help="Comma-separated policies to run side by side.",
    ),
    bootstrap_epochs: int | None = typer.Option(
        None, "--bootstrap-epochs", min=0, help="Two-tower warm-up epochs (default: the harness's documented value)."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run the replay policies on a simulated log with known true preferences.

    The same prequential protocol as `replay` (an item is cold, a user new, for one simulated
    day here instead of seven), plus recall of each policy's top-K against the user's true
    top-K at that moment: overall, on items that arrived during the simulation, and for the
    users whose interests drifted most over the last day.
    """
    import torch

    from evaluation.replay import make_policies
    from evaluation.simulate import SimulationSpec, TruthScorer, describe, generate
    from twotower.config import SimulatorConfig

    torch.set_num_threads(threads)
    names = _policy_names(policies)
    _check_outputs(json_out, plot_out)
    try:
        spec = SimulationSpec(
            days=days,
            events_per_day=events_per_day,
            drift_per_day=drift_per_day,
            new_items_per_day=new_items_per_day,
            truth_every=truth_every,
            k=k,
        )
        world_cfg = SimulatorConfig(n_users=users, n_items=items, n_categories=categories, seed=seed)
        protocol = Protocol(k=k, recall_k=max(50, k), publish_every_s=publish_every, cold_days=1.0, seed=seed)
        chosen = make_policies(names, protocol, bootstrap_epochs=bootstrap_epochs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"simulating {days:g} days, {events_per_day} clicks a day ({users} users, {items} items) …", err=True)
    log = generate(world_cfg, spec)
    scorer = TruthScorer(log, spec)
    result = _run_with_progress(log.events, chosen, protocol, progress, scorer)
    report = result.to_json()
    report["truth"] = scorer.summary()
    report["simulation"] = describe(spec, world_cfg, log)
    _write_report(report, json_out, plot_out, f"simulated log: HR@{k} over time", result.seconds)
