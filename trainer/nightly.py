"""``train nightly``: a shuffled one-epoch retrain over yesterday's events, warm-started.

Reading "yesterday": Kafka's record timestamp is the event time (producers set it), so the
broker's time index finds the first record of the day in each partition
(``offsets_for_times``). The read starts ``nightly_margin_ms`` early and stops that much
late, and each event's own ``ts_ms`` decides whether it belongs to the day, so events that
arrived out of order are neither lost nor counted in two days. No archive is needed while
the topic's retention covers the day (set retention to a few days at least).

Warm start: the retrain starts from the latest checkpoint (dense weights, ID rows, optimizer
state), builds each click's history in event order, shuffles the examples with a seed
derived from the configured seed and the date, and trains one epoch over towers and rows.
With ``trainer.nightly_from_base`` (default) the ID rows start from those the previous nightly
produced, not from the streaming trainer's (:mod:`trainer.handoff`, "the nightly base"), and the
rows this retrain produces become the next base.

The result becomes a full snapshot: written as the new checkpoint when no streaming trainer
runs, or handed over to the running one (:mod:`trainer.handoff`). A date already retrained
is skipped, so rerunning it changes nothing.

Counting: the state's ID counts (popularity sampler, logQ, admission) and histories must
include every click exactly once. Beside a running streaming trainer, it counts them. When the
nightly owns the state (no streaming trainer), it counts the day's clicks itself, once: not
those the checkpoint's offsets say a streaming trainer applied before it stopped, and none on
a forced rerun of a date already done. It records the day and the offsets it read in the
checkpoint (:class:`trainer.stream.CountedRange`), so that a streaming trainer started later,
which replays the topic from the checkpoint's offsets, skips those interactions instead of
counting them again, and counts and learns the day's interactions that arrived after the read.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kafka import TopicPartition
from tqdm import tqdm

from trainer import handoff
from trainer.days import day_bounds_ms
from trainer.state import NIGHTLY_DONE, TrainerState
from trainer.stream import APPLIED_ABOVE, NIGHTLY_COUNTED, CountedRange, StateLock
from twotower import checkpoint
from twotower.config import Config, KafkaConfig
from twotower.events import CLICK, CatalogItem, Interaction, Profile, SchemaError
from twotower.kafka_io import Topics, decode_message, ensure_topics, make_consumer, parse_partition_key

log = logging.getLogger(__name__)
NIGHTLY_LOCK = "nightly.lock"
"""The lock file that lets one nightly run at a time work on a state directory."""
T = TypeVar("T")


@dataclass(frozen=True)
class NightlyResult:
    date: str
    status: str
    """``trained``, ``skipped`` (date done before), ``empty`` (no events that day), ``stopped``
    (a shutdown during the retrain; nothing kept) or ``not_over`` (the day and the read margin
    after it have not ended yet; nothing done)."""
    examples: int = 0
    mean_loss: float = 0.0
    handed_over: bool = False
    """True when a running streaming trainer will merge the result."""


def read_topic_range(
    cfg: KafkaConfig,
    topic: str,
    start_ms: int | None,
    end_ms: int | None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[object]:
    """Raw messages of ``topic`` whose Kafka timestamp falls in ``[start_ms, end_ms)`` by the time
    index (``None``: from the beginning / to the current end). Reads without a consumer group.

    Raises:
        NightlyStopped: ``should_stop`` said so between two polls.
    """
    consumer = make_consumer(cfg, None, enable_auto_commit=False, consumer_timeout_ms=5_000)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        if end_ms is not None:
            found = consumer.offsets_for_times({tp: end_ms for tp in tps})
            ends = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
        starts = consumer.beginning_offsets(tps)
        if start_ms is not None:
            found = consumer.offsets_for_times({tp: start_ms for tp in tps})
            starts = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
        todo = {tp for tp in tps if starts[tp] < ends[tp]}
        if not todo:
            return
        consumer.assign(sorted(todo, key=lambda t: t.partition))
        for tp in todo:
            consumer.seek(tp, starts[tp])
        while todo:
            if should_stop is not None and should_stop():
                raise NightlyStopped
            polled = consumer.poll(timeout_ms=1_000, max_records=5_000)
            if not polled:
                # nothing more arrives below the end offsets: they may point past compacted gaps
                if all(consumer.position(tp) >= ends[tp] for tp in todo):
                    break
                continue
            for tp, messages in polled.items():
                for message in messages:
                    if message.offset < ends[tp]:
                        yield message
                if consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
                    consumer.pause(tp)
    finally:
        consumer.close(autocommit=False)


def load_day(cfg: Config, topics: Topics, date: dt.date) -> list[Interaction]:
    """Clicks of ``date`` (by event time, in the configured timezone), in event-time order."""
    return [r for r in load_day_interactions(cfg, topics, date) if r.type == CLICK]


def load_day_interactions(cfg: Config, topics: Topics, date: dt.date) -> list[Interaction]:
    """Clicks of ``date`` and the impressions that carry retrieved-but-not-shown items, in event-time order."""
    return [r for *_, r in load_day_records(cfg, topics, date)]


def load_day_records(
    cfg: Config, topics: Topics, date: dt.date, should_stop: Callable[[], bool] | None = None
) -> list[tuple[int, int, Interaction]]:
    """As :func:`load_day_interactions`, each with its partition and offset in the events topic."""
    start, end = day_bounds_ms(date, cfg.trainer.schedule_timezone)
    margin = cfg.trainer.nightly_margin_ms
    records: list[tuple[int, int, int, Interaction]] = []
    bad = 0
    for message in read_topic_range(cfg.kafka, topics.events, start - margin, end + margin, should_stop):
        try:
            record = decode_message(message, topics)
        except SchemaError:
            bad += 1  # the streaming trainer dead-letters it; the nightly only skips it
            continue
        if not isinstance(record, Interaction) or not start <= record.ts_ms < end:
            continue
        if record.type == CLICK or record.context.get("retrieved"):
            records.append((record.ts_ms, message.partition, message.offset, record))
    if bad:
        log.warning("skipped %d malformed records while reading %s", bad, date)
    records.sort(key=lambda x: x[:3])
    return [(partition, offset, r) for _, partition, offset, r in records]


def applied_by_checkpoint(ckpt: checkpoint.Checkpoint | None, topic: str) -> Callable[[int, int], bool]:
    """Whether the state of ``ckpt`` already includes the record at (partition, offset) of
    ``topic``: below the checkpoint's offset for the partition, or listed as applied above it
    (what a streaming trainer counted before it stopped)."""
    if ckpt is None:
        return lambda partition, offset: False
    below = {p: off for (t, p), off in _by_partition(ckpt.offsets).items() if t == topic}
    above = {p: set(offs) for (t, p), offs in _by_partition(ckpt.extra.get(APPLIED_ABOVE, {})).items() if t == topic}
    return lambda partition, offset: offset < below.get(partition, 0) or offset in above.get(partition, ())


def _by_partition(keyed: dict[str, T]) -> dict[tuple[str, int], T]:
    return {parse_partition_key(key): value for key, value in keyed.items()}


MAX_COUNTED_RANGES = 1_000


def counted_ranges(
    ckpt: checkpoint.Checkpoint | None,
    day: tuple[int, int],
    records: Iterable[tuple[int, int, Interaction]],
    topic: str,
    counted: bool,
) -> list[list[Any]]:
    """The checkpoint's counted ranges (:data:`NIGHTLY_COUNTED`), plus ``day`` if this run counted
    it, with the span of offsets of the day's ``records`` (partition, offset, record) it read from
    ``topic`` in each partition (newest ``MAX_COUNTED_RANGES`` kept)."""
    ranges = [CountedRange.from_extra(r) for r in (ckpt.extra.get(NIGHTLY_COUNTED, []) if ckpt else [])]
    if counted and all((r.start_ms, r.end_ms) != day for r in ranges):
        spans: dict[tuple[str, int], tuple[int, int]] = {}
        for partition, offset, _ in records:
            first, last = spans.get((topic, partition), (offset, offset))
            spans[(topic, partition)] = (min(first, offset), max(last, offset))
        ranges.append(CountedRange(day[0], day[1], spans))
    return [r.to_extra() for r in ranges[-MAX_COUNTED_RANGES:]]


def count_clicks(state: TrainerState, clicks: list[Interaction]) -> None:
    """Count clicks the state has not seen (ID counts, admission, last-seen, event-time clock) and
    add them to the users' histories, without learning from them.

    This is what the streaming trainer does with every click before it learns; a nightly run that
    owns the state does it for the day's clicks no streaming trainer applied, so that the next
    day's histories and the negative sampler's and logQ's counts include them. Histories stay in
    event-time order even when the state had already seen later clicks of the user (a history
    takes each click in its place).
    """
    state.observe_clicks(clicks)


def load_side_topics(
    cfg: Config, topics: Topics, state: TrainerState, should_stop: Callable[[], bool] | None = None
) -> None:
    """Apply the (compacted) catalogue and profile topics, so a cold start knows every item.

    A key's last record is its current version (a topic not compacted yet still holds older
    ones); a catalogue item is applied only if it changes what the state holds, so unchanged
    items keep their rows' update stamps."""
    items: dict[str, CatalogItem] = {}
    for topic in (topics.catalog, topics.profiles):
        for message in read_topic_range(cfg.kafka, topic, None, None, should_stop):
            try:
                record = decode_message(message, topics)
            except SchemaError:
                continue
            if isinstance(record, CatalogItem):
                items[record.item_id] = record
            elif isinstance(record, Profile):
                state.apply_profile(record)
    for item in items.values():
        if state.catalog_differs(item):
            state.apply_catalog(item)


