"""Integration tests of the publisher against the live Redis (and, for the serving state, Kafka)."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
import torch
from kafka import KafkaConsumer, KafkaProducer
from test_publisher_unit import make_checkpoint
from typer.testing import CliRunner

from publisher import daemon as publisher_daemon
from publisher.build import content_only_vectors, delta_snapshot, full_snapshot, model_from_checkpoint
from publisher.cli import app
from publisher.daemon import PublisherDaemon, served_items
from publisher.index import deserialize
from publisher.serving_state import ServingStateWriter, decode_history_entry, queue_writes
from retriever.state import ServingState
from twotower import checkpoint
from twotower.blobs import BlobError
from twotower.config import Config
from twotower.events import CatalogItem, Interaction, Profile, Record
from twotower.kafka_io import Topics, ensure_topics, make_producer, send_record
from twotower.snapshot_parts import decode_delta, decode_full, encode_delta, encode_full
from twotower.snapshots import DELTA, FULL, MissingVersionError, SnapshotError, SnapshotLayout, SnapshotStore

pytestmark = pytest.mark.integration


@pytest.fixture
def store(config: Config) -> Iterator[SnapshotStore]:
    client = redis.Redis.from_url(config.redis.url)
    yield SnapshotStore(client, SnapshotLayout(config.redis.key_prefix))
    client.close()


def read_parts(store: SnapshotStore, version: int) -> list[dict[str, bytes]]:
    return [store.read_parts(meta) for meta in store.chain(version)]


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def kafka_config(config: Config, **publisher: object) -> Config:
    """The test's config with a consumer group of its own (and optional publisher settings)."""
    return config.with_overrides({"publisher": {"group_id": f"pub-{uuid.uuid4().hex[:8]}", **publisher}})


def patient_producer(config: Config) -> KafkaProducer:
    """A producer that outlasts leader elections of topics just created on a fresh broker."""
    return make_producer(config.kafka, retries=50, retry_backoff_ms=200)


def send(producer: KafkaProducer, topic: str, record: Record) -> None:
    send_record(producer, topic, record).get(timeout=30)


# ---------------------------------------------------------------- snapshots through the store


def test_full_and_delta_round_trip_through_the_store(store: SnapshotStore) -> None:
    ckpt = make_checkpoint(seq=3)
    full = full_snapshot(ckpt)
    v1 = store.write(FULL, encode_full(full), None, ckpt.seq)
    ckpt2 = make_checkpoint(seq=4, user_updated=[1, 4, 1, 1, 1], item_updated=[1, 1, 1, 1, 4, 1])
    delta = delta_snapshot(ckpt2, since_seq=3)
    v2 = store.write(DELTA, encode_delta(delta), v1, ckpt2.seq)
    assert store.current_version() == v2

    chain = store.chain(v2)
    assert [(m.version, m.kind, m.parent, m.base, m.trainer_seq) for m in chain] == [
        (v1, FULL, None, v1, 3),
        (v2, DELTA, v1, v1, 4),
    ]
    full_parts, delta_parts = read_parts(store, v2)
    back = decode_full(full_parts)
    assert back.model_config == full.model_config and back.items.ids == full.items.ids
    np.testing.assert_array_equal(back.items.matrix, full.items.matrix)
    assert deserialize(back.index).ntotal == len(full.items.ids)
    back_delta = decode_delta(delta_parts)
    assert back_delta.users.ids == ["u1"] and back_delta.items.ids == ["i4"]
    np.testing.assert_array_equal(back_delta.items.matrix, delta.items.matrix)
    assert served_items(store, v2).items == set(full.items.ids)


def test_a_notice_that_cannot_be_sent_leaves_the_version_current(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: object) -> int:
        raise redis.ConnectionError("injected: no notice")

    monkeypatch.setattr(store.redis, "publish", down)
    version = store.write(FULL, encode_full(full_snapshot(make_checkpoint(seq=3))), None, 3)
    assert store.current_version() == version  # written, current, and no exception


