"""``evaluate replay --live``: the same replay, through Kafka and the running daemons.

The offline harness drives the trainer's code in-process with an event-time clock; the live
mode checks that the deployed system behaves the same. It runs the real stack — Kafka,
Redis, ``train stream``, ``publish`` and ``serve`` as subprocesses — and feeds it the log:

1. the warm-up events (first 60 %) go to the events topic with their original timestamps,
   and the trainer's state is bootstrapped on them exactly as the offline two-tower policies
   do (:class:`evaluation.two_tower.WarmStart`), written as the trainer's checkpoint with the
   events topic's end offsets, so the streaming trainer starts after the warm-up;
2. every later event, paced at ``speed`` times real time (event-time gaps divided by ``speed``;
   as fast as the stack answers when it cannot keep up), is **first** scored — ``GET
   /recommend`` from the retriever, the user's seen items removed and the list filled from
   trailing popularity by the same :class:`~evaluation.protocol.World` as offline — and
   **then** produced to Kafka as a click;
3. a UTC day boundary runs ``train nightly`` for the previous day in-process; it finds the
   streaming trainer holding the state and hands its result over, as in production.

What differs from offline is only what the live system adds: wall-clock micro-batching and
the publish delay (checkpoint interval + publisher poll + retriever swap, in wall seconds,
i.e. ``speed`` times that in event time). ``--compare`` runs the offline
``two_tower_streaming`` on the same log with ``publish_every`` set to that delay, so both
lines land in one report.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from kafka import TopicPartition

from evaluation.metrics import PolicyMetrics, Series, hit
from evaluation.protocol import Event, Protocol, World, utc_day, warmup_size
from evaluation.two_tower import WarmStart, click, utc_date
from trainer.nightly import run_nightly
from trainer.stream import APPLIED_ABOVE
from twotower import checkpoint, infra
from twotower.config import Config
from twotower.demo import free_port
from twotower.kafka_io import Topics, ensure_topics, make_consumer, make_producer, partition_key, send_record
from twotower.processes import DaemonProcess, wait_healthy

log = logging.getLogger(__name__)

LIVE_POLICY = "two_tower_live"
"""The name of the live system's line in the report."""


@dataclass(frozen=True)
class LiveSettings:
    """How the live replay runs."""

    speed: float
    """Event-time seconds per wall-clock second."""
    state_root: Path
    """Trainer state, daemon logs and (when started here) Kafka and Redis live under this."""
    bootstrap_epochs: int
    startup_timeout_s: float = 180.0
    settle_timeout_s: float = 300.0
    """How long to wait for the stack to take in the warm-up (history written, first version served)."""

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError(f"speed must be positive, got {self.speed}")


@dataclass
class LiveRun:
    """What the live replay measured (the offline report's shape, plus the stack's figures)."""

    metrics: PolicyMetrics
    series: Series
    warmup_events: int
    seconds: float
    nightly: list[dict[str, Any]]
    served_version: int | None
    request_errors: int
    logs: str
    event_span_s: float = 0.0
    """Event time covered by the scored events."""
    scoring_wall_s: float = 0.0
    """Wall time the scoring loop took (nightly runs included)."""

    @property
    def effective_speed(self) -> float:
        """Event-time seconds per wall second actually achieved (below ``speed`` when the stack lags)."""
        return self.event_span_s / self.scoring_wall_s if self.scoring_wall_s > 0 else 0.0

    def describe(self, settings: LiveSettings, publish_delay_s: float) -> dict[str, Any]:
        return {
            "speed": settings.speed,
            "effective_speed": round(self.effective_speed, 1),
            "publish_delay_wall_s": publish_delay_s,
            "publish_delay_event_s": publish_delay_s * min(settings.speed, self.effective_speed or settings.speed),
            "bootstrap_epochs": settings.bootstrap_epochs,
            "nightly_runs": self.nightly,
            "served_version_at_end": self.served_version,
            "request_errors": self.request_errors,
            "wall_seconds": round(self.seconds, 1),
            "logs": self.logs,
        }


def publish_delay_s(cfg: Config) -> float:
    """Wall seconds from a learned click to the retriever serving it (upper bound, no load)."""
    return cfg.trainer.checkpoint_interval_s + cfg.publisher.poll_interval_s + 1.0