def _may_have_lost_pre_day(n_held: int, n_before_day: int, hist_len: int) -> bool:
    """A history at its length holding fewer entries from before the day may have lost some
    (clicks since the day began pushed the older ones out); a shorter one never lost any."""
    return n_held >= hist_len and n_before_day < hist_len


def _pre_day_histories(
    state: TrainerState, users: Iterable[str], day_start_ms: int
) -> tuple[dict[str, list[tuple[str, int]]], set[str]]:
    """What the state holds of each of ``users``' history from before the day (oldest first), and
    those of them it may have lost some of it for.

    With the overflow trusted for the day (:meth:`TrainerState.holds_pre_day_histories`), its
    history and what overflowed from it; otherwise its history alone, which holds a user's
    newest clicks without a gap, as the read-back (:func:`_lost`) assumes: what a pruned or
    overfilled overflow holds need not be.
    """
    hist_len = state.model_cfg.history_len
    trusted = state.holds_pre_day_histories(day_start_ms)
    held: dict[str, list[tuple[str, int]]] = {}
    short = set()
    for user in users:
        history = state.histories.get(user)
        if history is None:
            continue
        if trusted:
            held[user] = state.pre_day_history(user, day_start_ms)
        else:
            held[user] = [(i, t) for i, t in history if t < day_start_ms]
        if _may_have_lost_pre_day(len(history), len(held[user]), hist_len):
            short.add(user)
    return held, short


