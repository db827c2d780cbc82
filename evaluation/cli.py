"""``twotower evaluate replay``: the shell around the replay core (progress bar, JSON, PNG).

The lead registers :data:`app` as ``twotower evaluate``. The two-tower policies read the
model and trainer sections of the usual configuration (defaults, ``--config``/
``TWOTOWER_CONFIG``, ``TWOTOWER_<SECTION>__<FIELD>`` variables), with the trainer seed
replaced by ``--seed``.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import StrEnum
from pathlib import Path

import typer

from evaluation.protocol import Event, Protocol

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


def load_events(
    path: Path,
    fmt: str,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
    has_header: bool = True,
    columns: list[str] | None = None,
    limit: int | None = None,
) -> list[Event]:
    """Events of a log, sorted by time (stable), optionally only the first ``limit``.

    Raises:
        ValueError: a bad file, format or mapping (the message names the line or column).
    """
    from producers.replay_formats import read_rows

    mapping: dict[str, object] = {}
    if fmt == "csv":
        mapping = {"user_col": user_col, "item_col": item_col, "time_col": time_col, "has_header": has_header}
        if columns:
            mapping["columns"] = columns
    else:
        given = [
            name
            for name, value in (
                ("--user-col", user_col),
                ("--item-col", item_col),
                ("--time-col", time_col),
                ("--columns", columns),
            )
            if value
        ]
        if given or not has_header:
            raise ValueError(f"format {fmt} has fixed columns; {', '.join(given) or '--no-header'} only apply to csv")
    rows = read_rows(path, fmt, **mapping)
    if limit is not None:
        rows = rows[:limit]
    return [Event(r.user_id, r.item_id, r.ts_ms) for r in rows]


def load_item_side(
    path: Path,
    fmt: str,
    item_col: str | None = None,
    category_col: str | None = None,
    has_header: bool = True,
    columns: list[str] | None = None,
) -> dict:
    """The catalogue side information of a log (:mod:`evaluation.catalog`); empty when it has none.

    Raises:
        ValueError: ``category_col`` for a format other than csv, or a missing column.
    """
    from evaluation.catalog import csv_category_side, movielens_100k_side

    if category_col is not None:
        if fmt != "csv":
            raise ValueError(f"--category-col only applies to csv (format {fmt} brings its own item file)")
        from producers.replay_formats import guess_columns

        if item_col is None:
            if columns is None and has_header:
                with Path(path).open(encoding="utf-8-sig") as handle:
                    columns = [c.strip() for c in handle.readline().split(",")]
            if columns is None:
                raise ValueError("--category-col needs --item-col when the file has no header")
            item_col = guess_columns(columns)[1]
        return csv_category_side(path, item_col, category_col, has_header, columns)
    if fmt == "movielens-100k":
        return movielens_100k_side(path)
    return {}


@app.callback()
def _group() -> None:
    """Evaluate policies by replaying a log (prequential: score each event, then learn from it)."""


def _table(report: dict) -> str:
    results = report["results"]
    if not results:
        return "(no policies)"
    keys = [k for k in next(iter(results.values())) if k not in ("cold_item_events", "new_user_events")]
    width = max(len(n) for n in results) + 2
    lines = ["policy".ljust(width) + "  ".join(f"{k:>16}" for k in keys)]
    for name, row in results.items():
        cells = []
        for key in keys:
            value = row[key]
            cells.append(
                f"{'-':>16}" if value is None else f"{value:>16.4f}" if isinstance(value, float) else f"{value:>16}"
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
        5.0, "--publish-every", min=0.0, help="Seconds of event time before a streaming update is visible."
    ),
    policies: str = typer.Option(
        "popularity_7d,als_nightly,itemknn_stream,two_tower_nightly,two_tower_streaming",
        "--policies",
        help="Comma-separated policies to run side by side.",
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N events (by time)."),
    bootstrap_epochs: int | None = typer.Option(
        None, "--bootstrap-epochs", min=0, help="Two-tower warm-up epochs (default: the harness's documented value)."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads (1 keeps runs reproducible and frugal)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Replay a log prequentially and score every policy side by side.

    The first 60% of the events (by time) are warm-up; every later event is first scored
    against what each policy has published (top-K, seen items excluded), then learned from.
    UTC day boundaries trigger the nightly retrains; streaming updates become visible after
    --publish-every seconds of event time.
    """
    import torch
    from tqdm import tqdm

    from evaluation.replay import Step, make_policies, run

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    names = [n.strip() for n in policies.split(",") if n.strip()]
    protocol = Protocol(k=k, recall_k=max(50, k), publish_every_s=publish_every, seed=seed)
    column_names = [c.strip() for c in columns.split(",")] if columns else None
    try:
        events = load_events(
            data,
            fmt.value,
            user_col,
            item_col,
            time_col,
            has_header=not no_header,
            columns=column_names,
            limit=limit,
        )
        side = load_item_side(data, fmt.value, item_col, category_col, not no_header, column_names) if item_side else {}
        chosen = make_policies(names, protocol, bootstrap_epochs=bootstrap_epochs, item_side=side)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if len(events) < 2:
        raise typer.BadParameter(f"{data}: {len(events)} events; need at least 2")
    typer.echo(f"{len(events)} events from {data}; warm-up on the first {protocol.warmup_fraction:.0%}", err=True)

    bar = tqdm(total=None, desc="warm-up", unit="ev", disable=not progress, file=sys.stderr, mininterval=1.0)
    seen = {"n": 0, "hits": dict.fromkeys(names, 0.0)}

    def on_step(step: object) -> None:
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
        result = run(events, chosen, protocol, on_step)
    finally:
        bar.close()
    report = result.to_json()
    report["data"] = {
        "path": str(data),
        "format": fmt.value,
        "limit": limit,
        "category_col": category_col,
        "catalogue_items": len(side),
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(_table(report))
    typer.echo(f"wrote {json_out} ({result.seconds:.0f} s)", err=True)
    if plot_out is not None:
        from evaluation.plot import plot_hr_over_time

        plot_hr_over_time(report, plot_out, title=f"{data.name}: HR@{k} over time")
        typer.echo(f"wrote {plot_out}", err=True)
