"""Integration tests of the producers against the live Kafka broker: simulate and replay, consumed back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import InvalidTimestampError

from producers.replay import replay
from producers.replay_formats import LogSpec
from producers.simulate import SimulatorDaemon
from twotower.config import Config
from twotower.events import CLICK, IMPRESSION, CatalogItem, Interaction, Profile, Record, decode
from twotower.kafka_io import Topics, ensure_topics

pytestmark = pytest.mark.integration


def consume_all(cfg: Config, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Every message of ``topic`` up to its end offsets, once at least ``expected`` exist (or time out)."""
    consumer = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert partitions, f"topic {topic} does not exist"
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout_s
        ends = consumer.end_offsets(partitions)
        while sum(ends.values()) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
            ends = consumer.end_offsets(partitions)
        out: list = []
        while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in partitions):
            for batch in consumer.poll(timeout_ms=500).values():
                out.extend(batch)
        return out
    finally:
        consumer.close()


def decode_checked(messages: list) -> list[Record]:
    """Decode every message, checking the key and that the Kafka timestamp is the event time."""
    records = []
    for message in messages:
        record = decode(message.value)
        key = record.item_id if isinstance(record, CatalogItem) else record.user_id
        assert message.key == key.encode()
        assert message.timestamp == record.ts_ms
        records.append(record)
    return records


def sim_config(config: Config, **simulator: object) -> Config:
    values: dict[str, object] = {
        "n_users": 40, "n_items": 150, "n_categories": 5, "rate_per_s": 500.0, "slate_size": 5,
        "new_item_every_s": 0.1, "seed": 3,
    }  # fmt: skip
    values.update(simulator)
    return config.with_overrides({"simulator": values, "model": {"content_dim": 6, "profile_dim": 3}})


def run_simulator(cfg: Config, max_events: int, http: httpx.Client | None = None) -> SimulatorDaemon:
    daemon = SimulatorDaemon(cfg, max_events=max_events, duration_s=60.0, http=http, retriever_backoff_s=0.2)
    try:
        daemon.startup()
        daemon.main_loop()
    finally:
        daemon.shutdown()
    return daemon


def test_simulator_stream_decodes_back(config: Config) -> None:
    cfg = sim_config(config)
    daemon = run_simulator(cfg, max_events=400)
    stats = daemon.stats
    assert stats.interactions >= 400 and stats.send_errors == 0
    assert stats.requests == {"retriever": 0, "fallback": stats.random_requests}
    topics = Topics(cfg.kafka.topic_prefix)

    catalog = decode_checked(consume_all(cfg, topics.catalog, stats.events["catalog"]))
    assert len(catalog) == stats.events["catalog"] == daemon.world.n_items
    assert all(isinstance(r, CatalogItem) and len(r.features) == 6 for r in catalog)
    assert {r.item_id for r in catalog} == {f"i{j}" for j in range(daemon.world.n_items)}
    assert daemon.world.n_items > 150  # new items arrived and were published

    profiles = decode_checked(consume_all(cfg, topics.profiles, 40))
    assert sorted(r.user_id for r in profiles if isinstance(r, Profile)) == sorted(f"u{u}" for u in range(40))

    events = decode_checked(consume_all(cfg, topics.events, stats.interactions))
    assert len(events) == stats.interactions
    assert all(isinstance(r, Interaction) for r in events)
    assert len({r.event_id for r in events}) == len(events)
    kinds = Counter(r.type for r in events)
    assert kinds[IMPRESSION] == stats.events[IMPRESSION] and kinds[CLICK] == stats.events[CLICK]
    by_request: dict[str, list[Interaction]] = defaultdict(list)
    for r in events:
        by_request[r.request_id].append(r)
    organic = [r for r in events if r.context.get("source") == "organic"]
    n_requests = stats.random_requests
    assert len(organic) == n_requests
    assert all(r.type == CLICK and r.position == 0 and len(by_request[r.request_id]) == 1 for r in organic)
    slates = {rid: rs for rid, rs in by_request.items() if not rid.endswith("-o")}
    assert len(slates) == n_requests
    catalog_ids = {r.item_id for r in catalog}
    for rs in slates.values():
        shown = {r.position: r.item_id for r in rs if r.type == IMPRESSION}
        assert sorted(shown) == list(range(5))
        assert len({r.user_id for r in rs}) == 1 and len({r.ts_ms for r in rs}) == 1
        for click in (r for r in rs if r.type == CLICK):
            assert shown[click.position] == click.item_id and click.context == {"source": "fallback"}
        assert set(shown.values()) <= catalog_ids