def _lost(click: Interaction, held: list[tuple[str, int]], day_start_ms: int) -> bool:
    """Whether a click from before the day is one the state no longer holds: older than the oldest
    pre-day entry it kept (or as old, and not that entry)."""
    oldest = held[0][1] if held else day_start_ms
    return click.ts_ms < oldest or (click.ts_ms == oldest and (click.item_id, click.ts_ms) not in held)


def lost_pre_day_clicks(
    state: TrainerState, day: tuple[int, int], clicks: Iterable[Interaction], counted: Iterable[Interaction]
) -> dict[str, int]:
    """How many clicks from before the day each user who clicks on it may have lost from the
    state's history, at most (and at most as many as fill ``model.history_len``); users who lost
    none are left out.

    The state holds each user's newest ``history_len`` clicks and counts every click it saw (its
    user table's sightings). A user's clicks before the day number at most: its sightings, less
    those of the day's clicks the state counted (``counted``), less the clicks after the day it
    holds. So a user whose first clicks came on the day, or who has held every click it ever
    made, lost nothing. A user whose row expired (its count starts again) counts as having lost
    none: what it had is older than the row TTL. None lost anything when the state says its
    overflow holds what the day needs (:meth:`TrainerState.holds_pre_day_histories`), the usual
    case: a nightly that runs the day after its date, beside a trainer that kept the overflow.
    Otherwise the overflow is left out: what the read-back finds completes the history alone.
    """
    start_ms, end_ms = day
    if state.holds_pre_day_histories(start_ms):
        return {}
    on_day: dict[str, int] = {}
    for click in counted:
        on_day[click.user_id] = on_day.get(click.user_id, 0) + 1
    hist_len = state.model_cfg.history_len
    held, short = _pre_day_histories(state, {c.user_id for c in clicks}, start_ms)
    out = {}
    for user in short:
        after = sum(t >= end_ms for _, t in state.histories[user])
        before = len(held[user])
        lost = state.users.sightings(user) - on_day.get(user, 0) - after - before
        if lost > 0:
            out[user] = min(lost, hist_len - before)
    return out


