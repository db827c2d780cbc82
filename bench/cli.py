"""``twotower bench …``: the serving benchmarks; each prints its JSON report and writes it to ``--json OUT``.

Heavy modules (torch, faiss, Kafka clients) are imported inside the commands, so that
``twotower --help`` stays quick.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import typer

from twotower.cli_args import finite

app = typer.Typer(
    no_args_is_help=True,
    help="Benchmarks: retriever latency/QPS under swaps, click freshness, cold-item latency, checkpoint cost.",
    pretty_exceptions_enable=False,
    add_completion=False,
)

JSON_HELP = "Write the JSON report to this file (it is printed to stdout too)."


def _stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that every started daemon and service is stopped on the way out."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s bench %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("kafka", "urllib3", "httpx", "httpcore", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parse_sets(values: list[str]) -> dict[str, str]:
    """``section.field=value`` → ``TWOTOWER_SECTION__FIELD`` environment entries."""
    out: dict[str, str] = {}
    for value in values:
        key, sep, setting = value.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise typer.BadParameter(f"--set wants section.field=value, got {value!r}")
        out[f"TWOTOWER_{section.upper()}__{name.upper()}"] = setting
    return out


@app.command("retriever")
def retriever_command(
    items: int = typer.Option(100_000, "--items", help="Catalogue size (random unit vectors, dim 64)."),
    duration_s: float = typer.Option(20.0, "--duration-s", min=0.5, help="Seconds of measured load.", callback=finite),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Open connections of the load generator."),
    workers: int = typer.Option(2, "--workers", min=1, help="Retriever worker processes."),
    swaps: int = typer.Option(10, "--swaps", min=0, help="Versions published during the load (delta, full, ...)."),
    users: int = typer.Option(10_000, "--users", min=1, help="Users in the snapshot (each with a history)."),
    k: int = typer.Option(10, "--k", min=1, help="Items per request."),
    index: str = typer.Option("auto", "--index", help="Index kind for build_index: auto, flat, hnsw, ivf or ivfpq."),
    load_tool: str = typer.Option("auto", "--load-tool", help="wrk, python, or auto (wrk when installed)."),
    wrk_threads: int = typer.Option(1, "--wrk-threads", min=1, help="wrk threads (each takes a core's share)."),
    warmup_s: float = typer.Option(2.0, "--warmup-s", min=0, help="Unmeasured load before the run.", callback=finite),
    floor_requests: int = typer.Option(3_000, "--floor-requests", min=10, help="Requests of the in-process floor."),
    swap_kinds: str = typer.Option("alternate", "--swap-kinds", help="alternate (delta, full, ...), delta or full."),
    index_cache: Path | None = typer.Option(
        None, "--index-cache", help="Keep built indexes in this directory and reuse them (same items, kind, seed)."
    ),
    open_rates: list[float] = typer.Option(
        [],
        "--open-rate",
        help="After the closed-loop run: an open-loop run at this many requests/s (no swaps); repeatable.",
    ),
    open_swaps: bool = typer.Option(
        False, "--open-swaps", help="Publish the --swaps versions during each open-loop run too."
    ),
    prewrite_swaps: bool = typer.Option(
        False,
        "--prewrite-swaps",
        help="Write the swaps' versions before each run and only move the pointer during it "
        "(the swap alone, without writing 800 MB beside it at 1M items).",
    ),
    fresh_full_parts: bool = typer.Option(
        False,
        "--fresh-full-parts",
        help="Each swap's full version gets item rows and index bytes of its own (one value changed), "
        "so it is read from Redis as a rebuilt version is (0.7 GB at 1M items); default: reused.",
    ),
    probe_s: float = typer.Option(
        0.0,
        "--probe-s",
        min=0,
        help="After the other runs: one connection, a request every 5 ms at most, for this many seconds "
        "while the --swaps versions (written first) are made current; counts requests over 30 and 100 ms.",
        callback=finite,
    ),
    http_floor: bool = typer.Option(
        True,
        "--http-floor/--no-http-floor",
        help="With --open-rate: also drive a server that does nothing at the same rates (the HTTP floor).",
    ),
    log_dir: Path | None = typer.Option(None, "--log-dir", help="Keep the retriever's log in this directory."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """HTTP p50/p99 and QPS of the real retriever, the in-process compute floor beside it, and
    errors counted while snapshot versions are swapped in under the load. Exits with status 1
    when a request failed or a swap did (the report's run_errors).

    Redis is started on a free port unless REDIS_URL is set. An HNSW build over 1M items takes
    many minutes (260 s on 2 idle threads, 16-26 min on a busy 2-core machine): pass
    --index-cache DIR to build it once and reuse it.
    """
    from retriever import malloc
    from twotower.config import load_config

    # the in-process floor searches memory like the retriever's, and the retriever inherits them
    malloc.reexec_with(malloc.wanted(load_config().retriever))
    _stop_on_sigterm()
    _setup_logging(verbose)
    from bench.common import write_report
    from bench.retriever import RetrieverBenchOptions, run

    opts = RetrieverBenchOptions(
        items=items,
        duration_s=duration_s,
        concurrency=concurrency,
        workers=workers,
        swaps=swaps,
        users=users,
        k=k,
        index_kind=index,
        floor_requests=floor_requests,
        warmup_s=warmup_s,
        load_tool=load_tool,
        wrk_threads=wrk_threads,
        swap_kinds=swap_kinds,
        index_cache=index_cache,
        open_rates=tuple(open_rates),
        open_swaps=open_swaps,
        prewrite_swaps=prewrite_swaps,
        fresh_full_parts=fresh_full_parts,
        probe_s=probe_s,
        http_floor=http_floor,
        log_dir=log_dir,
    )
    report = run(opts)
    typer.echo(write_report(report, json_out))
    if report["run_errors"]:  # failed requests or swaps: the figures are not those of a clean run
        for error in report["run_errors"]:
            typer.echo(f"bench retriever: {error}", err=True)
        raise typer.Exit(1)


@app.command("freshness")
def freshness_command(
    clicks: int = typer.Option(50, "--clicks", min=1, help="Probe clicks (one at a time)."),
    catalog: int = typer.Option(1_000, "--catalog", min=20, help="Items in the seeded catalogue."),
    background_rate: float = typer.Option(
        20.0,
        "--background-rate",
        min=0,
        help="Events per second of other users meanwhile (0: a silent system).",
        callback=finite,
    ),
    timeout_s: float = typer.Option(
        30.0, "--timeout-s", min=1, help="Longest wait per probe and path.", callback=finite
    ),
    state_users: int = typer.Option(
        0,
        "--state-users",
        min=0,
        help="Start the trainer from a checkpoint already holding this many users (ID row, profile, "
        "full history over the seeded catalogue): checkpoints of a deployment's size. 0: from scratch.",
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="section.field=value passed to every daemon (default settings otherwise)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
    logs: Path | None = typer.Option(None, "--logs", help="Copy the daemons' logs into this directory."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Click produced → served result reflects it (history path, target p95 <= 1 s) and
    → the trainer's updated ID rows for that user and item are served (parameter path,
    target p95 <= 5 s), with the real Kafka, Redis, trainer, publisher and retriever.
    """
    _stop_on_sigterm()
    _setup_logging(verbose)
    from bench.common import SystemOptions, write_report
    from bench.freshness import run

    opts = SystemOptions(
        catalog=catalog,
        background_rate=background_rate,
        env_overrides=_parse_sets(settings),
        state_users=state_users,
    )
    typer.echo(write_report(run(opts, clicks=clicks, timeout_s=timeout_s, keep_logs=logs), json_out))


@app.command("cold-item")
def cold_item_command(
    items: int = typer.Option(20, "--items", min=1, help="New catalogue items published (one at a time)."),
    catalog: int = typer.Option(1_000, "--catalog", min=20, help="Items in the seeded catalogue."),
    background_rate: float = typer.Option(
        20.0, "--background-rate", min=0, help="Events per second meanwhile.", callback=finite
    ),
    timeout_s: float = typer.Option(30.0, "--timeout-s", min=1, help="Longest wait per item.", callback=finite),
    settings: list[str] = typer.Option([], "--set", help="section.field=value passed to every daemon."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
    logs: Path | None = typer.Option(None, "--logs", help="Copy the daemons' logs into this directory."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Catalogue event → the new item is returned by the retriever (target <= 2 s)."""
    _stop_on_sigterm()
    _setup_logging(verbose)
    from bench.cold_item import run
    from bench.common import SystemOptions, write_report

    opts = SystemOptions(catalog=catalog, background_rate=background_rate, env_overrides=_parse_sets(settings))
    typer.echo(write_report(run(opts, items=items, timeout_s=timeout_s, keep_logs=logs), json_out))


@app.command("checkpoint")
def checkpoint_command(
    users: int = typer.Option(100_000, "--users", min=1, help="User rows, each with a profile and a full history."),
    items: int = typer.Option(50_000, "--items", min=1, help="Item rows, each with a catalogue entry."),
    repeat: int = typer.Option(3, "--repeat", min=1, help="Timed runs of each phase (the median is reported)."),
    state_dir: Path | None = typer.Option(None, "--dir", help="Write the checkpoints under this directory."),
    profile: str | None = typer.Option(
        None, "--profile", help="Print the cProfile of one phase to stderr: to_checkpoint_s, save_s, load_s, ..."
    ),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Trainer checkpoint cost at a state size: to_checkpoint, save, load, the publisher's delta,
    a trainer resume; the file size. No Kafka, Redis or training."""
    _setup_logging(False)
    from bench.checkpoint import run
    from bench.common import write_report

    typer.echo(write_report(run(users, items, repeat, state_dir, profile), json_out))