def oracle_retriever(daemon_ref: list[SimulatorDaemon]) -> Callable[[httpx.Request], httpx.Response]:
    """A stand-in retriever answering each user's true top-k (the ground truth is the best model)."""

    def handler(request: httpx.Request) -> httpx.Response:
        world = daemon_ref[0].world
        user = int(request.url.params["user_id"][1:])
        k = int(request.url.params["k"])
        top = np.argsort(-world.true_scores(user))[:k]
        items = [{"item_id": world.item_id(int(j)), "score": 0.0} for j in top]
        return httpx.Response(200, json={"items": items, "version": 7})

    return handler


def test_simulator_with_retriever_counts_served_hits(config: Config) -> None:
    cfg = sim_config(config, retriever_url="http://retriever.test", new_item_every_s=10.0)
    ref: list[SimulatorDaemon] = []
    http = httpx.Client(transport=httpx.MockTransport(oracle_retriever(ref)), timeout=0.3)
    daemon = SimulatorDaemon(cfg, max_events=1200, duration_s=60.0, http=http)
    ref.append(daemon)
    try:
        daemon.startup()
        daemon.main_loop()
    finally:
        daemon.shutdown()
        http.close()
    stats = daemon.stats
    assert stats.requests["fallback"] == 0 and stats.retriever_errors == 0
    assert stats.served_requests == stats.requests["retriever"] == stats.random_requests
    served_rate = stats.served_hits / stats.served_requests
    random_rate = stats.random_hits / stats.random_requests
    assert served_rate > 0.1 and served_rate > 3 * random_rate
    topics = Topics(cfg.kafka.topic_prefix)
    events = decode_checked(consume_all(cfg, topics.events, stats.interactions))
    impressions = [r for r in events if r.type == IMPRESSION]
    assert impressions and all(r.context["source"] == "retriever" and r.context["version"] == 7 for r in impressions)
    # asked for 2 x slate_size, showed slate_size: the rest are the trainer's hard negatives
    assert all(len(r.context["retrieved"]) == 5 and r.item_id not in r.context["retrieved"] for r in impressions)


def test_simulator_falls_back_when_the_retriever_fails(config: Config) -> None:
    cfg = sim_config(config, retriever_url="http://retriever.test")
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        return httpx.Response(503, json={"detail": "no snapshot yet"})

    with httpx.Client(transport=httpx.MockTransport(handler), timeout=0.3) as http:
        daemon = run_simulator(cfg, max_events=600, http=http)
    stats = daemon.stats
    assert stats.requests["retriever"] == 0 and stats.served_requests == 0
    assert stats.requests["fallback"] == stats.random_requests > 0
    assert stats.retriever_errors == len(calls) >= 1
    assert stats.retriever_errors < stats.requests["fallback"]  # backoff: not one failed call per request