def read_back_lost_clicks(
    state: TrainerState,
    day: tuple[int, int],
    lost: dict[str, int],
    read_day: Callable[[int], Iterable[Interaction]],
    max_days: int,
) -> list[Interaction]:
    """The clicks from before the day that the state lost, oldest first, for the users of ``lost``
    (:func:`lost_pre_day_clicks`: how many each may have lost, at most).

    Reads one day at a time, ``read_day(n)`` giving the clicks ``n`` days before the day in event
    order, and stops after ``max_days`` days or as soon as it has found, for every user, as many
    lost clicks as ``lost`` says.
    """
    held, _ = _pre_day_histories(state, lost, day[0])
    missing = dict(lost)
    days: list[list[Interaction]] = []
    for back in range(1, max_days + 1):
        if not missing:
            break
        found = [c for c in read_day(back) if c.user_id in missing and _lost(c, held[c.user_id], day[0])]
        days.append(found)
        for click in found:
            missing[click.user_id] -= 1
        missing = {user: n for user, n in missing.items() if n > 0}
    return [click for found in reversed(days) for click in found]


def build_examples(
    state: TrainerState, clicks: list[Interaction], day_start_ms: int, earlier: Iterable[Interaction] = ()
) -> list[tuple[Interaction, list[tuple[str, int]]]]:
    """Each click with the history its user had just before it, replayed in event order.

    Histories start from what the state remembers from before the day, completed from
    ``earlier`` (clicks before the day, in event order; :func:`read_back_lost_clicks`) for the
    users the state may have lost some of it for: their entries older than the oldest the state
    still holds. Every ID seen gets a row (the nightly job sees the whole day, so it needs
    no admission filter).
    """
    hist_len = state.model_cfg.history_len
    held, short = _pre_day_histories(state, {c.user_id for c in clicks}, day_start_ms)
    lost: dict[str, list[tuple[str, int]]] = {}
    for click in earlier:
        if click.user_id in short and _lost(click, held[click.user_id], day_start_ms):
            lost.setdefault(click.user_id, []).append((click.item_id, click.ts_ms))
    histories = {user: deque([*lost.get(user, ()), *pairs], maxlen=hist_len) for user, pairs in held.items()}
    seq = state.next_seq
    out = []
    for click in clicks:
        state.users.add(click.user_id, click.ts_ms, seq)
        state.items.add(click.item_id, click.ts_ms, seq)
        hist = histories.setdefault(click.user_id, deque(maxlen=hist_len))
        out.append((click, list(hist)))
        hist.append((click.item_id, click.ts_ms))
    return out


WAIT_POLL_S = 0.5
"""How often a run waiting for another's lock, or for a handoff to be merged, looks again."""


def _wait_for_pending_handoff(state_dir: Path, lock: StateLock, should_stop: Callable[[], bool] | None) -> bool:
    """Beside a streaming trainer, wait until the handoff of an earlier run is merged and in its
    checkpoint: a run that read the checkpoint before that started from the dense weights before
    the earlier retrain, and its own handoff was then discarded (the day lost, though reported
    trained). True if the streaming trainer stopped meanwhile and this run now owns the state
    (it merges the handoff itself)."""
    waited = False
    while handoff.pending(state_dir):
        if lock.acquire(blocking=False):
            return True
        if should_stop is not None and should_stop():
            raise NightlyStopped
        if not waited:
            log.info("waiting for the streaming trainer to merge an earlier nightly's handoff")
            waited = True
        time.sleep(WAIT_POLL_S)
    return False