def run_live(
    events: Sequence[Event],
    protocol: Protocol,
    settings: LiveSettings,
    base_cfg: Config,
    on_event: Callable[[int, int], None] | None = None,
) -> LiveRun:
    """Replay ``events`` (sorted) through the live stack; ``on_event(done, total)`` reports progress."""
    started = time.perf_counter()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = (settings.state_root / run_id).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    infra_dir = settings.state_root / "infra"
    with infra.running(infra_dir) as endpoints:  # stops at the end what it started
        prefix = f"live-{run_id}"
        cfg = base_cfg.with_overrides(
            {
                "kafka": {"bootstrap": endpoints.kafka_bootstrap, "topic_prefix": f"{prefix}-"},
                "redis": {"url": endpoints.redis_url, "key_prefix": prefix},
                "trainer": {
                    "state_dir": run_dir / "trainer",
                    "group_id": f"{prefix}-trainer",
                    "seed": protocol.seed,
                    "schedule_timezone": "UTC",  # the protocol's days are UTC days
                },
                "publisher": {"group_id": f"{prefix}-publisher"},
            }
        )
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP": cfg.kafka.bootstrap,
            "REDIS_URL": cfg.redis.url,
            "TWOTOWER_KAFKA__TOPIC_PREFIX": cfg.kafka.topic_prefix,
            "TWOTOWER_REDIS__KEY_PREFIX": cfg.redis.key_prefix,
            "TWOTOWER_TRAINER__STATE_DIR": str(cfg.trainer.state_dir),
            "TWOTOWER_TRAINER__GROUP_ID": cfg.trainer.group_id,
            "TWOTOWER_TRAINER__SEED": str(protocol.seed),
            "TWOTOWER_TRAINER__SCHEDULE_TIMEZONE": "UTC",
            "TWOTOWER_PUBLISHER__GROUP_ID": cfg.publisher.group_id,
            "TWOTOWER_OBSERVABILITY__LOG_FORMAT": "json",
        }
        daemons: list[DaemonProcess] = []
        try:
            topics = ensure_topics(cfg.kafka)
            n_warm = warmup_size(len(events), protocol.warmup_fraction)
            warmup = list(events[:n_warm])
            producer = make_producer(cfg.kafka, client_id="twotower-live", linger_ms=5)
            try:
                for index, event in enumerate(warmup):
                    send_record(producer, topics.events, click(event, index))
                producer.flush(timeout=120)
                _bootstrap_checkpoint(cfg, warmup, settings.bootstrap_epochs, topics.events)

                retriever_port = free_port()
                health: list[tuple[DaemonProcess, str]] = []
                for name, args in (
                    ("trainer", ["train", "stream"]),
                    ("publisher", ["publish"]),
                    ("retriever", ["serve", "--port", str(retriever_port)]),
                ):
                    port = retriever_port if name == "retriever" else free_port()
                    daemon = DaemonProcess(name, args, run_dir / "logs" / f"{name}.log")
                    proc_env = dict(env)
                    if name != "retriever":
                        proc_env["TWOTOWER_OBSERVABILITY__METRICS_PORT"] = str(port)
                    daemon.start(proc_env)
                    daemons.append(daemon)
                    health.append((daemon, f"http://127.0.0.1:{port}/health"))
                # the trainer and publisher must be consuming, not just answering, before the first event
                wait_healthy(health[:2], settings.startup_timeout_s, ready=True)
                wait_healthy(health[2:], settings.startup_timeout_s)
                base_url = f"http://127.0.0.1:{retriever_port}"
                with httpx.Client(base_url=base_url, timeout=10.0) as http:
                    _settle(cfg, topics.events, http, settings.settle_timeout_s, daemons)
                    run = _score_and_feed(events, n_warm, protocol, settings, cfg, producer, http, daemons, on_event)
            finally:
                producer.close(timeout=10)
            run.seconds = time.perf_counter() - started
            run.logs = str(run_dir / "logs")
            return run
        finally:
            for daemon in reversed(daemons):
                daemon.stop(timeout_s=20)


