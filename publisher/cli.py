"""``twotower publish``: run the publisher daemon, inspect the published versions, or roll back."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Annotated, Any

import redis
import typer

from twotower.config import Config, ConfigError, load_config
from twotower.daemon import run_daemon
from twotower.snapshots import FULL, SnapshotError, SnapshotLayout, SnapshotStore, VersionMeta

app = typer.Typer(
    invoke_without_command=True,
    help="Publish trainer checkpoints as snapshot versions in Redis (daemon), inspect them, or roll back.",
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _config() -> Config:
    try:
        return load_config()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _store(cfg: Config) -> SnapshotStore:
    return SnapshotStore(redis.Redis.from_url(cfg.redis.url), SnapshotLayout(cfg.redis.key_prefix))


@contextlib.contextmanager
def _opened_store(cfg: Config, context: str = "") -> Iterator[SnapshotStore]:
    """The snapshot store, closed afterwards; snapshot and Redis errors end the command with exit 1."""
    store = _store(cfg)
    try:
        yield store
    except SnapshotError as exc:
        typer.echo(f"error: {context}{exc}", err=True)
        raise typer.Exit(1) from None
    except redis.RedisError as exc:
        typer.echo(f"error: redis at {cfg.redis.url}: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        store.redis.close()


@app.callback()
def _main(ctx: typer.Context) -> None:
    """Without a subcommand: run the publisher daemon (snapshot loop + serving-state writer)."""
    if ctx.invoked_subcommand is not None:
        return
    cfg = _config()
    from publisher.daemon import PublisherDaemon  # heavy (torch, faiss): only when the daemon runs

    raise typer.Exit(run_daemon(PublisherDaemon(cfg), cfg.observability))


@app.command("rollback")
def rollback_command(
    version: Annotated[int, typer.Argument(help="Stored version to serve again (checked complete first).")],
) -> None:
    """Point retrievers back to a stored VERSION.

    A running publisher keeps writing newer versions, and the next one it writes is served
    again: stop the publisher first if the rollback must last.
    """
    cfg = _config()
    with _opened_store(cfg, f"cannot roll back to version {version}: ") as store:
        before = store.current_version()
        store.rollback(version)
    typer.echo(f"current version {before} -> {version}")
    typer.echo("note: a running publisher's next version supersedes this rollback", err=True)


def _describe(meta: VersionMeta) -> dict[str, Any]:
    return {
        "version": meta.version,
        "kind": meta.kind,
        "parent": meta.parent,
        "base": meta.base,
        "trainer_seq": meta.trainer_seq,
        "created_ms": meta.created_ms,
        "bytes": sum(size for _, size, _ in meta.parts.values()),
        "parts": {name: size for name, (_, size, _) in meta.parts.items()},
    }


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


@app.command("status")
def status_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show the current version, the chain a retriever applies to serve it, and what is stored."""
    cfg = _config()
    with _opened_store(cfg) as store:
        current = store.current_version()
        newest = store.tip_version()
        stored = [int(v) for v in store.redis.zrange(store.layout.versions, 0, -1)]
        chain = [_describe(m) for m in store.chain(current)] if current is not None else []
        fulls = [v for v in stored if store.meta(v).kind == FULL]
    report = {
        "current": current,
        "newest_made_current": newest,  # another than current after a rollback
        "chain": chain,
        "stored_versions": stored,
        "full_versions": fulls,
    }
    if as_json:
        typer.echo(json.dumps(report))
        return
    if current is None:
        typer.echo(f"no version published under prefix {cfg.redis.key_prefix!r}")
        return
    head = chain[-1]
    typer.echo(
        f"current version {current} ({head['kind']}, base {head['base']}, trainer seq {head['trainer_seq']}, "
        f"{len(chain) - 1} deltas on the base)"
    )
    if newest is not None and newest != current:  # a rollback, back or to a version never made current
        typer.echo(f"rolled back: the newest version made current was {newest}")
    for entry in chain:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["created_ms"] / 1000))
        parts = ", ".join(f"{name} {_human(size)}" for name, size in entry["parts"].items())
        typer.echo(
            f"  v{entry['version']:<6} {entry['kind']:5} trainer seq {entry['trainer_seq']:<8} {created}  "
            f"{_human(entry['bytes']):>9}  [{parts}]"
        )
    span = f"{stored[0]}..{stored[-1]}" if stored else "none"
    typer.echo(f"stored: {len(stored)} versions ({span}), {len(fulls)} full: {fulls}")