def test_a_failed_write_leaves_nothing_no_trim_would_find(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = encode_full(full_snapshot(make_checkpoint(seq=3)))

    def dropped(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("injected: the pointer could not be moved")

    monkeypatch.setattr(store, "_point_to", dropped)
    with pytest.raises(redis.ConnectionError):
        store.write(FULL, parts, None, 3)
    failed = int(store.redis.get(store.layout.seq) or 0)
    assert failed > 0 and not store.redis.keys(f"{store.layout.prefix}:snap:v:{failed}:*")
    monkeypatch.undo()

    # written while a newer version is current: kept, and listed, so a trim finds it
    store.redis.set(store.layout.current, 1_000_000)
    older = store.write(FULL, parts, None, 3)
    assert store.current_version() == 1_000_000
    assert store.redis.zscore(store.layout.versions, str(older)) == older


def test_a_version_whose_writer_died_before_listing_it_is_deleted_by_a_trim(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer killed between storing a version and listing it once left it in Redis for good
    (a whole full version per crash): no trim looked beyond the listed versions."""
    parts = encode_full(full_snapshot(make_checkpoint(seq=3)))
    listed = [store.write(FULL, parts, None, 3), store.write(FULL, parts, None, 3, current=False)]
    store.redis.set(store.layout.current, 1_000_000)
    listed.append(store.write(FULL, parts, None, 3))  # listed, a newer version being current
    assert store.redis.zcard(store.layout.pending) == 0  # every finished write is listed, not pending

    def killed(*args: object, **kwargs: object) -> None:
        raise SystemExit("injected: the writer dies before it lists the version")

    monkeypatch.setattr(store, "_point_to", killed)
    monkeypatch.setattr(store, "_forget", lambda version: None)  # a dead process cleans nothing up
    with pytest.raises(SystemExit):
        store.write(FULL, parts, None, 3)
    monkeypatch.undo()
    dead = int(store.redis.get(store.layout.seq) or 0)
    keys = store.layout.version_keys(dead)
    assert list(store.redis.scan_iter(match=keys)) and store.redis.zscore(store.layout.versions, str(dead)) is None

    assert store.trim(keep_full=10) == [] and list(store.redis.scan_iter(match=keys))  # it may still be writing
    assert store.trim(keep_full=10, pending_max_age_s=0) == [dead]
    assert not list(store.redis.scan_iter(match=keys)) and store.redis.zcard(store.layout.pending) == 0
    assert all(store.meta(v).kind == FULL for v in listed)  # the listed ones are left to the usual rule


def test_a_rollback_moves_the_current_version_and_leaves_the_tip(store: SnapshotStore) -> None:
    """The tip is the newest version a writer made current: what a restarted publisher knew last."""
    full = encode_full(full_snapshot(make_checkpoint(seq=1)))
    delta = encode_delta(delta_snapshot(make_checkpoint(seq=2, item_updated=[2] + [1] * 5), since_seq=1))
    assert store.tip_version() is None
    v1 = store.write(FULL, full, None, 1)
    v2 = store.write(DELTA, delta, v1, 2)
    assert (store.current_version(), store.tip_version()) == (v2, v2)
    store.rollback(v1)
    assert (store.current_version(), store.tip_version()) == (v1, v2)
    v3 = store.write(DELTA, delta, v1, 2)  # a writer goes on from the version rolled back to
    assert (store.current_version(), store.tip_version()) == (v3, v3)
    store.make_current(v2)  # refused: a newer version is current
    store.rollback(v2)
    assert (store.current_version(), store.tip_version()) == (v2, v3)
    v4 = store.write(DELTA, delta, v2, 2, current=False)
    store.make_current(v4)
    assert (store.current_version(), store.tip_version()) == (v4, v4)


def test_corrupted_or_missing_chunk_raises_snapshot_error(config: Config) -> None:
    client = redis.Redis.from_url(config.redis.url)
    store = SnapshotStore(client, SnapshotLayout(config.redis.key_prefix), chunk_bytes=1024)
    try:
        version = store.write(FULL, encode_full(full_snapshot(make_checkpoint())), None, 1)
        meta = store.meta(version)
        assert meta.parts["weights"][2] > 1  # several chunks
        key = store.layout.chunk(version, "weights", 1)
        good = client.get(key)
        assert good is not None
        client.set(key, bytes([good[0] ^ 0xFF]) + good[1:])
        with pytest.raises(SnapshotError, match="checksum"):
            store.read_part(meta, "weights")
        client.set(key, good[:-1])
        with pytest.raises(SnapshotError, match="checksum"):
            store.read_part(meta, "weights")
        client.delete(key)
        with pytest.raises(SnapshotError, match="missing"):
            store.read_part(meta, "weights")
        with pytest.raises(SnapshotError):
            store.rollback(version)  # a rollback checks the version first
        assert store.read_part(meta, "index")  # the other parts are intact
    finally:
        client.close()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("parent", "2", "a delta with parent 2"),  # its own parent: chain() once looped for good
        ("parent", "3", "a delta with parent 3"),  # a newer one: no chain can end that way
        ("parent", "", "a delta with parent None"),
        ("base", "2", "a delta with parent 1 and base 2"),
        ("kind", "fuller", "kind 'fuller'"),
        ("sha256:items", "x/../../../planted", "not 64 hex digits"),  # a reader names files by it
        ("sha256:items", "A" * 64, "not 64 hex digits"),
        ("size:items", "-1", "size -1"),
        ("chunks:items", "0", "in 0 chunks"),
        ("created_ms", "soon", "incomplete meta hash"),
    ],
)
def test_a_meta_hash_out_of_its_ranges_is_refused(store: SnapshotStore, field: str, value: str, match: str) -> None:
    full = encode_full(full_snapshot(make_checkpoint(seq=1)))
    delta = encode_delta(delta_snapshot(make_checkpoint(seq=2, item_updated=[2] + [1] * 5), since_seq=1))
    v1 = store.write(FULL, full, None, 1)
    v2 = store.write(DELTA, delta, v1, 2)
    assert [m.version for m in store.chain(v2)] == [v1, v2]
    store.redis.hset(store.layout.meta(v2), field, value)
    with pytest.raises(SnapshotError, match=re.escape(match)):
        store.chain(v2)
    with pytest.raises(SnapshotError):
        store.rollback(v2)
    store.redis.hset(store.layout.meta(v1), "parent", "1")  # a full version has none
    with pytest.raises(SnapshotError, match="a full version with parent 1"):
        store.meta(v1)


def test_parts_are_read_in_bounded_pieces(config: Config) -> None:
    """A part is read a piece per round trip, never more than ``read_piece_bytes`` at once
    (a big reply holds up every other Redis client), whatever the chunk size it was written in."""
    client = redis.Redis.from_url(config.redis.url)
    store = SnapshotStore(client, SnapshotLayout(config.redis.key_prefix), chunk_bytes=1000, read_piece_bytes=300)
    data = bytes(np.random.default_rng(3).integers(0, 256, 2_500, dtype=np.uint8))
    try:
        version = store.write(FULL, {"blob": data, "empty": b""}, None, 1)
        meta = store.meta(version)
        pieces = list(store.iter_part(meta, "blob"))
        # chunks of 1000, 1000 and 500 bytes, each in pieces of at most 300
        assert [len(p) for p in pieces] == [300, 300, 300, 100] * 2 + [300, 200]
        assert b"".join(pieces) == data == store.read_part(meta, "blob")
        assert store.read_part(meta, "empty") == b""
        client.delete(store.layout.chunk(version, "blob", 2))
        with pytest.raises(SnapshotError, match="missing chunks"):
            list(store.iter_part(meta, "blob"))
    finally:
        client.close()


# ---------------------------------------------------------------- the daemon's snapshot loop


def save(cfg: Config, **kwargs: object) -> None:
    checkpoint.save(cfg.trainer.state_dir, make_checkpoint(**kwargs))  # type: ignore[arg-type]


def finish_aside(daemon: PublisherDaemon, store: SnapshotStore) -> int:
    """Wait for the full version the daemon builds aside, then publish it; the new tip."""
    job = daemon._compaction
    assert job is not None and job.done.wait(60)
    version = daemon.finish_compaction(store)
    assert version is not None
    return version


def test_snapshot_loop_publishes_full_delta_skip_and_recovers(config: Config, store: SnapshotStore) -> None:
    cfg = config.with_overrides({"publisher": {"full_every": 3}})
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    assert daemon.poll_checkpoint(store) is None  # no checkpoint yet

    save(cfg, seq=1)
    v1 = daemon.poll_checkpoint(store)
    assert v1 is not None and store.meta(v1).kind == FULL and store.current_version() == v1
    assert daemon.poll_checkpoint(store) is None  # unchanged file

    save(cfg, seq=2, user_updated=[2, 1, 1, 1, 1], item_updated=[1, 2, 1, 1, 1, 1], removed=[(2, "old")])
    v2 = daemon.poll_checkpoint(store)
    assert v2 is not None and store.meta(v2).kind == DELTA and store.meta(v2).parent == v1
    delta = decode_delta(read_parts(store, v2)[1])
    assert delta.users.ids == ["u0"] and delta.items.ids == ["i1"] and delta.removed_items == ["old"]

    save(cfg, seq=3)  # nothing changed after seq 2: no version
    assert daemon.poll_checkpoint(store) is None and store.current_version() == v2

    # a restarted publisher adopts the current version and, the weights being the same, goes on with deltas
    again = PublisherDaemon(cfg)
    again.recover(store)
    assert again._last is not None and again._last.version == v2 and again._last.dense_version is None
    assert again._served == {f"i{i}" for i in range(6)}
    save(cfg, seq=4, item_updated=[1, 1, 4, 1, 1, 1])
    v3 = again.poll_checkpoint(store)
    assert v3 is not None and store.meta(v3).kind == DELTA and store.meta(v3).parent == v2
    assert again._last is not None and again._last.dense_version == 1

    save(cfg, seq=5, item_updated=[1, 1, 5, 1, 1, 1])  # third delta since the full: full_every=3 is due next
    v4 = again.poll_checkpoint(store)
    assert v4 is not None and store.meta(v4).kind == DELTA
    save(cfg, seq=6, item_updated=[1, 1, 6, 1, 1, 1])
    v5 = again.poll_checkpoint(store)  # the full version full_every made due is built aside ...
    assert v5 is not None and store.meta(v5).kind == DELTA and again._compaction is not None
    v5 = finish_aside(again, store)  # ... and published once built, the chain's new base
    assert store.meta(v5).kind == FULL and store.meta(v5).trainer_seq == 6 and store.current_version() == v5

    save(cfg, seq=7, dense_version=2, seed=9)  # new dense weights: full
    v6 = again.poll_checkpoint(store)
    assert v6 is not None and store.meta(v6).kind == FULL
    weights = decode_full(read_parts(store, v6)[0]).weights
    expected = make_checkpoint(seed=9).dense
    for name, value in weights.items():
        np.testing.assert_array_equal(value, expected[name].numpy())

    # a restart after new weights were trained but not yet published: the weights differ, so full
    third = PublisherDaemon(cfg)
    third.recover(store)
    save(cfg, seq=8, dense_version=3, seed=11)
    v7 = third.poll_checkpoint(store)
    assert v7 is not None and store.meta(v7).kind == FULL


def lose_redis_data(store: SnapshotStore) -> None:
    """What a Redis restarted without its data looks like to this test's keys (the server is shared)."""
    for key in store.redis.scan_iter(match=f"{store.layout.prefix}:*", count=1000):
        store.redis.unlink(key)


def test_after_redis_lost_its_data_the_publisher_starts_again_with_a_full_version(
    config: Config, store: SnapshotStore
) -> None:
    daemon = PublisherDaemon(config)
    daemon.recover(store)
    save(config, seq=1)
    v1 = daemon.poll_checkpoint(store)
    save(config, seq=2, item_updated=[1, 2, 1, 1, 1, 1])
    v2 = daemon.poll_checkpoint(store)
    assert v1 is not None and v2 is not None and store.meta(v2).parent == v1
    lose_redis_data(store)

    save(config, seq=3, item_updated=[1, 3, 1, 1, 1, 1])
    with pytest.raises(MissingVersionError):  # once stalled here: every later delta failed the same way
        daemon.poll_checkpoint(store)
    version = daemon.poll_checkpoint(store)
    assert version is not None and store.meta(version).kind == FULL and store.current_version() == version
    save(config, seq=4, item_updated=[1, 4, 1, 1, 1, 1])
    after = daemon.poll_checkpoint(store)
    assert after is not None and store.meta(after).parent == version

    # found by the serving loop's content-only delta, with no new checkpoint to come: the one
    # there is published again, whole
    lose_redis_data(store)
    daemon.note_catalog([CatalogItem("fresh", "c1", [0.2, 0.1, 0.0], 5, "Fresh")])
    with pytest.raises(MissingVersionError):
        daemon.flush_pending(store)
    assert daemon.flush_pending(store) is None  # no parent: the item waits for the full version
    version = daemon.poll_checkpoint(store)
    assert version is not None and store.meta(version).kind == FULL and store.meta(version).trainer_seq == 4
    assert "fresh" in decode_full(read_parts(store, version)[0]).items.ids


def test_a_compaction_full_waits_while_the_last_full_took_too_long(config: Config, store: SnapshotStore) -> None:
    cfg = config.with_overrides({"publisher": {"full_every": 1, "full_build_max_share": 0.1}})
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    save(cfg, seq=1)
    v1 = daemon.poll_checkpoint(store)
    assert v1 is not None and store.meta(v1).kind == FULL
    assert daemon._last_full_cost is not None  # what the full version took, and when
    # as if that full version had taken 10 minutes (an HNSW build over 1M items), just now
    daemon._last_full_cost = (600.0, time.monotonic())
    save(cfg, seq=2, item_updated=[1, 2, 1, 1, 1, 1])
    v2 = daemon.poll_checkpoint(store)
    assert v2 is not None and store.meta(v2).kind == DELTA  # full_every=1 made a full due: postponed
    save(cfg, seq=3, item_updated=[1, 3, 1, 1, 1, 1])
    v3 = daemon.poll_checkpoint(store)
    assert v3 is not None and store.meta(v3).kind == DELTA
    assert daemon._compaction is None
    daemon._last_full_cost = (600.0, time.monotonic() - 6001.0)  # 100 minutes later: 10 % of the time
    save(cfg, seq=4, item_updated=[1, 4, 1, 1, 1, 1])
    v4 = daemon.poll_checkpoint(store)
    assert v4 is not None and store.meta(v4).kind == DELTA and daemon._compaction is not None
    assert store.meta(finish_aside(daemon, store)).kind == FULL
    daemon._last_full_cost = (600.0, time.monotonic())
    save(cfg, seq=5, dense_version=2, seed=9)  # new dense weights: a full version at once
    v5 = daemon.poll_checkpoint(store)
    assert v5 is not None and store.meta(v5).kind == FULL


def _served_state(store: SnapshotStore, version: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """What a retriever serves at ``version``: item vectors and user ID rows by id."""
    state = ServingState.from_chain(store, store.chain(version))
    items = {i: state.item_rows([p])[0].tolist() for i, p in state.item_pos.items()}
    users = {u: row.tolist() for u in state.user_rows if (row := state.user_id_row(u)) is not None}
    return items, users


def test_a_full_version_built_aside_carries_the_deltas_published_meanwhile(
    config: Config, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config.with_overrides({"publisher": {"full_every": 1, "full_build_max_share": 0}})
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    save(cfg, seq=1)
    v1 = daemon.poll_checkpoint(store)
    save(cfg, seq=2, user_updated=[2, 1, 1, 1, 1], item_updated=[1, 1, 1, 1, 1, 1])
    daemon.poll_checkpoint(store)

    release = threading.Event()
    real_full_snapshot = publisher_daemon.full_snapshot

    def slow_full_snapshot(*args: object, **kwargs: object) -> object:
        assert release.wait(60)  # an index build that takes a while
        return real_full_snapshot(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(publisher_daemon, "full_snapshot", slow_full_snapshot)
    save(cfg, seq=3, user_updated=[2, 3, 1, 1, 1], item_updated=[1, 1, 1, 1, 1, 1])
    v3 = daemon.poll_checkpoint(store)  # a full version is due (full_every=1): a delta now, the full aside
    assert v3 is not None and store.meta(v3).kind == DELTA and daemon._compaction is not None
    # meanwhile the parameter path goes on: changed rows, as a delta on the served chain
    save(cfg, seq=4, user_updated=[2, 3, 4, 1, 1], item_updated=[1, 1, 1, 4, 1, 1])
    v4 = daemon.poll_checkpoint(store)
    assert v4 is not None and store.meta(v4).kind == DELTA and store.meta(v4).parent == v3
    assert store.current_version() == v4
    before = _served_state(store, v4)

    release.set()
    tip = finish_aside(daemon, store)
    chain = store.chain(tip)
    assert [m.kind for m in chain] == [FULL, DELTA] and chain[0].version > v4 and chain[0].trainer_seq == 3
    assert chain[1].trainer_seq == 4 and read_parts(store, tip)[-1] == read_parts(store, v4)[-1]  # v4, carried over
    assert store.current_version() == tip and daemon._last is not None and daemon._last.version == tip
    assert daemon._last.deltas_since_full == 1
    assert _served_state(store, tip) == before  # the same state, on a chain of two versions

    # a full version built aside for weights that new ones replaced meanwhile is dropped
    release.clear()
    save(cfg, seq=5, user_updated=[2, 3, 4, 5, 1], item_updated=[1, 1, 1, 4, 1, 1])
    daemon.poll_checkpoint(store)
    save(cfg, seq=6, user_updated=[2, 3, 4, 5, 6], item_updated=[1, 1, 1, 4, 1, 1])
    daemon.poll_checkpoint(store)
    job = daemon._compaction
    assert job is not None
    monkeypatch.setattr(publisher_daemon, "full_snapshot", real_full_snapshot)
    save(cfg, seq=7, dense_version=2, seed=9)
    v7 = daemon.poll_checkpoint(store)
    assert v7 is not None and store.meta(v7).kind == FULL and daemon._compaction is None
    release.set()
    assert job.done.wait(60) and daemon.finish_compaction(store) is None and store.current_version() == v7
    assert v1 is not None


def test_a_compaction_keeps_a_content_only_item_published_just_before_it_starts(
    config: Config, store: SnapshotStore
) -> None:
    """The serving loop publishes a new item's content-only delta while the snapshot loop is
    between its two sections of planning a compaction: the full version built aside must
    still serve the item (the delta is before the compaction, so it is not carried over)."""
    cfg = config.with_overrides({"publisher": {"full_every": 1, "full_build_max_share": 0}})
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    save(cfg, seq=1)
    daemon.poll_checkpoint(store)
    save(cfg, seq=2, user_updated=[2, 1, 1, 1, 1], item_updated=[1, 1, 1, 1, 1, 1])
    daemon.poll_checkpoint(store)
    fresh = CatalogItem("fresh", "music", [0.5, 0.1, 0.9], 10)
    real_lock = daemon._lock

    class ServingTurnBeforeSecondSection:
        entered = 0

        def __enter__(self) -> None:
            self.entered += 1
            if self.entered == 2:  # between publish_checkpoint's two sections
                assert daemon.note_catalog([fresh]) == 1 and daemon.flush_pending(store) is not None
            real_lock.__enter__()

        def __exit__(self, *exc: object) -> None:
            real_lock.__exit__(*exc)

    daemon._lock = ServingTurnBeforeSecondSection()  # type: ignore[assignment]
    save(cfg, seq=3, user_updated=[2, 3, 1, 1, 1], item_updated=[1, 1, 1, 1, 1, 1])
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert ckpt is not None
    daemon.publish_checkpoint(store, ckpt)  # a delta now, the full version aside
    daemon._lock = real_lock
    tip = finish_aside(daemon, store)
    assert "fresh" in _served_state(store, tip)[0]


def save_row_update(
    cfg: Config, seq: int, base_seq: int, user_rows: list[int], item_rows: list[int], **kwargs: object
) -> None:
    """A row update cut from a hand-made checkpoint: its rows ``user_rows`` / ``item_rows``, stamped ``seq``."""
    whole = make_checkpoint(seq=seq, **kwargs)  # type: ignore[arg-type]

    def cut(t: checkpoint.TableState, rows: list[int]) -> checkpoint.TableState:
        index = torch.tensor(rows, dtype=torch.int64)
        return checkpoint.TableState(
            ids=[t.ids[r] for r in rows],
            emb=t.emb[index],
            accum=t.accum[index],
            count=t.count[index],
            last_seen_ms=t.last_seen_ms[index],
            updated_seq=torch.full((len(rows),), seq, dtype=torch.int64),
        )

    items = torch.tensor(item_rows, dtype=torch.int64)
    update = replace(
        whole,
        users=cut(whole.users, user_rows),
        items=cut(whole.items, item_rows),
        item_category=whole.item_category[items],
        item_content=whole.item_content[items],
        offsets={},
        base_seq=base_seq,
    )
    checkpoint.save_row_update(cfg.trainer.state_dir, update)


def test_row_updates_become_deltas_until_the_next_full_checkpoint(config: Config, store: SnapshotStore) -> None:
    cfg = config.with_overrides({"publisher": {"full_every": 1}})  # row updates never become full versions
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    save(cfg, seq=1)
    v1 = daemon.poll_checkpoint(store)
    assert v1 is not None and store.meta(v1).kind == FULL

    save_row_update(cfg, seq=2, base_seq=1, user_rows=[3], item_rows=[2], seed=0)
    save_row_update(cfg, seq=3, base_seq=1, user_rows=[1], item_rows=[], removed=[(3, "i5")])
    v3 = daemon.poll_checkpoint(store)  # both, oldest first, each a delta on the chain
    assert v3 is not None and store.meta(v3).kind == DELTA
    v2 = store.meta(v3).parent
    assert v2 is not None and v2 != v1 and store.meta(v2).kind == DELTA and store.meta(v2).parent == v1
    first, second = decode_delta(read_parts(store, v2)[-1]), decode_delta(read_parts(store, v3)[-1])
    assert first.users.ids == ["u3"] and first.items.ids == ["i2"] and first.removed_items == []
    np.testing.assert_array_equal(first.users.matrix[0], make_checkpoint(seed=0).users.emb[3].numpy())
    # the second update names only u1: items it does not carry stay the trainer's (no content-only extras)
    assert second.users.ids == ["u1"] and second.items.ids == [] and second.removed_items == ["i5"]
    assert daemon._owned == {f"i{i}" for i in range(5)} and daemon._removed == {"i5"}
    assert daemon.poll_checkpoint(store) is None  # nothing new

    # restarted, the publisher finds the full checkpoint behind what it serves: no full rebuild
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    assert daemon.poll_checkpoint(store) is None and store.current_version() == v3
    save_row_update(cfg, seq=4, base_seq=1, user_rows=[0], item_rows=[])
    v4 = daemon.poll_checkpoint(store)
    assert v4 is not None and store.meta(v4).kind == DELTA and store.meta(v4).parent == v3
    assert decode_delta(read_parts(store, v4)[-1]).users.ids == ["u0"]

    save_row_update(cfg, seq=5, base_seq=99, user_rows=[0], item_rows=[])  # follows a full checkpoint not read yet
    assert daemon.poll_checkpoint(store) is None
    checkpoint.row_updates(cfg.trainer.state_dir)[-1][1].unlink()
    save_row_update(cfg, seq=5, base_seq=1, user_rows=[0], item_rows=[], dense_version=2, seed=4)
    assert daemon.poll_checkpoint(store) is None  # new weights need a full version: it waits for the full checkpoint

    # a full checkpoint deletes the row updates and brings the full version full_every made due
    save(cfg, seq=6, user_updated=[1, 1, 1, 1, 6], item_updated=[1, 1, 1, 1, 1, 1])
    assert checkpoint.row_updates(cfg.trainer.state_dir) == []
    v6 = daemon.poll_checkpoint(store)
    assert v6 is not None and store.meta(v6).kind == DELTA  # the due full version: built aside
    v6 = finish_aside(daemon, store)
    assert store.meta(v6).kind == FULL and daemon._last is not None
    assert daemon._last.trainer_seq == 6 and daemon._last.deltas_since_full == 0

    # then row updates after it are deltas on the new full version
    save_row_update(cfg, seq=7, base_seq=6, user_rows=[2], item_rows=[])
    v7 = daemon.poll_checkpoint(store)
    assert v7 is not None and store.meta(v7).kind == DELTA and store.meta(v7).parent == v6
    assert decode_delta(read_parts(store, v7)[-1]).users.ids == ["u2"]


def test_a_restarted_publisher_knows_the_items_row_updates_gave_rows(config: Config, store: SnapshotStore) -> None:
    """An item the trainer first gave a row in a row update published before a restart stays
    the trainer's: a catalogue change does not replace its trained vector with a content-only one."""
    cfg = config.with_overrides({"publisher": {"full_every": 100}})
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    save(cfg, seq=1, item_categories=(1, 1, 2, 2, 3))  # i0..i4
    assert daemon.poll_checkpoint(store) is not None
    save_row_update(cfg, seq=2, base_seq=1, user_rows=[], item_rows=[5])  # i5: a new trainer row
    v2 = daemon.poll_checkpoint(store)
    assert v2 is not None and decode_delta(read_parts(store, v2)[-1]).items.ids == ["i5"]

    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    changed = CatalogItem("i5", "games", [0.3, 0.3, 0.3], 12)
    daemon.note_catalog([changed])  # before the snapshot loop's first pass: not known as owned yet
    assert daemon.flush_pending(store) is None  # so nothing is sent until that pass ends
    assert daemon.poll_checkpoint(store) is None and store.current_version() == v2
    assert "i5" in daemon._owned
    assert daemon.flush_pending(store) is None and store.current_version() == v2
    assert daemon.note_catalog([replace(changed, ts_ms=13)]) == 0


def test_a_restarted_publisher_does_not_serve_again_an_item_the_trainer_expired(
    config: Config, store: SnapshotStore
) -> None:
    """The full version records the catalogue items it withholds as expired: a restarted
    publisher replays the whole catalogue topic, and the trainer's checkpoint keeps only its
    newest removals."""
    cfg = kafka_config(config, full_every=100)
    topics = ensure_topics(cfg.kafka)
    five = (1, 1, 2, 2, 3)
    listed = CatalogItem("i5", "games", [0.3, 0.3, 0.3], 12)
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    save(cfg, seq=1)  # i0..i5
    assert daemon.poll_checkpoint(store) is not None
    assert daemon.note_catalog([listed]) == 0  # the trainer's
    save(cfg, seq=2, item_categories=five, removed=[(2, "i5")])  # i5 expired
    v2 = daemon.poll_checkpoint(store)
    assert v2 is not None and decode_delta(read_parts(store, v2)[-1]).removed_items == ["i5"]
    save(cfg, seq=3, dense_version=2, seed=4, item_categories=five, removed=[(2, "i5")])  # new weights
    v3 = daemon.poll_checkpoint(store)
    assert v3 is not None and store.meta(v3).kind == FULL
    full = decode_full(read_parts(store, v3)[0])
    assert "i5" not in full.items.ids and full.withheld_items == ["i5"]

    save(cfg, seq=4, dense_version=2, seed=4, item_categories=five)  # the removal is no longer listed
    producer = patient_producer(cfg)
    try:
        send(producer, topics.catalog, listed)
    finally:
        producer.close()
    daemon = PublisherDaemon(cfg)
    daemon.startup()  # recovers, then replays the catalogue topic
    assert daemon._catalog == {"i5": listed} and daemon._removed == {"i5"} and not daemon._pending
    assert daemon.poll_checkpoint(store) is None and daemon.flush_pending(store) is None
    assert store.current_version() == v3 and "i5" not in served_items(store, v3).items
    # listed again after the restart: served again, content-only; its commit waited for that
    relisted = replace(listed, ts_ms=13)
    assert daemon.note_catalog([relisted]) == 1 and not daemon.listings_safe()
    v5 = daemon.flush_pending(store)
    assert v5 is not None and decode_delta(read_parts(store, v5)[-1]).items.ids == ["i5"]
    assert served_items(store, v5).withheld == set() and daemon.listings_safe()

    # and stays served after another restart, though the trainer's checkpoint still lists the
    # removal (older than the chain's tip: already applied, and undone by the listing)
    producer = patient_producer(cfg)
    try:
        send(producer, topics.catalog, relisted)
    finally:
        producer.close()
    save(cfg, seq=6, dense_version=3, seed=5, item_categories=five, removed=[(2, "i5")])  # new weights
    daemon = PublisherDaemon(cfg)
    daemon.startup()
    v6 = daemon.poll_checkpoint(store)
    assert v6 is not None and store.meta(v6).kind == FULL
    full = decode_full(read_parts(store, v6)[0])
    assert "i5" in full.items.ids and full.withheld_items == []


def test_a_publisher_restarted_after_a_rollback_serves_the_items_listed_again_since(
    config: Config, store: SnapshotStore
) -> None:
    """The version rolled back to withholds items that were listed again after it: a restarted
    publisher withholds only what the newest version it had made current withholds too."""
    cfg = kafka_config(config, full_every=100)
    topics = ensure_topics(cfg.kafka)
    four = (1, 1, 2, 2)
    listed = [CatalogItem(i, "games", [0.3, 0.3, 0.3], 12) for i in ("i4", "i5")]
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    save(cfg, seq=1)  # i0..i5
    assert daemon.poll_checkpoint(store) is not None
    assert daemon.note_catalog(listed) == 0  # the trainer's
    save(cfg, seq=2, item_categories=four, removed=[(2, "i4"), (2, "i5")])  # both expired
    assert daemon.poll_checkpoint(store) is not None
    save(cfg, seq=3, dense_version=2, seed=4, item_categories=four, removed=[(2, "i4"), (2, "i5")])
    v3 = daemon.poll_checkpoint(store)  # new weights: a full version, withholding both
    assert v3 is not None and decode_full(read_parts(store, v3)[0]).withheld_items == ["i4", "i5"]
    relisted = replace(listed[1], ts_ms=13)  # i5 listed again: served again, content-only
    assert daemon.note_catalog([relisted]) == 1
    v4 = daemon.flush_pending(store)
    assert v4 is not None and served_items(store, v4).withheld == {"i4"}

    producer = patient_producer(cfg)
    try:
        for record in [*listed, relisted]:
            send(producer, topics.catalog, record)
    finally:
        producer.close()
    store.rollback(v3)  # the version before the listing
    assert store.current_version() == v3 and store.tip_version() == v4
    save(cfg, seq=4, dense_version=2, seed=4, item_categories=four)  # the trainer goes on, same weights
    daemon = PublisherDaemon(cfg)
    daemon.startup()
    assert daemon._removed == {"i4"} and daemon._pending == {"i5"}
    v5 = daemon.poll_checkpoint(store)  # a delta on the version rolled back to serves i5 again
    assert v5 is not None and store.meta(v5).parent == v3
    assert decode_delta(read_parts(store, v5)[-1]).items.ids == ["i5"]
    served = served_items(store, v5)
    assert "i5" in served.items and "i4" not in served.items and served.withheld == {"i4"}
    assert store.tip_version() == v5


def test_a_rollback_to_a_version_never_made_current_keeps_what_it_withholds(
    config: Config, store: SnapshotStore
) -> None:
    """A stored version newer than the tip (a compaction's full version stored aside, the
    publisher stopped before making it current) says nothing older versions can correct."""
    v1 = store.write(FULL, encode_full(full_snapshot(make_checkpoint(seq=1))), None, 1)
    v2 = store.write(
        FULL, encode_full(full_snapshot(make_checkpoint(seq=2), withheld_items=["gone"])), None, 2, current=False
    )
    store.rollback(v2)
    assert (store.current_version(), store.tip_version()) == (v2, v1)
    daemon = PublisherDaemon(config)
    daemon.recover(store)
    assert daemon._removed == {"gone"}


def test_a_delta_whose_write_failed_is_published_by_the_next_poll(
    config: Config, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis error while a row update's delta is written must leave the row update to the next
    poll: counted as published, its rows were never sent."""
    cfg = config.with_overrides({"publisher": {"full_every": 1000}})
    daemon = PublisherDaemon(cfg)
    daemon.recover(store)
    save(cfg, seq=1)
    v1 = daemon.poll_checkpoint(store)
    save_row_update(cfg, seq=2, base_seq=1, user_rows=[], item_rows=[0], seed=3)
    write = store.write

    def hiccup(*args: object, **kwargs: object) -> int:
        raise redis.ConnectionError("injected: the connection dropped")

    monkeypatch.setattr(store, "write", hiccup)
    with pytest.raises(redis.ConnectionError):
        daemon.poll_checkpoint(store)
    monkeypatch.setattr(store, "write", write)
    v2 = daemon.poll_checkpoint(store)
    assert v2 is not None and store.meta(v2).kind == DELTA and store.meta(v2).parent == v1
    assert decode_delta(read_parts(store, v2)[-1]).items.ids == ["i0"]


def test_trim_keeps_the_newest_full_versions(config: Config, store: SnapshotStore) -> None:
    cfg = config.with_overrides({"publisher": {"full_every": 1, "keep_versions": 2, "full_build_max_share": 0}})
    daemon = PublisherDaemon(cfg)
    first = None
    for seq in range(1, 8):  # full, delta, delta + full aside, delta, delta + full aside, ... (full_every=1)
        save(cfg, seq=seq, item_updated=[seq] * 6)
        version = daemon.poll_checkpoint(store)
        assert version is not None
        first = first or version
        if daemon._compaction is not None:
            finish_aside(daemon, store)
    stored = [int(v) for v in store.redis.zrange(store.layout.versions, 0, -1)]
    fulls = [v for v in stored if store.meta(v).kind == FULL]
    assert len(fulls) == 2 and stored[0] == fulls[0]  # nothing older than the second newest full
    assert store.redis.hgetall(store.layout.meta(first or 0)) == {}
    assert not store.redis.keys(f"{store.layout.prefix}:snap:v:{first}:*")
    assert store.chain(store.current_version() or 0)[0].version == fulls[-1]
    read_parts(store, store.current_version() or 0)  # the served chain is intact

    # a trim stopped between a version's meta and its listing: the next one finishes it
    oldest = stored[0]
    store.redis.unlink(store.layout.meta(oldest))
    for seq in range(8, 11):
        save(cfg, seq=seq, item_updated=[seq] * 6)
        assert daemon.poll_checkpoint(store) is not None
        if daemon._compaction is not None:
            finish_aside(daemon, store)
    assert oldest not in [int(v) for v in store.redis.zrange(store.layout.versions, 0, -1)]
    assert not store.redis.keys(f"{store.layout.prefix}:snap:v:{oldest}:*")
    read_parts(store, store.current_version() or 0)


def test_cli_status_and_rollback(config: Config, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOTOWER_REDIS__URL", config.redis.url)
    monkeypatch.setenv("TWOTOWER_REDIS__KEY_PREFIX", config.redis.key_prefix)
    runner = CliRunner()
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0 and "no version published" in result.output

    v1 = store.write(FULL, encode_full(full_snapshot(make_checkpoint(seq=1))), None, 1)
    delta = delta_snapshot(make_checkpoint(seq=2, item_updated=[2] + [1] * 5), since_seq=1)
    v2 = store.write(DELTA, encode_delta(delta), v1, 2)
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["current"] == v2 and report["full_versions"] == [v1] and report["newest_made_current"] == v2
    assert "rolled back" not in runner.invoke(app, ["status"]).output
    assert [c["version"] for c in report["chain"]] == [v1, v2]
    assert report["chain"][0]["parts"]["index"] > 0
    assert f"current version {v2}" in runner.invoke(app, ["status"]).output

    result = runner.invoke(app, ["rollback", str(v1)])
    assert result.exit_code == 0, result.output
    assert store.current_version() == v1
    report = json.loads(runner.invoke(app, ["status", "--json"]).output)
    assert (report["current"], report["newest_made_current"]) == (v1, v2)
    assert f"rolled back: the newest version made current was {v2}" in runner.invoke(app, ["status"]).output
    v3 = store.write(FULL, encode_full(full_snapshot(make_checkpoint(seq=3))), None, 3, current=False)
    assert runner.invoke(app, ["rollback", str(v3)]).exit_code == 0  # to a version never made current
    report = json.loads(runner.invoke(app, ["status", "--json"]).output)
    assert (report["current"], report["newest_made_current"]) == (v3, v2)
    assert f"rolled back: the newest version made current was {v2}" in runner.invoke(app, ["status"]).output
    assert runner.invoke(app, ["rollback", str(v1)]).exit_code == 0
    result = runner.invoke(app, ["rollback", "999"])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert store.current_version() == v1


def test_new_catalog_items_get_content_only_deltas(
    config: Config, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = PublisherDaemon(config)
    new = CatalogItem("fresh", "music", [0.5, 0.1, 0.9], 10, "Fresh")
    assert daemon.note_catalog([new]) == 1
    assert daemon.flush_pending(store) is None  # no model and no version yet: stays pending

    checkpoint.save(config.trainer.state_dir, make_checkpoint(seq=1))
    v1 = daemon.poll_checkpoint(store)
    assert v1 is not None
    full = decode_full(read_parts(store, v1)[0])
    assert full.items.ids[-1] == "fresh"  # the first full carries the pending item

    later = CatalogItem("later", "books", [0.2], 11)
    owned = CatalogItem("i3", "books", [0.2], 11)  # the trainer has a row: not the publisher's business
    assert daemon.note_catalog([later, owned, new]) == 1
    v2 = daemon.flush_pending(store)
    assert v2 is not None and store.meta(v2).parent == v1 and store.meta(v2).trainer_seq == 1
    delta = decode_delta(read_parts(store, v2)[1])
    assert delta.items.ids == ["later"] and delta.users.ids == [] and delta.users.matrix.shape == (0, 4)
    model = model_from_checkpoint(make_checkpoint(seq=1))
    expected = content_only_vectors(model, make_checkpoint().categories, [later])
    np.testing.assert_allclose(delta.items.matrix, expected.matrix, atol=1e-6)

    # the next trainer delta chains on the content-only one; a full keeps both new items
    checkpoint.save(config.trainer.state_dir, make_checkpoint(seq=2, item_updated=[2, 1, 1, 1, 1, 1]))
    v3 = daemon.poll_checkpoint(store)
    assert v3 is not None and store.meta(v3).parent == v2
    checkpoint.save(config.trainer.state_dir, make_checkpoint(seq=3, dense_version=2, seed=4))
    v4 = daemon.poll_checkpoint(store)
    assert v4 is not None and store.meta(v4).kind == FULL
    assert {"fresh", "later"} <= set(decode_full(read_parts(store, v4)[0]).items.ids)
    assert daemon.flush_pending(store) is None  # nothing left to send

    # an item's catalogue entry changes while a full version is built from the entry before
    changed = CatalogItem("later", "games", [0.9], 12)
    real_full_snapshot = publisher_daemon.full_snapshot

    def change_during_build(*args: object, **kwargs: object) -> object:
        snap = real_full_snapshot(*args, **kwargs)  # type: ignore[arg-type]
        assert daemon.note_catalog([changed]) == 1
        return snap

    monkeypatch.setattr(publisher_daemon, "full_snapshot", change_during_build)
    checkpoint.save(config.trainer.state_dir, make_checkpoint(seq=4, dense_version=3, seed=5))
    v5 = daemon.poll_checkpoint(store)  # the full version, then the item again: built from an old entry
    assert v5 is not None and store.meta(v5).kind == DELTA
    parent = store.meta(v5).parent
    assert parent is not None and store.meta(parent).kind == FULL
    again = decode_delta(read_parts(store, v5)[1])
    assert again.items.ids == ["later"]
    expected = content_only_vectors(daemon._model, daemon._vocab, [changed])
    np.testing.assert_allclose(again.items.matrix, expected.matrix, atol=1e-6)


def test_queue_writes_history_items_and_profiles(config: Config) -> None:
    client = redis.Redis.from_url(config.redis.url)
    layout = SnapshotLayout(config.redis.key_prefix)
    try:
        records = [Interaction(f"e{i}", "r", "alice", f"it{i}", "click", i, 1000 + i) for i in range(5)]
        records.insert(2, Interaction("imp", "r", "alice", "shown", "impression", 0, 999))
        records += [
            CatalogItem("it9", "books", [1.0], 55, "A book"),
            Profile("alice", [0.5, 1.5], 60),
        ]
        pipe = client.pipeline(transaction=True)
        result = queue_writes(pipe, layout, records, history_max_len=3)
        pipe.execute()
        assert (result.clicks, result.impressions, result.profiles, len(result.catalog)) == (5, 1, 1, 1)
        history = [decode_history_entry(x) for x in client.lrange(layout.history("alice"), 0, -1)]
        assert history == [("it4", 1004), ("it3", 1003), ("it2", 1002)]  # newest first, capped
        assert client.hgetall(layout.item("it9")) == {b"category": b"books", b"title": b"A book", b"ts_ms": b"55"}
        assert msgpack.unpackb(client.get(layout.profile("alice"))) == [0.5, 1.5]
    finally:
        client.close()


def test_a_late_click_takes_its_place_by_event_time_and_never_pushes_newer_ones_out(config: Config) -> None:
    """Pushed and trimmed by arrival, a burst of old clicks (an offline client's upload) left the
    history holding them instead of the newest: these were neither pooled nor excluded."""
    client = redis.Redis.from_url(config.redis.url)
    layout = SnapshotLayout(config.redis.key_prefix)
    key = layout.history("erin")

    def write(clicks: list[tuple[str, int]]) -> None:
        with client.pipeline(transaction=True) as pipe:
            records = [Interaction(f"e{item}", "r", "erin", item, "click", 0, ts) for item, ts in clicks]
            queue_writes(pipe, layout, records, history_max_len=5)
            pipe.execute()

    try:
        client.script_flush()  # the pipeline loads the script itself
        write([(f"new{i}", 100_000 + i) for i in range(5)])
        write([(f"old{i}", 1_000 + i) for i in range(5)])  # older than every entry of a full history
        history = [decode_history_entry(e) for e in client.lrange(key, 0, -1)]
        assert history == [(f"new{i}", 100_000 + i) for i in reversed(range(5))]
        write([("late", 100_002), ("same", 100_004)])  # in their places; the oldest falls out
        history = [decode_history_entry(e) for e in client.lrange(key, 0, -1)]
        assert history == [
            ("same", 100_004), ("new4", 100_004), ("new3", 100_003), ("late", 100_002), ("new2", 100_002)
        ]  # fmt: skip
        client.delete(key)
        write([("b", 2_000), ("a", 1_000), ("c", 3_000)])  # room left: an old one goes last
        assert [decode_history_entry(e)[0] for e in client.lrange(key, 0, -1)] == ["c", "b", "a"]
    finally:
        client.close()


# ---------------------------------------------------------------- serving state with the real broker


def test_serving_state_writer_turns_clicks_into_history_and_dead_letters_garbage(config: Config) -> None:
    config = kafka_config(config)
    topics = ensure_topics(config.kafka)
    producer = patient_producer(config)
    writer = ServingStateWriter(config)
    layout = SnapshotLayout(config.redis.key_prefix)
    client = redis.Redis.from_url(config.redis.url)
    dlq = KafkaConsumer(
        Topics.dlq(topics.events), bootstrap_servers=config.kafka.bootstrap, auto_offset_reset="earliest"
    )
    try:
        for i in range(3):
            send(producer, topics.events, Interaction(f"e{i}", "r", "bob", f"item{i}", "click", i, 5000 + i))
        send(producer, topics.events, Interaction("x", "r", "bob", "seen", "impression", 0, 5003))
        producer.send(topics.events, key=b"bob", value=b"\x93not a record").get(timeout=30)
        send(producer, topics.events, Interaction("e9", "r", "bob", "item9", "click", 9, 5009))
        send(producer, topics.profiles, Profile("bob", [1.0, 2.0], 5010))

        seen = {"messages": 0, "dead": 0}

        def drained() -> bool:
            result = writer.poll_once(timeout_ms=200)
            seen["messages"] += result.messages
            seen["dead"] += result.dead_letters
            return seen["messages"] >= 7

        wait_for(drained, 60, "the writer to consume the produced messages")
        assert seen["dead"] == 1
        history = [decode_history_entry(x) for x in client.lrange(layout.history("bob"), 0, -1)]
        assert history == [("item9", 5009), ("item2", 5002), ("item1", 5001), ("item0", 5000)]
        assert msgpack.unpackb(client.get(layout.profile("bob"))) == [1.0, 2.0]

        letters: list[object] = []

        def dead_letter_arrived() -> bool:
            letters.extend(m for ms in dlq.poll(timeout_ms=500).values() for m in ms)
            return bool(letters)

        wait_for(dead_letter_arrived, 30, "the dead letter")
        body = msgpack.unpackb(letters[0].value, raw=False)  # type: ignore[attr-defined]
        assert body["payload"] == b"\x93not a record" and body["topic"] == topics.events

        # offsets were committed: a new writer in the same group starts after them
        writer.close()
        writer = ServingStateWriter(config)
        send(producer, topics.events, Interaction("e10", "r", "bob", "item10", "click", 1, 5020))
        total = {"messages": 0}

        def one_more() -> bool:
            total["messages"] += writer.poll_once(timeout_ms=200).messages
            return client.llen(layout.history("bob")) == 5

        wait_for(one_more, 60, "the click after the restart")
        assert total["messages"] == 1
        assert decode_history_entry(client.lindex(layout.history("bob"), 0)) == ("item10", 5020)
    finally:
        writer.close()
        producer.close()
        dlq.close()
        client.close()


def test_a_batch_whose_reply_was_lost_is_not_pushed_twice(config: Config) -> None:
    """The transaction ran but its reply never came (a dropped connection): the client sent it
    again, or the rewound batch was written again, and the click was in the history twice."""
    config = kafka_config(config)
    topics = ensure_topics(config.kafka)
    producer = patient_producer(config)
    client = redis.Redis.from_url(config.redis.url)
    key = SnapshotLayout(config.redis.key_prefix).history("dave")
    writer = ServingStateWriter(config)
    pipeline = writer.redis.pipeline
    lost: list[bool] = []

    def losing_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        def run_then_lose_the_reply(*a: Any, **k: Any) -> Any:
            replies = execute(*a, **k)
            if not lost:
                lost.append(True)
                raise redis.ConnectionError("injected: the reply was lost")
            return replies

        pipe.execute = run_then_lose_the_reply
        return pipe

    writer.redis.pipeline = losing_pipeline  # type: ignore[method-assign]
    try:
        send(producer, topics.events, Interaction("e1", "r", "dave", "i1", "click", 0, 5_000))
        send(producer, topics.events, Interaction("e2", "r", "dave", "i2", "click", 0, 6_000))

        def poll() -> int:
            try:
                return writer.poll_once(timeout_ms=200).messages
            except redis.ConnectionError:
                return 0

        wait_for(lambda: poll() or lost, 60, "the batch, its reply lost")
        wait_for(poll, 60, "the batch read again")
        wait_for(lambda: client.llen(key) >= 2, 30, "both clicks")
        entries = [decode_history_entry(e) for e in client.lrange(key, 0, -1)]
        assert entries == [("i2", 6_000), ("i1", 5_000)]  # each once
    finally:
        writer.close()
        producer.close()
        client.close()


def test_a_batch_is_written_once_and_committed_when_before_commit_allows(config: Config) -> None:
    """The publisher holds the serving state's commit until a listed item's vector is published:
    a batch whose ``before_commit`` fails or says "not yet" is not read (and pushed) again, and
    its offsets wait for a later commit; a crash meanwhile replays it."""
    config = kafka_config(config)
    topics = ensure_topics(config.kafka)
    producer = patient_producer(config)
    client = redis.Redis.from_url(config.redis.url)
    key = SnapshotLayout(config.redis.key_prefix).history("carol")
    writers: list[ServingStateWriter] = []

    def writer() -> ServingStateWriter:
        writers.append(ServingStateWriter(config))
        return writers[-1]

    def polls(w: ServingStateWriter, before_commit: Callable[[object], bool], n: int = 10) -> int:
        clicks = 0
        for _ in range(n):
            try:
                clicks += w.poll_once(timeout_ms=200, before_commit=before_commit).clicks
            except RuntimeError:
                clicks += 1  # the batch was written before before_commit failed
        return clicks

    def fail_then_hold(result: object) -> bool:
        if getattr(result, "clicks", 0):
            raise RuntimeError("the vector could not be published")
        return False

    try:
        send(producer, topics.events, Interaction("e1", "r", "carol", "i1", "click", 0, 5_000))
        first = writer()
        wait_for(lambda: polls(first, fail_then_hold, 1), 60, "the click")
        assert polls(first, fail_then_hold) == 0 and client.llen(key) == 1  # not read again
        first.close()  # a crash: nothing committed
        second = writer()
        wait_for(lambda: second.poll_once(timeout_ms=200, before_commit=lambda result: False).messages, 60, "replay")
        assert client.llen(key) == 1  # read again, and not pushed again: Redis held it (it was 2)
        assert polls(second, lambda result: True, 2) == 0  # an empty poll commits what was held
        second.close()
        third = writer()
        send(producer, topics.events, Interaction("e2", "r", "carol", "i2", "click", 0, 6_000))
        wait_for(lambda: polls(third, lambda result: True, 1), 60, "the next click")
        assert client.llen(key) == 2 and polls(third, lambda result: True) == 0  # e1 not replayed
    finally:
        for w in writers:
            w.close()
        producer.close()
        client.close()


def test_daemon_end_to_end_new_item_is_published_and_served(config: Config, store: SnapshotStore) -> None:
    """A catalogue record reaches the served chain through the running daemon. How fast it does
    is measured by ``bench cold-item``, not here."""
    cfg = kafka_config(config, poll_interval_s=0.1)
    topics = ensure_topics(cfg.kafka)
    checkpoint.save(cfg.trainer.state_dir, make_checkpoint(seq=1))
    producer = patient_producer(cfg)
    daemon = PublisherDaemon(cfg)
    daemon.startup()
    thread = threading.Thread(target=daemon.main_loop, daemon=True)
    thread.start()
    client = store.redis
    layout = store.layout
    try:
        wait_for(lambda: daemon.health()["status"] == "ok", 60, "both loops to run")
        v1 = wait_for(store.current_version, 10, "the first full version")
        # warm up: the consumer group has joined once a click shows up in Redis
        send(producer, topics.events, Interaction("w", "r", "carol", "i1", "click", 0, 1))
        wait_for(lambda: client.exists(layout.history("carol")), 60, "the warm-up click")

        item = CatalogItem(f"new-{uuid.uuid4().hex[:6]}", "games", [0.3, 0.3, 0.3], 2, "New game")
        send(producer, topics.catalog, item)

        def served() -> bool:
            current = store.current_version()
            return current is not None and item.item_id in served_items(store, current).items

        wait_for(served, 60, "the new item in the served chain")
        assert client.hget(layout.item(item.item_id), "title") == b"New game"
        current = store.current_version()
        assert current is not None and store.meta(current).parent == v1

        producer.send(topics.catalog, key=b"bad", value=b"garbage").get(
            timeout=30
        )  # dead-lettered; the loop keeps running
        send(producer, topics.profiles, Profile("carol", [0.1], 3))
        wait_for(lambda: client.exists(layout.profile("carol")), 30, "the profile after a malformed record")
        assert daemon.health()["status"] == "ok"
    finally:
        daemon.shutdown_flag.set()
        thread.join(timeout=60)
        daemon.shutdown()
        producer.close()
    assert not thread.is_alive()

    # a restarted publisher replays the catalogue, so new weights keep the content-only item
    restarted = PublisherDaemon(cfg)
    restarted.startup()
    assert item.item_id in restarted._catalog and not restarted._pending
    checkpoint.save(cfg.trainer.state_dir, make_checkpoint(seq=2, dense_version=2, seed=3))
    version = restarted.poll_checkpoint(store)
    assert version is not None and store.meta(version).kind == FULL
    assert item.item_id in decode_full(read_parts(store, version)[0]).items.ids


def test_unreadable_current_version_means_next_publish_is_full(config: Config, store: SnapshotStore) -> None:
    v1 = store.write(FULL, encode_full(full_snapshot(make_checkpoint(seq=1))), None, 1)
    store.redis.set(store.layout.chunk(v1, "items", 0), b"broken")
    daemon = PublisherDaemon(config)
    daemon.recover(store)
    assert daemon._last is None
    checkpoint.save(config.trainer.state_dir, make_checkpoint(seq=2))
    v2 = daemon.poll_checkpoint(store)
    assert v2 is not None and store.meta(v2).kind == FULL
    with pytest.raises((SnapshotError, BlobError)):
        served_items(store, v1)