class NightlyStopped(Exception):
    """A stop was asked for during a retrain: nothing of it is kept."""


def retrain(
    state: TrainerState,
    examples: list,
    seed: int,
    batch_size: int,
    progress: bool,
    should_stop: Callable[[], bool] | None = None,
) -> float:
    """One shuffled epoch over towers and rows; returns the mean loss.

    Raises:
        NightlyStopped: ``should_stop`` said so between two batches.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    state.generator.manual_seed(seed)
    losses = []
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="nightly retrain", unit="batch", disable=not progress):
        if should_stop is not None and should_stop():
            raise NightlyStopped
        batch = [examples[i] for i in order[start : start + batch_size]]
        losses.append(state.learn(batch, dense=True).loss)
    return sum(losses) / max(len(losses), 1)


def dates_due(cfg: Config, newest: dt.date) -> list[dt.date]:
    """The dates up to ``newest`` (yesterday, for the scheduler) a nightly run should retrain, in
    order: every one after the newest date retrained so far, at most
    ``trainer.nightly_catch_up_days`` of them, so that a day missed while the scheduler was down,
    or whose run failed or was stopped, is retrained at the next run; only ``newest`` while none
    was retrained yet."""
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    done = ckpt.extra.get(NIGHTLY_DONE, []) if ckpt is not None else []
    if not done:
        return [newest]
    last = max(done)
    window = [newest - dt.timedelta(days=back) for back in range(cfg.trainer.nightly_catch_up_days - 1, -1, -1)]
    return [d for d in window if d.isoformat() > last]


def run_nightly(
    cfg: Config,
    date: dt.date,
    force: bool = False,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> NightlyResult:
    """Retrain on ``date`` and publish the result as the next full version (via checkpoint or
    handoff). One run at a time per state directory (:data:`NIGHTLY_LOCK`): a second one, from
    the scheduler or the command line, waits for the first and then finds its date done.
    ``should_stop`` (a daemon's shutdown) ends the retrain between two batches, keeping nothing
    of it: status ``stopped``, and the date is retrained at the next run."""
    state_dir = Path(cfg.trainer.state_dir)
    runs = StateLock(state_dir, NIGHTLY_LOCK)
    if not runs.acquire(blocking=False):
        log.info("another nightly run on %s is in progress: waiting for it", state_dir)
        while not runs.acquire(blocking=False):
            if should_stop is not None and should_stop():
                return NightlyResult(date.isoformat(), "stopped")
            time.sleep(WAIT_POLL_S)
    try:
        return _run_nightly(cfg, date, force, progress, should_stop)
    except NightlyStopped:
        log.info("nightly %s stopped before it finished: nothing kept", date.isoformat())
        return NightlyResult(date.isoformat(), "stopped")
    finally:
        runs.release()


def _run_nightly(
    cfg: Config, date: dt.date, force: bool, progress: bool, should_stop: Callable[[], bool] | None
) -> NightlyResult:
    day = date.isoformat()
    over_at_ms = day_bounds_ms(date, cfg.trainer.schedule_timezone)[1] + cfg.trainer.nightly_margin_ms
    if time.time() * 1000 < over_at_ms:
        # retrained now, the rest of the day would never be: it would be marked done
        log.warning(
            "nightly %s: the day and its read margin (trainer.nightly_margin_ms) end at %s; nothing done",
            day,
            dt.datetime.fromtimestamp(over_at_ms / 1000, dt.UTC).isoformat(),
        )
        return NightlyResult(day, "not_over")
    state_dir = Path(cfg.trainer.state_dir)
    lock = StateLock(state_dir)
    own_state = lock.acquire(blocking=False)
    try:
        if not own_state:
            own_state = _wait_for_pending_handoff(state_dir, lock, should_stop)
        topics = ensure_topics(cfg.kafka)
        ckpt = checkpoint.load(state_dir)
        state = TrainerState.from_checkpoint(ckpt, cfg.trainer) if ckpt else TrainerState(cfg.model, cfg.trainer)
        if own_state and handoff.merge_pending(state, state_dir):
            # a streaming trainer stopped before merging an earlier retrain: merge it as it would
            # have, before this one starts from the state
            state.seq += 1
            carried = {k: v for k, v in (ckpt.extra if ckpt else {}).items() if k in (APPLIED_ABOVE, NIGHTLY_COUNTED)}
            checkpoint.save(state_dir, state.to_checkpoint(ckpt.offsets if ckpt else {}, carried))
            handoff.retire(state_dir)
        if day in state.nightly_done and not force:
            log.info("nightly %s already done: skipping", day)
            return NightlyResult(day, "skipped")
        before = copy.deepcopy(state) if not own_state else None
        base = handoff.load_base(state_dir, day) if cfg.trainer.nightly_from_base else None
        if base is not None:
            log.info(
                "nightly %s starts from the rows of the %s retrain (%d rows reset)",
                day,
                base["date"],
                handoff.rebase(state, base),
            )
        load_side_topics(cfg, topics, state, should_stop)
        records = load_day_records(cfg, topics, date, should_stop)
        # Records the state has not seen: not applied by a streaming trainer before its
        # checkpoint, and not counted by an earlier run of this date (``force``).
        applied = applied_by_checkpoint(ckpt, topics.events)
        first_run = day not in state.nightly_done
        unseen = [r for p, off, r in records if first_run and not applied(p, off)]
        clicks = [r for *_, r in records if r.type == CLICK]
        for impression in unseen:  # hard negatives: what each request retrieved but did not show
            if impression.type != CLICK:
                state.observe_impression(impression)
        if not clicks:
            log.info("no clicks on %s: nothing to retrain", day)
            return NightlyResult(day, "empty")
        day_ms = day_bounds_ms(date, cfg.trainer.schedule_timezone)
        start_ms = day_ms[0]

        def day_before(back: int) -> list[Interaction]:
            if should_stop is not None and should_stop():
                raise NightlyStopped
            return load_day(cfg, topics, date - dt.timedelta(days=back))

        # what the day's clicks pushed out of the state's histories and their overflow lacks,
        # read back day by day; the state has counted the day's clicks it applied (all of them on
        # a rerun)
        counted = [r for p, off, r in records if r.type == CLICK and (not first_run or applied(p, off))]
        lost = lost_pre_day_clicks(state, day_ms, clicks, counted)
        earlier = read_back_lost_clicks(state, day_ms, lost, day_before, cfg.trainer.nightly_history_days)
        examples = build_examples(state, clicks, start_ms, earlier)  # from the histories before the day
        if own_state:
            # No streaming trainer counts these clicks: count them once here, as it would have
            # (ID counts and histories for tomorrow; before the retrain, so that its sampler and
            # logQ see the same counts as beside a streaming trainer, which counted them itself).
            count_clicks(state, [r for r in unseen if r.type == CLICK])
        seed = cfg.trainer.seed * 1_000_003 + date.toordinal()
        mean_loss = retrain(state, examples, seed, cfg.trainer.batch_size, progress, should_stop)
        log.info("nightly %s: %d examples, mean loss %.4f", day, len(examples), mean_loss)
        if cfg.trainer.nightly_from_base:
            handoff.write_base(state_dir, handoff.base_of(state, day))
        if own_state:
            state.dense_version += 1
            state.nightly_trained(day)
            state.seq += 1
            offsets = ckpt.offsets if ckpt else {}
            extra = {
                APPLIED_ABOVE: ckpt.extra.get(APPLIED_ABOVE, {}) if ckpt else {},
                # the records this run counted: a streaming trainer that later replays the topic
                # from ``offsets`` must not count them again (but counts those that arrive later)
                NIGHTLY_COUNTED: counted_ranges(ckpt, day_ms, records, topics.events, first_run),
            }
            checkpoint.save(state_dir, state.to_checkpoint(offsets, extra))
            return NightlyResult(day, "trained", len(examples), mean_loss)
        assert before is not None
        handoff.write(state_dir, day, before, state)
        return NightlyResult(day, "trained", len(examples), mean_loss, handed_over=True)
    finally:
        if own_state:
            lock.release()
