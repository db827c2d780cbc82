"""The nightly retrain against the real broker: counting the day once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from trainer import nightly
from trainer.nightly import day_bounds_ms, run_nightly
from trainer.state import TrainerState
from trainer.stream import StreamTrainer
from twotower import checkpoint
from twotower.config import Config
from twotower.events import CLICK, IMPRESSION, CatalogItem, Interaction
from twotower.kafka_io import ensure_topics, make_producer, send_record

pytestmark = pytest.mark.integration

DAY = dt.date(2024, 3, 10)
SMALL_MODEL = {"dim": 8, "id_dim": 4, "hidden": 16, "content_dim": 4, "profile_dim": 2, "history_len": 5}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small(cfg: Config, **trainer: Any) -> Config:
    return cfg.with_overrides(
        {
            "model": SMALL_MODEL,
            "trainer": {"checkpoint_interval_s": 0.3, "batch_size": 16, "max_batch_wait_ms": 50, **trainer},
        }
    )


def _clicks(tag: str, n: int, t0_ms: int, step_ms: int = 60_000, users: int = 8, items: int = 12) -> list[Interaction]:
    return [
        Interaction(
            f"{tag}{k}", f"{tag}r{k}", f"u{k % users}", f"i{(k * 5) % items}", CLICK, 0, t0_ms + k * step_ms,
            {"features": [float(k % 3)]},
        )
        for k in range(n)
    ]  # fmt: skip


def _impressions(clicks: list[Interaction], items: int = 12) -> list[Interaction]:
    """One impression per click's request, listing two retrieved-but-not-shown items (hard negatives)."""
    out = []
    for c in clicks:
        k = int(c.item_id[1:])
        retrieved = [f"i{(k + 1) % items}", f"i{(k + 2) % items}"]
        context = {"retrieved": retrieved}
        out.append(
            Interaction(c.event_id + "i", c.request_id, c.user_id, c.item_id, IMPRESSION, 0, c.ts_ms - 1, context)
        )
    return out


def _produce(cfg: Config, records: list) -> None:
    topics = ensure_topics(cfg.kafka)
    producer = make_producer(cfg.kafka)
    for record in records:
        send_record(producer, topics.catalog if isinstance(record, CatalogItem) else topics.events, record)
    producer.flush()
    producer.close()


def _catalog(items: int = 12) -> list[CatalogItem]:
    return [CatalogItem(f"i{i}", f"c{i % 3}", [float(i % 3 == j) for j in range(3)], 0) for i in range(items)]


def _expected_histories(clicks: list[Interaction], length: int) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for c in sorted(clicks, key=lambda c: c.ts_ms):
        out.setdefault(c.user_id, []).append((c.item_id, c.ts_ms))
    return {u: h[-length:] for u, h in out.items()}


def _counts(ckpt: checkpoint.Checkpoint) -> tuple[int, int]:
    return int(ckpt.users.count.sum()), int(ckpt.items.count.sum())


def _learned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records how many examples each learning step of any TrainerState trains on."""
    sizes: list[int] = []
    original = TrainerState.learn

    def spy(self: TrainerState, examples: Any, dense: bool, row_lr: float | None = None) -> Any:
        sizes.append(len(examples))
        return original(self, examples, dense, row_lr)

    monkeypatch.setattr(TrainerState, "learn", spy)
    return sizes


# --- counting the day's clicks once -------------------------------------------------------------------


def test_nightly_owning_the_state_counts_each_day_once(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _small(config)
    start, _ = day_bounds_ms(DAY, "UTC")
    day1 = _clicks("a", 40, start + 1_000)
    day2 = _clicks("b", 30, start + 86_400_000 + 1_000)
    _produce(cfg, _catalog() + day1 + day2)
    learned = _learned(monkeypatch)

    assert run_nightly(cfg, DAY, progress=False).status == "trained"
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert ckpt is not None
    assert _counts(ckpt) == (40, 40)  # counted once, by the nightly itself
    assert ckpt.histories == _expected_histories(day1, 5)  # tomorrow starts from today's histories
    assert ckpt.event_time_ms == day1[-1].ts_ms
    assert sum(learned) == 40  # learned once (the retrain), not again when counting

    # a forced rerun retrains the date but does not count it again
    assert run_nightly(cfg, DAY, force=True, progress=False).status == "trained"
    again = checkpoint.load(cfg.trainer.state_dir)
    assert _counts(again) == (40, 40) and again.histories == ckpt.histories

    # the next day's examples start from the histories of the day before
    seen: list[list[tuple[str, int]]] = []
    build = nightly.build_examples

    def spy(state: TrainerState, clicks: list[Interaction], day_start_ms: int) -> list:
        out = build(state, clicks, day_start_ms)
        seen.extend(h for _, h in out)
        return out

    monkeypatch.setattr(nightly, "build_examples", spy)
    assert run_nightly(cfg, DAY + dt.timedelta(days=1), progress=False).examples == 30
    assert seen[0] == _expected_histories(day1, 5)[day2[0].user_id]
    later = checkpoint.load(cfg.trainer.state_dir)
    assert _counts(later) == (70, 70)
    assert later.histories == _expected_histories(day1 + day2, 5)


def test_nightly_does_not_recount_what_a_stopped_streaming_trainer_applied(config: Config) -> None:
    cfg = _small(config)
    start, _ = day_bounds_ms(DAY, "UTC")
    clicks = _clicks("a", 40, start + 1_000)
    _produce(cfg, _catalog() + clicks[:25])
    trainer = StreamTrainer(cfg, max_idle_s=2.0)
    trainer.startup()
    try:
        trainer.main_loop()
    finally:
        trainer.shutdown()
    partial = checkpoint.load(cfg.trainer.state_dir)
    assert partial is not None and _counts(partial) == (25, 25)
    _produce(cfg, clicks[25:])  # arrives after the streaming trainer stopped

    assert run_nightly(cfg, DAY, progress=False).examples == 40
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert _counts(ckpt) == (40, 40)
    assert ckpt.histories == _expected_histories(clicks, 5)
