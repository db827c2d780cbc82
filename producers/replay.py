"""Replay a logged dataset into Kafka as ``click`` interactions, keeping the original event times.

Each row becomes an :class:`Interaction` of type ``click`` whose ``ts_ms`` (and Kafka record
timestamp) is the row's original time, with a deterministic ``event_id`` =
``request_id`` = ``"{format}:{file name}:{line}"``, the same each time the file is replayed.
Nothing downstream deduplicates by it: the trainer learns a file replayed twice twice, and the
serving state holds its clicks twice, so replay a log into fresh topics (``kafka.topic_prefix``)
rather than again into the same ones. Rows go out in event-time order, as fast
as possible or paced so that wall-clock gaps are event-time gaps divided by ``speed``.

For MovieLens-100K the item catalogue in ``u.item`` beside ``u.data`` (if present) is sent
first, stamped with the first event's time: category = first genre, features = 19 genre flags.

Note on retention: the records carry their original (possibly decades-old) timestamps, and
Kafka's time-based retention deletes a segment once its newest timestamp is older than
``retention.ms`` (7 days by default). A topic meant to keep a replayed history needs
``retention.ms=-1``; :func:`replay` logs a warning when the events topic would delete it.

The other way round, the broker refuses a record more than the topic's
``message.timestamp.after.max.ms`` (Kafka 4: one hour) ahead of its clock; :func:`replay`
refuses a log with such rows before sending any of it, as it does one with rows older than the
topic's ``message.timestamp.before.max.ms``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from producers.replay_formats import LogSpec, SourceRow, read_movielens_items
from twotower.config import Config
from twotower.daemon import ShutdownFlag
from twotower.events import CLICK, CatalogItem, Interaction
from twotower.kafka_io import ensure_topics, make_producer, send_record, topic_configs

log = logging.getLogger(__name__)

REPLAY_CONTEXT = {"source": "replay"}


@dataclass(frozen=True)
class ReplayResult:
    """What a replay sent."""

    events: int
    """Click interactions sent."""
    catalog: int
    """Catalogue items sent before the events."""
    first_ts_ms: int | None
    """Event time of the first row sent (``None`` if none was)."""
    last_ts_ms: int | None
    """Event time of the last row sent."""
    elapsed_s: float
    """Wall-clock duration of the replay, including the final flush."""
    interrupted: bool
    """True if a shutdown request stopped it before the end."""


AHEAD_LIMIT_CONFIG = "message.timestamp.after.max.ms"
"""The topic setting by which the broker refuses a record whose timestamp (here the event time) is
further ahead of its clock (Kafka 4's default: one hour)."""
BEHIND_LIMIT_CONFIG = "message.timestamp.before.max.ms"
"""The one by which it refuses a record whose timestamp is further behind (default: no limit)."""


class DeliveryError(RuntimeError):
    """Records the broker did not take, after the replay sent what it could."""


def _warn_about_retention(retention_ms: int | None, topic: str, oldest_ts_ms: int) -> None:
    if retention_ms is not None and retention_ms >= 0 and time.time() * 1000 - oldest_ts_ms > retention_ms:
        log.warning(
            "topic %s has retention.ms=%d but the replayed events are older: the broker will delete them at "
            "its next retention check; set retention.ms=-1 on the topic to keep a replayed history",
            topic,
            retention_ms,
        )


def check_times(path: Path, rows: list[SourceRow], limits: dict[str, str], now_ms: int) -> None:
    """Refuse, before anything is sent, a log with rows the broker would refuse: those whose
    time is more than the topic's :data:`AHEAD_LIMIT_CONFIG` after ``now_ms`` or more than its
    :data:`BEHIND_LIMIT_CONFIG` before it (``limits``: the topic's settings as the broker gives
    them; one missing sets no limit).

    ``rows`` are in event-time order. Sending them would fail those rows only, and the broker
    refuses a whole batch for one of them, after the others went out: a corrected file could
    then not be replayed into the same topics again.

    Raises:
        ValueError: naming the first such row's file and line, its time and how many rows are affected.
    """
    if not rows:
        return
    for name, sign in ((AHEAD_LIMIT_CONFIG, 1), (BEHIND_LIMIT_CONFIG, -1)):
        if name not in limits:
            continue
        limit = int(limits[name])
        if sign * (rows[-1 if sign > 0 else 0].ts_ms - now_ms) <= limit:
            continue
        out = [row for row in rows if sign * (row.ts_ms - now_ms) > limit]
        first = min(out, key=lambda row: row.line)
        raise ValueError(
            f"{path}:{first.line}: event time {first.ts_ms} ms is {abs(first.ts_ms - now_ms) / 3_600_000:.1f} h "
            f"{'ahead of' if sign > 0 else 'behind'} this machine's clock; the broker refuses records more than "
            f"{limit} ms {'ahead' if sign > 0 else 'behind'} (the events topic's {name}), and {len(out)} row(s) "
            "are: nothing was sent"
        )


def _short_name(name: str, keep: int = 64) -> str:
    """``name``, or for a long one its first ``keep`` characters and a digest of the rest, so that
    event ids (``format:name:line``) stay within the schema's 256 characters."""
    if len(name) <= keep + 9:
        return name
    return f"{name[:keep]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def replay(
    cfg: Config,
    path: str | Path,
    log_spec: LogSpec | str,
    *,
    speed: float | None = None,
    limit: int | None = None,
    shutdown_flag: ShutdownFlag | None = None,
    progress: bool = True,
) -> ReplayResult:
    """Send a dataset's interactions (and MovieLens-100K's catalogue) to Kafka in event-time order.

    Args:
        cfg: configuration (only the kafka section is used).
        path: the interaction file.
        log_spec: how to read it; a format name alone for a fixed format or a csv log whose
            columns are guessed from its header.
        speed: ``None`` sends as fast as possible; otherwise event-time gaps divided by
            ``speed`` become wall-clock gaps (``speed=3600``: an hour of history per second).
        limit: send only the first ``limit`` rows in time order.
        shutdown_flag: stops the replay (after a flush) when set, e.g. by SIGTERM.
        progress: show a tqdm progress bar on stderr.

    Raises:
        ValueError: bad arguments or a bad file (the message names the line), found before
            anything is sent.
        DeliveryError: records the broker refused or could not take (the others were sent).
    """
    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be a positive number, got {speed}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = Path(path)
    spec = LogSpec.of(log_spec)
    fmt = spec.fmt
    rows = spec.read(path)
    if limit is not None:
        rows = rows[:limit]
    item_file = path.with_name("u.item")  # read whole before anything is sent: a bad line sends nothing
    items = list(read_movielens_items(item_file)) if fmt == "movielens-100k" and item_file.exists() and rows else []
    flag = shutdown_flag or ShutdownFlag()
    started = time.monotonic()

    topics = ensure_topics(cfg.kafka)
    if rows:
        settings = topic_configs(
            cfg.kafka.bootstrap, topics.events, ["retention.ms", AHEAD_LIMIT_CONFIG, BEHIND_LIMIT_CONFIG]
        )
        check_times(path, rows, settings, int(time.time() * 1000))
        retention = settings.get("retention.ms")
        _warn_about_retention(int(retention) if retention is not None else None, topics.events, rows[0].ts_ms)
    # A bulk load: bigger batches and a longer linger roughly double kafka-python's throughput.
    producer = make_producer(cfg.kafka, client_id="twotower-replay", linger_ms=20, batch_size=262_144)
    failures: list[BaseException] = []
    catalog = sent = 0
    interrupted = False
    try:
        if items:
            for item in items:
                record = CatalogItem(item.item_id, item.category, item.features, rows[0].ts_ms, item.title)
                send_record(producer, topics.catalog, record).add_errback(failures.append)
                catalog += 1
            producer.flush(timeout=60)
            log.info("sent %d catalogue items from %s", catalog, item_file)

        prefix = f"{fmt}:{_short_name(path.name)}"
        wall0 = time.monotonic()
        with tqdm(total=len(rows), unit="ev", disable=not progress, desc=f"replay {path.name}") as bar:
            for row in rows:
                if flag.is_set():
                    interrupted = True
                    break
                if speed is not None:
                    due = wall0 + (row.ts_ms - rows[0].ts_ms) / 1000.0 / speed
                    wait = due - time.monotonic()
                    if wait > 0 and flag.wait(min(wait, threading.TIMEOUT_MAX)):
                        interrupted = True
                        break
                event_id = f"{prefix}:{row.line}"
                event = Interaction(
                    event_id, event_id, row.user_id, row.item_id, CLICK, 0, row.ts_ms, dict(REPLAY_CONTEXT)
                )
                send_record(producer, topics.events, event).add_errback(failures.append)
                sent += 1
                bar.update(1)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)
    if failures:
        raise DeliveryError(f"{len(failures)} record(s) could not be delivered; first error: {failures[0]!r}")
    result = ReplayResult(
        events=sent,
        catalog=catalog,
        first_ts_ms=rows[0].ts_ms if sent else None,
        last_ts_ms=rows[sent - 1].ts_ms if sent else None,
        elapsed_s=time.monotonic() - started,
        interrupted=interrupted,
    )
    log.info("replayed %s", path, extra={"result": result.__dict__})
    return result
