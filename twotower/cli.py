"""The ``twotower`` console script: one subcommand per daemon and tool.

Each stage owns its own subcommands (``producers/cli.py``, ``trainer/cli.py``, ...); this
module only assembles them. A global ``--config FILE`` is exported as ``TWOTOWER_CONFIG``
so that every command (and every process the demo starts) reads the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from bench.cli import app as bench_app
from evaluation.cli import app as evaluate_app
from producers.cli import app as produce_app
from publisher.cli import app as publish_app
from retriever.cli import serve_command
from trainer.cli import app as train_app
from trainer.cli import schedule_command
from twotower import infra
from twotower.config import ConfigError
from twotower.demo import demo_command

app = typer.Typer(
    name="twotower",
    help="Streaming online-learning two-tower recommender: Kafka in, fresh embeddings out, Faiss top-K.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    config: Path | None = typer.Option(
        None, "--config", help="TOML configuration file (also: $TWOTOWER_CONFIG).", exists=True, dir_okay=False
    ),
) -> None:
    """Streaming online-learning two-tower recommender.

    Data flows producers → Kafka → trainer → publisher → Redis → retriever; every command
    reads one configuration (defaults, a TOML file, TWOTOWER_<SECTION>__<FIELD> variables,
    KAFKA_BOOTSTRAP and REDIS_URL).
    """
    if config is not None:
        os.environ["TWOTOWER_CONFIG"] = str(config.resolve())


app.add_typer(infra.app, name="infra", help="Start, stop or inspect a local Kafka broker and Redis server.")
app.add_typer(produce_app, name="produce", help="Push events to Kafka: a simulated stream or a replayed log.")
app.add_typer(train_app, name="train", help="Train the model: streaming ID-row updates or the nightly retrain.")
app.command("schedule")(schedule_command)
app.add_typer(publish_app, name="publish", help="Publish snapshots and indexes to Redis (daemon), or roll back.")
app.command("serve")(serve_command)
app.command("demo")(demo_command)
app.add_typer(evaluate_app, name="evaluate", help="Prequential replay evaluation of several policies side by side.")
app.add_typer(bench_app, name="bench", help="Benchmarks of the serving path; each writes --json OUT.")


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # any command: a bad file, variable or option value
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
