"""The trainer against the real broker: exact resume after a kill, dead letters, the nightly read."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch
from prometheus_client import REGISTRY

from trainer.days import day_bounds_ms
from trainer.nightly import load_day, run_nightly
from trainer.stream import APPLIED_ABOVE, StreamTrainer
from twotower import checkpoint
from twotower.config import Config
from twotower.events import CLICK, CatalogItem, Interaction, Profile, encode, to_dict
from twotower.kafka_io import Topics, ensure_topics, make_consumer, make_producer, send_record

pytestmark = pytest.mark.integration


def _clicks(n: int, t0_ms: int, step_ms: int = 1_000, users: int = 40, items: int = 60) -> list[Interaction]:
    return [
        Interaction(f"e{t0_ms}-{k}", f"r{k}", f"u{k % users}", f"i{(k * 7) % items}", "click", 0, t0_ms + k * step_ms)
        for k in range(n)
    ]


def _produce(cfg: Config, records, raw: list[bytes] = ()) -> None:
    topics = ensure_topics(cfg.kafka)
    producer = make_producer(cfg.kafka)
    for value in raw:
        producer.send(topics.events, key=b"bad", value=value)
    for record in records:
        topic = topics.catalog if isinstance(record, CatalogItem) else topics.events
        send_record(producer, topic, record)
    producer.flush()
    producer.close()


def _run_in_process(cfg: Config, idle_s: float = 3.0) -> StreamTrainer:
    trainer = StreamTrainer(cfg, max_idle_s=idle_s)
    trainer.startup()
    try:
        trainer.main_loop()
    finally:
        trainer.shutdown()
    return trainer


def _fast(cfg: Config) -> Config:
    return cfg.with_overrides({"trainer": {"checkpoint_interval_s": 0.3, "batch_size": 32, "max_batch_wait_ms": 50}})


def test_stream_trains_only_rows_and_checkpoints(config: Config) -> None:
    cfg = _fast(config)
    _produce(cfg, _clicks(300, 1_700_000_000_000))
    trainer = _run_in_process(cfg)
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert ckpt is not None
    assert int(ckpt.items.count.sum()) == 300
    assert sum(ckpt.offsets.values()) == 300  # every record is covered by the checkpoint
    fresh = type(trainer.state)(cfg.model, cfg.trainer)  # same seed: the initial dense weights
    for name, value in ckpt.dense.items():
        torch.testing.assert_close(value, fresh.model.state_dict()[name], rtol=0, atol=0)


def test_killed_trainer_resumes_without_loss_or_double_apply(config: Config, tmp_path) -> None:
    cfg = _fast(config)
    n = 4_000
    clicks = _clicks(n, 1_700_000_000_000, step_ms=10)
    _produce(cfg, clicks[: n // 2])  # the second half arrives while the trainer is busy (below)
    env = dict(os.environ)
    env.update(
        {
            "KAFKA_BOOTSTRAP": cfg.kafka.bootstrap,
            "TWOTOWER_KAFKA__TOPIC_PREFIX": cfg.kafka.topic_prefix,
            "TWOTOWER_TRAINER__STATE_DIR": str(cfg.trainer.state_dir),
            # another group than the restart's: the resume must come from the checkpoint alone
            "TWOTOWER_TRAINER__GROUP_ID": cfg.trainer.group_id + "-first",
            "TWOTOWER_TRAINER__CHECKPOINT_INTERVAL_S": "0.3",
            "TWOTOWER_TRAINER__BATCH_SIZE": "16",
            "TWOTOWER_TRAINER__MAX_BATCH_WAIT_MS": "50",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "twotower.cli", "train", "stream"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "trainer.log", "wb"),  # noqa: SIM115
    )

    def wait_for_checkpoint_over(count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ckpt = checkpoint.load(cfg.trainer.state_dir) if checkpoint.stat_seq(cfg.trainer.state_dir) else None
            if ckpt is not None and int(ckpt.items.count.sum()) > count:
                return
            time.sleep(0.05)
        pytest.fail(f"the trainer checkpointed no more than {count} clicks: " + (tmp_path / "trainer.log").read_text())

    try:
        wait_for_checkpoint_over(0, 120)  # the subprocess imports torch and starts first
        # a quarter more arrives while it is busy; it is killed once it has checkpointed some of it,
        # and the last quarter arrives after the kill: the kill lands within the second half
        _produce(cfg, clicks[n // 2 : 3 * n // 4])
        wait_for_checkpoint_over(n // 2, 120)
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to flush: the worst case
        proc.wait()
    killed = checkpoint.load(cfg.trainer.state_dir)  # what the restart resumes from
    assert killed is not None
    partial = int(killed.items.count.sum())
    assert n // 2 < partial <= 3 * n // 4
    # it holds exactly the clicks its offsets say it does: those below them and those it applied above
    applied_above = sum(len(offsets) for offsets in killed.extra[APPLIED_ABOVE].values())
    assert partial == sum(killed.offsets.values()) + applied_above
    _produce(cfg, clicks[3 * n // 4 :])
    _run_in_process(cfg)
    final = checkpoint.load(cfg.trainer.state_dir)
    assert final is not None
    assert int(final.items.count.sum()) == n  # nothing lost, nothing applied twice
    assert int(final.users.count.sum()) == n


def test_malformed_message_goes_to_dead_letter_topic(config: Config) -> None:
    cfg = _fast(config)
    topics = Topics(cfg.kafka.topic_prefix)
    kinds = [msgpack.packb({"v": 1, "kind": kind}) for kind in ("nope", "x1")]
    # as large as the producer sends: the letter around it would not fit, so its payload is cut
    producer = make_producer(cfg.kafka)
    full = b"\xc1" + b"x" * (producer.config["max_request_size"] - 200)
    producer.close()
    # valid records the message around them refutes: an event time five years ahead of the
    # message's timestamp (a producer that leaves the timestamp to Kafka), a profile on the events
    # topic; and a context vector infinite in float32
    ahead = to_dict(Interaction("e", "r", "u1", "i1", CLICK, 0, int(time.time() * 1000) + 5 * 365 * 86_400_000))
    click = to_dict(Interaction("e", "r", "u1", "i1", CLICK, 0, 1_700_000_000_000))
    checked = [
        msgpack.packb(ahead),
        encode(Profile("u1", [0.5], 1_700_000_000_000)),
        msgpack.packb({**click, "context": {"features": [1e39]}}),
    ]
    codes = ("not_msgpack", "unknown_kind", "ahead_of_timestamp", "wrong_topic", "bad_value")
    counted = {code: _dead_letters(topics.events, code) for code in codes}
    _produce(cfg, _clicks(50, 1_700_000_000_000), raw=[b"\xc1not msgpack", *kinds, full, *checked])
    _run_in_process(cfg)
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert ckpt is not None and int(ckpt.items.count.sum()) == 50  # the daemon went on
    assert ckpt.event_time_ms < 1_800_000_000_000  # the clock did not jump five years
    assert all(bool(torch.isfinite(table.emb).all()) for table in (ckpt.users, ckpt.items))
    consumer = make_consumer(cfg.kafka, None, consumer_timeout_ms=5_000)
    consumer.subscribe([Topics.dlq(topics.events)])
    letters = sorted((msgpack.unpackb(m.value) for m in consumer), key=lambda letter: letter["offset"])
    consumer.close()
    assert [letter["code"] for letter in letters] == [
        "not_msgpack", "unknown_kind", "unknown_kind", "not_msgpack", "ahead_of_timestamp", "wrong_topic", "bad_value"
    ]  # fmt: skip
    assert letters[0]["reason"].startswith("not msgpack") and "unknown record kind 'x1'" in letters[2]["reason"]
    assert [letter["payload"] for letter in letters[:3]] == [b"\xc1not msgpack", *kinds]
    assert not any(letter["truncated"] for letter in letters[:3])
    cut = letters[3]
    assert cut["truncated"] and cut["payload_bytes"] == len(full) and cut["payload"] == full[: len(cut["payload"])]
    # counted by rule, not by message text (whose values would make a metric series each)
    assert _dead_letters(topics.events, "not_msgpack") - counted["not_msgpack"] == 2
    assert _dead_letters(topics.events, "unknown_kind") - counted["unknown_kind"] == 2
    assert all(_dead_letters(topics.events, code) - counted[code] == 1 for code in codes[2:])


def _dead_letters(topic: str, code: str) -> float:
    return REGISTRY.get_sample_value("twotower_dead_letters_total", {"topic": topic, "reason": code}) or 0.0


def test_nightly_reads_exactly_one_day_and_is_idempotent(config: Config) -> None:
    cfg = _fast(config)
    day = dt.date(2024, 3, 10)
    start, end = day_bounds_ms(day, "UTC")
    inside = _clicks(200, start + 1_000, step_ms=60_000)  # 200 minutes into the day
    before = _clicks(30, start - 40 * 60_000, step_ms=60_000)  # the 40 minutes before it
    after = _clicks(30, end, step_ms=60_000)  # the next day
    _produce(cfg, before + inside + after)
    assert len(load_day(cfg, Topics(cfg.kafka.topic_prefix), day)) == 200

    first = run_nightly(cfg, day, progress=False)
    assert first.status == "trained" and first.examples == 200
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert ckpt is not None and ckpt.dense_version == 1
    again = run_nightly(cfg, day, progress=False)
    assert again.status == "skipped"
    unchanged = checkpoint.load(cfg.trainer.state_dir)
    for name, value in ckpt.dense.items():
        torch.testing.assert_close(unchanged.dense[name], value, rtol=0, atol=0)

    # warm start: the next day's retrain starts from these weights and moves them
    second = run_nightly(cfg, day + dt.timedelta(days=1), progress=False)
    assert second.status == "trained" and second.examples == 30
    later = checkpoint.load(cfg.trainer.state_dir)
    assert later.dense_version == 2
    assert any(not torch.equal(later.dense[k], v) for k, v in ckpt.dense.items())


def test_row_updates_between_full_checkpoints_and_a_crash_resumes_from_the_full_one(config: Config) -> None:
    """With full checkpoints spaced out, the trainer writes row updates of only the changed rows
    (no offsets); killed without a final checkpoint it resumes from the full checkpoint, replays
    the rest from Kafka exactly once, and numbers its writes above the row updates it finds."""
    # stream_item_rows: the clicked items' rows change too, so the update carries item side columns
    cfg = _fast(config).with_overrides({"trainer": {"full_checkpoint_interval_s": 3_600, "stream_item_rows": True}})
    state_dir = cfg.trainer.state_dir
    t0 = 1_700_000_000_000
    _produce(cfg, _clicks(200, t0))
    _run_in_process(_fast(config))  # every checkpoint full: the last one holds the 200 clicks
    full = checkpoint.load(state_dir)
    assert full is not None and int(full.items.count.sum()) == 200
    trainer = StreamTrainer(cfg)  # resumed: the next full checkpoint is an hour away
    trainer.startup()
    loop = threading.Thread(target=trainer.main_loop, daemon=True)
    loop.start()
    try:
        later = [Interaction(f"late-{k}", f"rl{k}", "u-late", f"i{k}", "click", 0, t0 + 400_000 + k) for k in range(3)]
        _produce(cfg, later)
        _wait_for(
            lambda: any("u-late" in _update(path).users.ids for _, path in checkpoint.row_updates(state_dir)),
            "a row update with the late user",
        )
    finally:
        trainer.shutdown_flag.set()  # a crash: no final checkpoint
        loop.join(timeout=30)
        trainer.consumer.close(autocommit=False)
        trainer.producer.close(timeout=10)
        trainer.lock.release()
    updates = checkpoint.row_updates(state_dir)  # all of them, also those written after the wait
    again = checkpoint.load(state_dir)
    assert again is not None and again.seq == full.seq  # the full checkpoint was not rewritten
    for seq, path in updates:
        update = _update(path)
        assert update.seq == seq > full.seq and update.base_seq == full.seq and update.offsets == {}
        assert len(update.users.ids) < 40 and bool((update.users.updated_seq == seq).all())
    late = next(_update(p) for _, p in updates if "u-late" in _update(p).users.ids)
    assert {"i0", "i1", "i2"} <= set(late.items.ids)
    assert late.item_content.shape == (len(late.items.ids), cfg.model.content_dim)

    for _ in range(2):  # restarted twice before writing anything
        restarted = StreamTrainer(cfg)
        restarted.startup()  # its row updates must name the full checkpoint on disk (what a publisher read)
        try:
            assert restarted.full_seq == full.seq and restarted.state is not None
            assert restarted.state.seq == updates[-1][0] and checkpoint.row_updates(state_dir) == updates
        finally:
            restarted.consumer.close(autocommit=False)
            restarted.producer.close(timeout=10)
            restarted.lock.release()
    resumed = _run_in_process(cfg)
    final = checkpoint.load(state_dir)
    assert final is not None and checkpoint.row_updates(state_dir) == []
    assert final.seq > updates[-1][0]  # numbered above what a publisher may have seen
    assert int(final.items.count.sum()) == 203 and int(final.users.count.sum()) == 203  # exactly once
    assert resumed.state is not None and "u-late" in resumed.state.users


def _update(path) -> checkpoint.Checkpoint:
    update = checkpoint.load_row_update(path)
    assert update is not None
    return update


def _wait_for(condition, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (FileNotFoundError, EOFError, RuntimeError):  # a file replaced while read
            value = None
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