def _bootstrap_checkpoint(cfg: Config, warmup: list[Event], epochs: int, events_topic: str) -> None:
    """The offline harness's warm start, saved as the trainer's checkpoint past the warm-up."""
    state = WarmStart(cfg.model, cfg.trainer, epochs).state(warmup)
    consumer = make_consumer(cfg.kafka, None)
    try:
        tps = [TopicPartition(events_topic, p) for p in sorted(consumer.partitions_for_topic(events_topic) or ())]
        ends = consumer.end_offsets(tps)
    finally:
        consumer.close()
    state.seq += 1
    offsets = {partition_key((tp.topic, tp.partition)): int(end) for tp, end in ends.items()}
    checkpoint.save(Path(cfg.trainer.state_dir), state.to_checkpoint(offsets, {APPLIED_ABOVE: {}}))
    log.info("bootstrapped the trainer on %d warm-up events (%d epochs)", len(warmup), epochs)


def _settle(
    cfg: Config, events_topic: str, http: httpx.Client, timeout_s: float, daemons: Sequence[DaemonProcess]
) -> None:
    """Wait until the publisher has written the warm-up histories and the retriever serves a version."""
    consumer = make_consumer(cfg.kafka, cfg.publisher.group_id)
    deadline = time.monotonic() + timeout_s
    try:
        tps = [TopicPartition(events_topic, p) for p in sorted(consumer.partitions_for_topic(events_topic) or ())]
        ends = consumer.end_offsets(tps)
        while True:
            for daemon in daemons:
                daemon.check_alive()
            committed = {tp: consumer.committed(tp) or 0 for tp in tps}
            ready = http.get("/ready").status_code == 200 if all(committed[tp] >= ends[tp] for tp in tps) else False
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not take in the warm-up within {timeout_s:.0f} s")
            time.sleep(0.5)
    finally:
        consumer.close()


def _score_and_feed(
    events: Sequence[Event],
    n_warm: int,
    protocol: Protocol,
    settings: LiveSettings,
    cfg: Config,
    producer: Any,
    http: httpx.Client,
    daemons: Sequence[DaemonProcess],
    on_event: Callable[[int, int], None] | None,
) -> LiveRun:
    topics_events = Topics(cfg.kafka.topic_prefix).events
    world = World(protocol)
    for event in events[:n_warm]:
        world.observe(event)
    metrics = PolicyMetrics(protocol.k, protocol.recall_k)
    series = Series()
    nightly: list[dict[str, Any]] = []
    errors = 0
    version: int | None = None
    fetch = min(cfg.retriever.max_k, protocol.recall_k + protocol.history_max_len)
    day = utc_day(events[n_warm - 1].ts_ms) if n_warm else None
    total = len(events) - n_warm
    if total <= 0:
        return LiveRun(metrics, series, n_warm, 0.0, nightly, version, errors, "")
    wall0, ts0 = time.monotonic(), events[n_warm].ts_ms
    for done, index in enumerate(range(n_warm, len(events))):
        event = events[index]
        user, item, now = event
        today = utc_day(now)
        if day is not None and today != day:
            producer.flush(timeout=60)  # the day's last clicks must be in Kafka before the nightly reads it
            result = run_nightly(cfg, utc_date(day), progress=False)
            nightly.append({"date": result.date, "status": result.status, "examples": result.examples})
        day = today
        wait = wall0 + (now - ts0) / 1000.0 / settings.speed - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if done % 200 == 0:
            for daemon in daemons:
                daemon.check_alive()
        world.advance(now)
        try:
            response = http.get("/recommend", params={"user_id": user, "k": fetch})
            response.raise_for_status()
            body = response.json()
            version = body.get("version", version)
            served = [entry["item_id"] for entry in body["items"]]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            errors += 1
            if errors <= 5:
                log.warning("retriever request failed (%s): the list is filled from popularity", exc)
            served = []
        seen = world.seen_by(user)
        unseen = [i for i in served if i not in seen][: protocol.recall_k]
        recs, filled = world.fill(unseen, user, protocol.recall_k)
        rank = metrics.update(item, recs, world.is_cold_item(item, now), world.is_new_user(user, now), filled)
        series.add(today, {LIVE_POLICY: hit(rank, protocol.k)})
        send_record(producer, topics_events, click(event, index))
        world.observe(event)
        if on_event is not None:
            on_event(done + 1, total)
    producer.flush(timeout=60)
    return LiveRun(
        metrics,
        series,
        n_warm,
        0.0,
        nightly,
        version,
        errors,
        "",
        event_span_s=(events[-1].ts_ms - ts0) / 1000.0,
        scoring_wall_s=time.monotonic() - wall0,
    )
