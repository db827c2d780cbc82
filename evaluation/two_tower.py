"""The two-tower policies, run through the production trainer, publisher and retriever code.

Only the clock and the transport differ from the live system:

* **learning** is :class:`trainer.state.TrainerState` (``observe_clicks`` + ``learn`` for the
  streaming ID-row updates; :func:`trainer.nightly.build_examples` + :func:`trainer.nightly.retrain`
  for the nightly retrain, with the same per-date seed as ``train nightly``);
* **publishing** is ``TrainerState.to_checkpoint`` → :func:`publisher.build.full_snapshot` /
  :func:`publisher.build.delta_snapshot`, in memory instead of through Redis;
* **scoring** is :class:`retriever.state.ServingState` (``from_full`` / ``apply_delta``,
  ``user_vector`` from the published user row and the user's live history, ``search`` over
  the published Faiss index, seen items excluded).

Policies:

* ``two_tower_nightly``: no streaming trainer. At each UTC day boundary ``build_examples``
  pairs each of the day's clicks with its user's history before it, the day's clicks are
  counted into the state (``count_clicks``: ID frequencies for the negative sampler and logQ,
  and the trainer's histories), and ``retrain`` (one shuffled, warm-started epoch over towers
  and rows) runs on the state itself, as ``train nightly`` does when it owns the state
  directory; the result is published as a full version.
* ``two_tower_streaming`` (as deployed): a streaming trainer learns every click (ID rows
  only, towers frozen) in micro-batches formed as the live trainer forms them (a batch
  closes ``max_batch_wait_ms`` of event time after its first click, or at ``batch_size``
  clicks); a micro-batch is learned and published as a delta once its last click is
  ``publish_every_s`` old. At each day boundary the micro-batches still waiting are learned
  (the live trainer learns a click at once and only its publishing waits, so by the 02:00
  retrain it has learned the whole day), then the nightly retrain trains a *copy* and
  hands its result over through :mod:`trainer.handoff` (files in a private temporary
  directory), the streaming state merges it, and a full version is published. With
  ``trainer.nightly_from_base`` (default) the copy's ID rows first go back to the previous
  nightly's result (``handoff.rebase``; the bootstrap's rows before the first nightly), as
  ``train nightly`` does with its stored base; the policy keeps that base in memory.

Warm-up (bootstrap, the same for both, computed once): every warm-up click is observed in
order, then ``bootstrap_epochs`` shuffled epochs of ``retrain`` (towers and rows, seeds
``seed * 1_000_003 + epoch``) run over those examples, and a full version is published.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.catalog import ItemSide
from evaluation.policies import Policy
from evaluation.protocol import Event, World, day_start_ms, utc_day
from publisher.build import delta_snapshot, full_snapshot, is_empty, model_from_checkpoint
from retriever.state import ServingState
from trainer import handoff
from trainer.nightly import build_examples, count_clicks, lost_pre_day_clicks, read_back_lost_clicks, retrain
from trainer.state import TrainerState
from twotower.config import ModelConfig, TrainerConfig
from twotower.events import Interaction
from twotower.model import TwoTower
from twotower.snapshots import FULL, VersionMeta

log = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP_EPOCHS = 10
"""Shuffled epochs over the warm-up (towers and rows) before the replay starts. Measured on
MovieLens-100K (two_tower_nightly HR@10): 3 epochs 0.150, 10 epochs 0.166, 20 epochs 0.170; 10
keeps the warm-up a small share of a run."""


def click(event: Event, index: int) -> Interaction:
    """The click record the producers would have written for an event."""
    return Interaction(
        event_id=f"e{index}",
        request_id=f"e{index}",  # a replayed click is its own request (as `produce replay` writes it)
        user_id=event.user,
        item_id=event.item,
        type="click",
        position=0,
        ts_ms=event.ts_ms,
    )


def apply_item_side(state: TrainerState, side: Mapping[str, ItemSide], seen: Iterable[tuple[str, int]]) -> int:
    """Give the state the catalogue record of each item of ``seen`` (``(item id, ts_ms)`` in event
    order) it does not know yet, at the item's first sighting, as the trainers read the catalogue
    topic; returns how many were new."""
    n = 0
    if not side:
        return n
    for item_id, ts_ms in seen:
        if item_id not in state.catalog:
            found = side.get(item_id)
            if found is not None:
                state.apply_catalog(found.record(item_id, ts_ms))
                n += 1
    return n


def utc_date(day: int) -> dt.date:
    """The calendar date of a UTC day number (days since 1970-01-01)."""
    return dt.date(1970, 1, 1) + dt.timedelta(days=day)


def nightly_seed(trainer_seed: int, day: int) -> int:
    """The shuffle seed ``train nightly`` uses for a date (``seed * 1_000_003 + date.toordinal()``)."""
    return trainer_seed * 1_000_003 + utc_date(day).toordinal()


class WarmStart:
    """The bootstrapped trainer state, computed once and shared (as copies) by both policies.

    Args:
        model_cfg: tower shapes.
        trainer_cfg: learning rates, batch size, seed.
        epochs: shuffled epochs over the warm-up examples.
        item_side: catalogue records by item id (:mod:`evaluation.catalog`); an item's record is
            applied at its first event.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        trainer_cfg: TrainerConfig,
        epochs: int,
        item_side: Mapping[str, ItemSide] | None = None,
    ) -> None:
        self.model_cfg = model_cfg
        self.trainer_cfg = trainer_cfg
        self.epochs = epochs
        self.item_side: Mapping[str, ItemSide] = item_side or {}
        self._state: TrainerState | None = None
        self.seconds = 0.0
        self.losses: list[float] = []

    def state(self, warmup: Sequence[Event]) -> TrainerState:
        """A private copy of the state trained on ``warmup`` (trained at the first call)."""
        if self._state is None:
            started = time.perf_counter()
            state = TrainerState(self.model_cfg, self.trainer_cfg)
            apply_item_side(state, self.item_side, ((e.item, e.ts_ms) for e in warmup))
            examples = state.observe_clicks(click(e, i) for i, e in enumerate(warmup))
            for epoch in range(self.epochs):
                seed = self.trainer_cfg.seed * 1_000_003 + epoch
                self.losses.append(retrain(state, examples, seed, self.trainer_cfg.batch_size, progress=False))
                log.info("warm-up epoch %d: mean loss %.4f", epoch, self.losses[-1])
            if self.epochs:
                state.dense_version += 1
            self._state = state
            self.seconds = time.perf_counter() - started
        return copy.deepcopy(self._state)