def test_simulator_stops_cleanly_on_sigterm(config: Config, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": config.kafka.bootstrap,
        "TWOTOWER_KAFKA__TOPIC_PREFIX": config.kafka.topic_prefix,
        "TWOTOWER_SIMULATOR__NEW_ITEM_EVERY_S": "1000",
        "TWOTOWER_OBSERVABILITY__LOG_FORMAT": "text",
    }
    cmd = [sys.executable, "-c", "from producers.cli import app; app()", "simulate", "--rate", "100",
           "--users", "20", "--items", "50"]  # fmt: skip
    log_file = tmp_path / "sim.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "simulator started" not in log_file.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log_file.read_text()
                time.sleep(0.2)
            time.sleep(1.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log_file.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log_file.read_text()
    assert "simulator stopped" in output
    topics = Topics(config.kafka.topic_prefix)
    events = decode_checked(consume_all(config, topics.events, 1, timeout_s=10))
    organic = [r for r in events if r.context.get("source") == "organic"]
    assert len(organic) >= 50  # ~1.5 s at 100 requests/s, all flushed before exit
    requests = {r.request_id for r in events if r.context.get("source") != "organic"}
    assert len(requests) == len(organic)  # no request was cut in half by the stop


def test_replay_csv_keeps_original_timestamps(config: Config, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base_ms = 1_600_000_000_000
    times = base_ms + np.sort(rng.integers(0, 3_600_000, size=300))[::-1]  # file in reverse time order
    path = tmp_path / "clicks.tsv"
    lines = [f"{t}\t{rng.integers(50)}.0\tignored\tu{rng.integers(20)}" for t in times]
    path.write_text("\n".join(lines) + "\n")
    spec = LogSpec(
        "csv", "user", "item", "when", has_header=False, columns=["when", "item", "x", "user"], delimiter="\t"
    )
    result = replay(config, path, spec, progress=False)
    assert (result.events, result.catalog, result.interrupted) == (300, 0, False)
    assert (result.first_ts_ms, result.last_ts_ms) == (int(times.min()), int(times.max()))

    topic = Topics(config.kafka.topic_prefix).events
    messages = consume_all(config, topic, 300)
    records = decode_checked(messages)
    assert len(records) == 300
    assert sorted(r.ts_ms for r in records) == sorted(int(t) for t in times)
    by_line = {int(r.event_id.rsplit(":", 1)[1]): r for r in records}
    assert len(by_line) == 300
    for line, text in enumerate(lines, start=1):
        when, item, _, user = text.split("\t")
        record = by_line[line]
        assert (record.user_id, record.item_id, record.ts_ms) == (user, item.removesuffix(".0"), int(when))
        assert record.event_id == record.request_id == f"csv:clicks.tsv:{line}"
        assert record.type == CLICK and record.position == 0
    per_partition: dict[int, list[int]] = defaultdict(list)
    for message in messages:
        per_partition[message.partition].append(message.timestamp)
    assert all(ts == sorted(ts) for ts in per_partition.values())  # sent in event-time order


def test_replay_paced_by_speed(config: Config, tmp_path: Path) -> None:
    path = tmp_path / "paced.csv"
    path.write_text("user,item,ts\n" + "".join(f"u{i},i{i},{1000 + i * 250}\n" for i in range(9)))
    started = time.monotonic()
    result = replay(config, path, LogSpec("csv", time_unit="ms"), speed=4.0, progress=False)  # 2 s of event time: 0.5 s
    elapsed = time.monotonic() - started
    assert result.events == 9
    assert 0.5 <= elapsed < 10


def test_replay_movielens_100k_sends_the_catalogue_first(config: Config, dataset: Callable[[str], Path]) -> None:
    result = replay(config, dataset("ml-100k/u.data"), "movielens-100k", limit=200, progress=False)
    assert (result.events, result.catalog) == (200, 1682)
    topics = Topics(config.kafka.topic_prefix)
    catalog = decode_checked(consume_all(config, topics.catalog, 1682))
    assert len(catalog) == 1682
    toy_story = next(r for r in catalog if r.item_id == "1")
    assert toy_story.category == "Animation" and toy_story.title == "Toy Story (1995)"
    assert toy_story.ts_ms == result.first_ts_ms
    events = decode_checked(consume_all(config, topics.events, 200))
    assert len(events) == 200 and min(r.ts_ms for r in events) == 874_724_710_000


def test_replay_refuses_a_log_with_times_the_broker_would_refuse(config: Config, tmp_path: Path) -> None:
    """Kafka 4 refuses a record more than ``message.timestamp.after.max.ms`` (default one hour)
    ahead of its clock. That keeps one far-future event time from moving the trainer's clock;
    the replayer finds such rows before sending anything rather than failing them after the rest."""
    now = int(time.time() * 1000)
    path = tmp_path / "future.csv"
    path.write_text(f"user,item,ts\nu1,i1,{now - 60_000}\nu2,i2,{now + 3 * 3_600_000}\n")
    with pytest.raises(ValueError, match=r"future\.csv:3: event time \d+ ms is 3\.0 h ahead .*nothing was sent"):
        replay(config, path, LogSpec("csv", time_unit="ms"), progress=False)
    topic = Topics(config.kafka.topic_prefix).events
    assert consume_all(config, topic, 0, timeout_s=5) == []

    producer = KafkaProducer(bootstrap_servers=config.kafka.bootstrap)
    try:  # what the check is for: the broker takes a row just inside its limit, not one beyond
        producer.send(topic, value=b"x", timestamp_ms=now + 60_000).get(timeout=30)
        with pytest.raises(InvalidTimestampError):
            producer.send(topic, value=b"x", timestamp_ms=now + 3 * 3_600_000).get(timeout=30)
    finally:
        producer.close(timeout=5)


def test_replay_warns_when_the_topic_would_delete_the_history(
    config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.csv"
    path.write_text("user,item,ts\nu1,i1,1600000000000\n")
    week = config.with_overrides({"kafka": {"events_retention_ms": 7 * 86_400_000}})
    with caplog.at_level("WARNING", logger="producers.replay"):
        assert replay(week, path, LogSpec("csv", time_unit="ms"), progress=False).events == 1
    assert "has retention.ms=604800000 but the replayed events are older" in caplog.text


def test_a_bad_u_item_line_sends_nothing(config: Config, tmp_path: Path) -> None:
    """The catalogue was sent while read: 150 items had gone out when line 151 failed."""
    (tmp_path / "u.data").write_text("1\t1\t5\t881250949\n2\t2\t3\t881250950\n")
    good = "1|Toy Story (1995)|01-Jan-1995||url" + "|0" * 19
    (tmp_path / "u.item").write_text(f"{good}\n2|Broken|x\n")
    with pytest.raises(ValueError, match=r"u\.item:2: expected 24"):
        replay(config, tmp_path / "u.data", "movielens-100k", progress=False)
    topics = ensure_topics(config.kafka)  # the replay failed before it made them
    assert consume_all(config, topics.catalog, 0, timeout_s=5) == []
    assert consume_all(config, topics.events, 0, timeout_s=5) == []