class TwoTowerPolicy(Policy):
    """A two-tower policy: nightly-only or nightly + streaming (see the module docstring).

    Args:
        name: the policy's name in the report.
        streaming: also run the streaming trainer.
        warm_start: the shared bootstrap.
        publish_every_ms: event-time delay before a streaming update is visible.
    """

    nightly = True

    def __init__(self, name: str, streaming: bool, warm_start: WarmStart, publish_every_ms: int) -> None:
        super().__init__()
        self.name = name
        self.streaming = streaming
        self.warm_start = warm_start
        self.tcfg = warm_start.trainer_cfg
        self.publish_every_ms = publish_every_ms
        self.state: TrainerState | None = None
        self.serving: ServingState | None = None
        self.model: TwoTower | None = None
        self.version = 0
        self.published_seq = 0
        self.counter = 0
        self.batches: list[list[Interaction]] = []
        """Closed or open streaming micro-batches not learned yet, oldest first."""
        self.streamed = 0
        self.stream_steps = 0
        self.nightly_losses: list[float] = []
        self.base: dict[str, Any] | None = None
        """The rows of the last nightly (or of the bootstrap) when ``trainer.nightly_from_base``."""
        self._handoff_dir: tempfile.TemporaryDirectory[str] | None = None
        self._warmup_tail: tuple[int, int] = (-1, 0)
        """The warm-up's last day and how many of its events fall on it (counted by the warm-up)."""
        self._past_days: dict[int, list[Interaction]] = {}
        """The clicks of the last ``trainer.nightly_history_days`` days (warm-up or retrained):
        ``train nightly`` reads days back for what a busy day pushed out of the streaming state's
        histories and their overflow lacks (:func:`trainer.nightly.read_back_lost_clicks`)."""

    # --- publishing -------------------------------------------------------------------------
    def _publish_full(self, now_ms: int) -> None:
        assert self.state is not None
        started = time.perf_counter()
        ckpt = self.state.to_checkpoint({})
        self.model = model_from_checkpoint(ckpt)
        snap = full_snapshot(ckpt, model=self.model)
        self.version += 1
        meta = VersionMeta(self.version, FULL, None, self.version, now_ms, ckpt.seq)
        self.serving = ServingState.from_full(meta, snap)
        self.published_seq = ckpt.seq
        self.publishes += 1
        self._timed("publish_full", started)

    def _publish_delta(self, now_ms: int) -> None:
        """What the streaming trainer's checkpoint + the publisher's delta do, in memory."""
        assert self.state is not None and self.serving is not None
        started = time.perf_counter()
        state = self.state
        state.expire(state.event_time_ms)
        state.seq += 1
        ckpt = state.to_checkpoint({})
        delta = delta_snapshot(ckpt, self.published_seq, model=self.model)
        if not is_empty(delta):
            self.version += 1
            self.serving = self.serving.apply_delta(delta, self.version, now_ms)
            self.publishes += 1
        self.published_seq = ckpt.seq
        self._timed("publish_delta", started)

    # --- protocol hooks ---------------------------------------------------------------------
    def bootstrap(self, warmup: Sequence[Event], world: World) -> None:
        self.state = self.warm_start.state(warmup)
        last = utc_day(warmup[-1].ts_ms) if warmup else -1
        self._warmup_tail = last, sum(1 for e in warmup if utc_day(e.ts_ms) == last)
        for i, e in enumerate(warmup):  # the days before the warm-up's last, as Kafka keeps them
            if last - self.tcfg.nightly_history_days <= utc_day(e.ts_ms) < last:
                self._past_days.setdefault(utc_day(e.ts_ms), []).append(click(e, i))
        if self.streaming and self.tcfg.nightly_from_base:
            self.base = handoff.base_of(self.state, "bootstrap")
        self.state.seq += 1
        self.counter = len(warmup)
        self._publish_full(warmup[-1].ts_ms if warmup else 0)

    def end_of_day(self, day: int, events: Sequence[Event], world: World) -> None:
        assert self.state is not None
        if not events:
            return
        started = time.perf_counter()
        clicks = [click(e, i) for i, e in enumerate(events)]
        date = utc_date(day)
        seed = nightly_seed(self.tcfg.seed, day)
        if self.streaming:
            # the live trainer learned the day's last clicks long before the 02:00 retrain; here they
            # may still wait for their publish delay (a log with day-level timestamps: the whole day)
            while self.batches:
                self._learn_batch(self.batches.pop(0))
            self._nightly_handoff(date.isoformat(), clicks, day, seed)
        else:
            state = self.state
            apply_item_side(state, self.warm_start.item_side, ((e.item, e.ts_ms) for e in events))
            # as ``train nightly`` owning the state: examples from the histories before the day,
            # then the day's clicks counted once, before the retrain (the warm-up counted the
            # first ones of the day the warm-up ends in, as a checkpoint's offsets would say)
            counted = self._warmup_tail[1] if self._warmup_tail[0] == day else 0
            earlier = self._read_back(state, day, clicks, clicks[:counted])
            examples = build_examples(state, clicks, day_start_ms(day), earlier)
            count_clicks(state, clicks[counted:])
            self.nightly_losses.append(retrain(state, examples, seed, self.tcfg.batch_size, progress=False))
            state.dense_version += 1
            state.nightly_trained(date.isoformat())
            state.seq += 1
        self._past_days[day] = clicks
        for old in [d for d in self._past_days if d <= day - self.tcfg.nightly_history_days]:
            del self._past_days[old]
        self.retrains += 1
        self._timed("nightly", started)
        self._publish_full(events[-1].ts_ms)

    def _read_back(
        self, state: TrainerState, day: int, clicks: list[Interaction], counted: list[Interaction]
    ) -> list[Interaction]:
        """What ``train nightly`` reads back from the days before ``day`` (warm-up days included);
        ``counted``: the day's clicks ``state`` has counted."""
        bounds = (day_start_ms(day), day_start_ms(day + 1))
        lost = lost_pre_day_clicks(state, bounds, clicks, counted)
        return read_back_lost_clicks(
            state, bounds, lost, lambda back: self._past_days.get(day - back, []), self.tcfg.nightly_history_days
        )

    def _nightly_handoff(self, date: str, clicks: list[Interaction], day: int, seed: int) -> None:
        """``train nightly`` beside a running streaming trainer: train a copy, hand the change over."""
        assert self.state is not None
        if self._handoff_dir is None:
            self._handoff_dir = tempfile.TemporaryDirectory(prefix="twotower-eval-handoff-")
        state_dir = Path(self._handoff_dir.name)
        # the streaming trainer applied each item's catalogue record at its first click already
        before = copy.deepcopy(self.state)
        after = copy.deepcopy(self.state)
        if self.base is not None:
            handoff.rebase(after, self.base)
        # the streaming trainer counted every click of the day before the retrain
        examples = build_examples(after, clicks, day_start_ms(day), self._read_back(after, day, clicks, clicks))
        self.nightly_losses.append(retrain(after, examples, seed, self.tcfg.batch_size, progress=False))
        if self.base is not None:
            self.base = handoff.base_of(after, date)
        handoff.write(state_dir, date, before, after)
        if not handoff.merge_pending(self.state, state_dir):
            raise RuntimeError(f"nightly handoff of {date} was written but not found")
        handoff.retire(state_dir)
        (state_dir / handoff.FILENAME).with_suffix(".applied").unlink(missing_ok=True)
        # the streaming trainer checkpoints right after a merge
        self.state.expire(self.state.event_time_ms)
        self.state.seq += 1

    def advance(self, now_ms: int, world: World) -> None:
        if not self.streaming or not self.batches:
            return
        due = now_ms - self.publish_every_ms
        learned = False
        # a batch is complete once it is not the newest one (or is full); learn it when its last click is due
        while self.batches and self.batches[0][-1].ts_ms <= due:
            batch = self.batches[0]
            if len(self.batches) == 1 and not self._closed(batch, now_ms):
                break
            self.batches.pop(0)
            self._learn_batch(batch)
            learned = True
        if learned:
            self._publish_delta(now_ms)

    def _closed(self, batch: list[Interaction], now_ms: int) -> bool:
        return len(batch) >= self.tcfg.batch_size or now_ms - batch[0].ts_ms >= self.tcfg.max_batch_wait_ms

    def _learn_batch(self, batch: list[Interaction]) -> None:
        assert self.state is not None
        started = time.perf_counter()
        apply_item_side(self.state, self.warm_start.item_side, ((r.item_id, r.ts_ms) for r in batch))
        examples = self.state.observe_clicks(batch)
        self.state.learn(examples, dense=False)
        self.streamed += len(batch)
        self.stream_steps += 1
        self._timed("stream_learn", started)

    def learn(self, event: Event, world: World) -> None:
        self.counter += 1
        if not self.streaming:
            return
        record = click(event, self.counter)
        last = self.batches[-1] if self.batches else None
        if last is not None and not self._closed(last, event.ts_ms):
            last.append(record)
        else:
            self.batches.append([record])

    def recommend(self, user: str, now_ms: int, world: World, n: int) -> list[str]:
        serving = self.serving
        assert serving is not None
        started = time.perf_counter()
        history = world.history_newest_first(user)
        usable = user in serving.user_rows or any(
            item in serving.item_pos for item, _ in history[: serving.model_config.history_len]
        )
        if not usable:
            return []
        vec = serving.user_vector(user, history, None, now_ms)
        out = [item for item, _ in serving.search(vec, n, exclude=world.seen_by(user))]
        self._timed("score", started)
        return out

    def describe(self) -> dict[str, Any]:
        out = {
            **super().describe(),
            "streaming": self.streaming,
            "streamed_clicks": self.streamed,
            "stream_steps": self.stream_steps,
            "bootstrap_epochs": self.warm_start.epochs,
            "catalogue_items": len(self.warm_start.item_side),
            "bootstrap_losses": [round(x, 4) for x in self.warm_start.losses],
            "bootstrap_seconds": round(self.warm_start.seconds, 2),
            "mean_nightly_loss": round(sum(self.nightly_losses) / len(self.nightly_losses), 4)
            if self.nightly_losses
            else None,
            "model": self.warm_start.model_cfg.model_dump(),
            "trainer": {
                k: v
                for k, v in self.tcfg.model_dump(mode="json").items()
                if k
                in (
                    "batch_size",
                    "max_batch_wait_ms",
                    "stream_lr",
                    "nightly_lr",
                    "nightly_from_base",
                    "nightly_history_days",
                    "admission_min_count",
                    "row_ttl_days",
                    "seed",
                )
            },
        }
        if self.state is not None:
            out["rows"] = {"users": len(self.state.users), "items": len(self.state.items)}
        return out

    def close(self) -> None:
        if self._handoff_dir is not None:
            self._handoff_dir.cleanup()
            self._handoff_dir = None
