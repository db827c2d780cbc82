"""``train stream``: consume events in event-time order and update only ID-embedding rows.

Exactly-once effect on the model state: offsets are part of the checkpoint, the checkpoint
is written atomically, and offsets are committed to Kafka only after it is on disk. On
start the trainer seeks to the checkpoint's offsets (not Kafka's committed ones, which may
lag a crash), and skips the records it had already applied above them.

Between full checkpoints that are not due yet (a big state takes seconds to write, see
``trainer.full_checkpoint_max_share``) it writes *row updates* (``trainer.row_updates``): the rows
changed since its last write, for the publisher. They carry no offsets; a restart resumes from the
last full checkpoint and replays what came after it, numbering its writes above the row updates
it finds.

A nightly retrain running beside it hands over its result through a file (see
:mod:`trainer.handoff`); the streaming trainer merges it between micro-batches. Interactions of
days a nightly run counted while it owned the state (:data:`NIGHTLY_COUNTED`) are skipped, unless
they arrived after the nightly read them (:class:`CountedRange`).
"""

from __future__ import annotations

import fcntl
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram

from trainer import handoff
from trainer.ordering import EventTimeMerger, Partition
from trainer.state import TrainerState
from twotower import checkpoint
from twotower.config import Config
from twotower.daemon import Daemon
from twotower.events import CatalogItem, Interaction, Profile
from twotower.kafka_io import (
    PartitionAssigner,
    RecordDecoder,
    Topics,
    ensure_topics,
    make_consumer,
    make_producer,
    parse_partition_key,
    partition_key,
)

log = logging.getLogger(__name__)

EVENTS = Counter("twotower_trainer_events_total", "Records consumed by the streaming trainer", ["kind"])
TRAINED = Counter("twotower_trainer_examples_total", "Clicks trained on by the streaming trainer")
LATE = Gauge("twotower_trainer_late_events", "Events released after a newer one (trained anyway)")
CHECKPOINTS = Counter("twotower_trainer_checkpoints_total", "Full checkpoints written")
ROW_UPDATES = Counter("twotower_trainer_row_updates_total", "Row updates written between full checkpoints")
CHECKPOINT_SEQ = Gauge("twotower_trainer_checkpoint_seq", "Sequence number of the last checkpoint")
LAG = Gauge("twotower_trainer_consumer_lag", "Records behind the log end, summed over partitions")
ROWS = Gauge("twotower_trainer_rows", "Live rows of an ID table", ["table"])
TABLE_BYTES = Gauge("twotower_trainer_table_bytes", "Memory held by an ID table", ["table"])
LOSS = Gauge("twotower_trainer_loss", "Loss of the last streaming step")
STEP_SECONDS = Histogram("twotower_trainer_step_seconds", "Duration of one streaming step")
CHECKPOINT_SECONDS = Histogram(
    "twotower_trainer_checkpoint_seconds",
    "Duration of one full checkpoint (state copy, write, fsync, rename, offset commit)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
ROW_UPDATE_SECONDS = Histogram(
    "twotower_trainer_row_update_seconds",
    "Duration of one row update (changed rows copied, written, renamed)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
BUFFERED = Gauge("twotower_trainer_buffered", "Records held for event-time ordering")

APPLIED_ABOVE = "applied_above"
"""Checkpoint ``extra`` key: per partition, offsets at or above the checkpoint's offset that its
state already holds (:meth:`trainer.ordering.EventTimeMerger.applied_above`): a restart skips them."""
NIGHTLY_COUNTED = "nightly_counted_ms"
"""Checkpoint ``extra`` key: the :class:`CountedRange` of each day whose interactions a nightly run
that owned the state counted beyond the checkpoint's offsets (:mod:`trainer.nightly`). Replaying
the topic from those offsets, the streaming trainer skips the interactions they cover."""


@dataclass(frozen=True)
class CountedRange:
    """The interactions of one day a nightly run that owned the state counted.

    The nightly reads the events topic once, and sees every interaction of the day from the first
    to the last it found in each partition; one that arrived after its read lies beyond the last
    (or in a partition where it found none) and is the streaming trainer's to count and learn.
    """

    start_ms: int
    end_ms: int
    """The day: ``[start_ms, end_ms)`` of event time."""
    offsets: dict[Partition, tuple[int, int]] | None
    """Per partition, the first and last offset of the day's interactions the nightly read;
    ``None`` (checkpoints written before offsets were recorded): every interaction of the day."""

    def covers(self, tp: Partition, offset: int, ts_ms: int) -> bool:
        """Whether the nightly counted the interaction at ``offset`` of ``tp`` with time ``ts_ms``."""
        if not self.start_ms <= ts_ms < self.end_ms:
            return False
        if self.offsets is None:
            return True
        span = self.offsets.get(tp)
        return span is not None and span[0] <= offset <= span[1]

    def passed(self, offsets: dict[Partition, int]) -> bool:
        """Whether resuming from ``offsets`` (per partition, the next to read) reads none of the
        interactions this range covers (unknown for a range without offsets: never)."""
        if self.offsets is None:
            return False
        return all(offsets.get(tp, 0) > last for tp, (_, last) in self.offsets.items())

    def to_extra(self) -> list[Any]:
        """The checkpoint's form: ``[start_ms, end_ms, {partition key: [first, last]}]``."""
        if self.offsets is None:
            return [self.start_ms, self.end_ms]
        return [self.start_ms, self.end_ms, {partition_key(tp): list(span) for tp, span in self.offsets.items()}]

    @classmethod
    def from_extra(cls, raw: list[Any]) -> CountedRange:
        offsets = None
        if len(raw) > 2:
            offsets = {parse_partition_key(k): (int(a), int(b)) for k, (a, b) in raw[2].items()}
        return cls(int(raw[0]), int(raw[1]), offsets)


def checkpoint_wait_s(took_s: float, interval_s: float, max_share: float) -> float:
    """Time from the start of one checkpoint to the start of the next: ``interval_s``, stretched
    so that checkpoints taking ``took_s`` each use at most ``max_share`` of the trainer's time (a
    big state is then checkpointed less often instead of leaving no time to train)."""
    return max(interval_s, took_s / max_share)


class StateLock:
    """An exclusive lock on a state directory: one writer of the checkpoint at a time (``name``:
    the lock file; another name is another lock, e.g. :data:`trainer.nightly.NIGHTLY_LOCK`)."""

    def __init__(self, state_dir: Path, name: str = "trainer.lock") -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / name
        self._fh: Any = None

    def acquire(self, blocking: bool) -> bool:
        self._fh = open(self.path, "a+")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            self._fh.close()
            self._fh = None
            return False
        return True

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class StreamTrainer(Daemon):
    """The streaming trainer daemon. ``max_idle_s`` stops it after that long without records,
    once it has read every partition to its end (tests)."""

    name = "trainer-stream"

    def __init__(self, cfg: Config, max_idle_s: float | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.max_idle_s = max_idle_s
        self.state_dir = Path(cfg.trainer.state_dir)
        self.lock = StateLock(self.state_dir)
        self.merger = EventTimeMerger(cfg.trainer.out_of_order_ms)
        self.resume_offsets: dict[Partition, int] = {}
        self.state: TrainerState | None = None
        self.consumer: Any = None
        self.producer: Any = None
        self.pending: list[Interaction] = []
        self.dirty = False
        self.last_checkpoint = time.monotonic()
        self.checkpoint_wait_s = cfg.trainer.checkpoint_interval_s
        """Wait from the last checkpoint or row update to the next (see :func:`checkpoint_wait_s`)."""
        self.last_full = time.monotonic()
        self.full_wait_s = max(cfg.trainer.checkpoint_interval_s, cfg.trainer.full_checkpoint_interval_s)
        """Wait from the last full checkpoint (or the start) to the next (row updates in between)."""
        self.full_seq = 0
        self.full_dense_version = 0
        """``seq`` and ``dense_version`` of the last full checkpoint (row updates name it)."""
        self.behind_full = False
        """Row updates were written since the last full checkpoint (a full one is owed even if idle)."""
        self.last_record = time.monotonic()
        self.assigner: PartitionAssigner | None = None
        self.nightly_counted: list[CountedRange] = []
        """Days a nightly run that owned the state counted (see :func:`_route`)."""

    # --- lifecycle ---------------------------------------------------------------------
    def startup(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise RuntimeError(f"another trainer holds {self.lock.path}; one streaming trainer per state dir")
        topics = ensure_topics(self.cfg.kafka)
        ckpt = checkpoint.load(self.state_dir)
        if ckpt is None:
            self.state = TrainerState(self.cfg.model, self.tcfg)
            log.info("no checkpoint in %s: starting from scratch", self.state_dir)
        else:
            self.state = TrainerState.from_checkpoint(ckpt, self.tcfg)
            self.resume_offsets = {parse_partition_key(k): v for k, v in ckpt.offsets.items()}
            applied = ckpt.extra.get(APPLIED_ABOVE, {})
            self.merger.skip_on_replay({parse_partition_key(k): v for k, v in applied.items()})
            self.nightly_counted = [CountedRange.from_extra(r) for r in ckpt.extra.get(NIGHTLY_COUNTED, [])]
            log.info("resumed from checkpoint seq %d (%d offsets)", ckpt.seq, len(ckpt.offsets))
        # Row updates after the full checkpoint are not a resume point (Kafka replays their events):
        # number above them, so a publisher that saw them reads what follows as newer. They stay
        # until the next full checkpoint deletes them (a second restart before it numbers above
        # them again).
        self.full_seq, self.full_dense_version = self.state.seq, self.state.dense_version  # the file on disk
        left = checkpoint.row_updates(self.state_dir)
        if left and left[-1][0] > self.state.seq:
            self.state.seq = left[-1][0]
            log.info("%d row updates after the checkpoint: numbering from seq %d", len(left), self.state.seq)
        self._merge_handoff()
        self.producer = make_producer(self.cfg.kafka)
        self.decoder = RecordDecoder(self.producer, Topics(self.cfg.kafka.topic_prefix))
        self.consumer = make_consumer(self.cfg.kafka, self.tcfg.group_id)
        # The checkpoint is the authority on offsets: a partition it does not name starts from
        # the beginning, whatever the group's committed offsets say.
        self.assigner = PartitionAssigner(
            self.consumer, [topics.events, topics.catalog, topics.profiles], start=self._start_offset
        )
        self._assign(force=True)

    def _assign(self, force: bool = False) -> None:
        assert self.assigner is not None
        new = self.assigner.refresh(force=force)
        if not new:
            return
        events = Topics(self.cfg.kafka.topic_prefix).events
        self.merger.expect((tp.topic, tp.partition) for tp in new if tp.topic == events)

    def _start_offset(self, tp: TopicPartition) -> int:
        return self.resume_offsets.get((tp.topic, tp.partition), 0)

    def main_loop(self) -> None:
        assert self.assigner is not None
        while not self.shutdown_flag.is_set():
            self._assign()
            polled = self.consumer.poll(timeout_ms=100, max_records=5_000)
            now = time.monotonic()
            if polled:
                self.last_record = now
                for tp, messages in polled.items():
                    for message in messages:
                        self._route((tp.topic, tp.partition), message)
            idle = now - self.last_record
            self._train_ready(force=idle * 1000 >= self.tcfg.max_batch_wait_ms)
            self._merge_handoff()
            if now - self.last_checkpoint >= self.checkpoint_wait_s:
                self.checkpoint()
                self._report_lag()
            if self.max_idle_s is not None and idle >= self.max_idle_s and self._caught_up():
                log.info("idle for %.1f s: stopping", idle)
                break

    def shutdown(self) -> None:
        try:
            if self.state is not None and self.consumer is not None:
                self._train_ready(force=True)
                self.checkpoint(force=True)
        finally:
            if self.consumer is not None:
                self.consumer.close(autocommit=False)
            if self.producer is not None:
                self.producer.close(timeout=10)
            self.lock.release()

    def health(self) -> dict[str, Any]:
        out = super().health()
        if self.state is not None:
            out.update(seq=self.state.seq, users=len(self.state.users), items=len(self.state.items))
        return out

    # --- records -----------------------------------------------------------------------
    def _route(self, tp: Partition, message: Any) -> None:
        assert self.state is not None
        if self.merger.replayed(tp, message.offset):
            return
        record = self.decoder.decode(message)
        if record is None:
            EVENTS.labels("dead_letter").inc()
            self.merger.mark_done(tp, message.offset)
            return
        if isinstance(record, Interaction):
            if self.nightly_counted and any(r.covers(tp, message.offset, record.ts_ms) for r in self.nightly_counted):
                # replayed from before a nightly run that owned the state: it counted (and learned) it
                EVENTS.labels("counted_by_nightly").inc()
                self.merger.mark_done(tp, message.offset)
                return
            EVENTS.labels(record.type).inc()
            self.merger.push(tp, message.offset, record.ts_ms, record)
            return
        if isinstance(record, CatalogItem):
            EVENTS.labels("catalog").inc()
            self.state.apply_catalog(record)
        elif isinstance(record, Profile):
            EVENTS.labels("profile").inc()
            self.state.apply_profile(record)
        self.merger.mark_done(tp, message.offset)
        self.dirty = True

    def _train_ready(self, force: bool) -> None:
        assert self.state is not None
        for _, _, record in self.merger.pop_ready(force=force):
            self.dirty = True
            if record.type == "click":
                self.pending.append(record)
            else:  # impressions only mark shown / retrieved-not-shown items (hard negatives)
                self.state.observe_impression(record)
            if len(self.pending) >= self.tcfg.batch_size:
                self._step()
        if force and self.pending:
            self._step()
        LATE.set(self.merger.late)
        BUFFERED.set(len(self.merger))

    def _step(self) -> None:
        assert self.state is not None
        clicks, self.pending = self.pending, []
        with STEP_SECONDS.time():
            examples = self.state.observe_clicks(clicks)
            result = self.state.learn(examples, dense=False)
        TRAINED.inc(result.examples)
        LOSS.set(result.loss)

    def _merge_handoff(self) -> None:
        assert self.state is not None
        if handoff.merge_pending(self.state, self.state_dir):
            self.dirty = True
            self.checkpoint(force=True)
            handoff.retire(self.state_dir)  # only now: a crash before it merges the file again

    # --- checkpoints -------------------------------------------------------------------
    def checkpoint(self, force: bool = False, commit: bool = True) -> None:
        """Write the state with the offsets it includes, then (``commit``) commit those offsets to
        Kafka; or, when a full checkpoint is not due (``trainer.row_updates``), a row update."""
        started = self.last_checkpoint = time.monotonic()
        full_due = started - self.last_full >= self.full_wait_s
        if self.state is None or not (self.dirty or force or (self.behind_full and full_due)):
            return
        if self.pending:  # released records count as applied in the offsets below: train them first
            self._step()
        state = self.state
        full = force or full_due or not self.tcfg.row_updates or state.dense_version != self.full_dense_version
        state.expire(state.event_time_ms)
        since = state.seq
        state.seq += 1
        if full:
            self._save_full(state, commit)
        else:
            checkpoint.save_row_update(self.state_dir, state.to_row_update(since, self.full_seq))
            ROW_UPDATES.inc()
        self.dirty = False
        self.behind_full = not full
        CHECKPOINT_SEQ.set(state.seq)
        for name, table in (("users", state.users), ("items", state.items)):
            ROWS.labels(name).set(len(table))
            TABLE_BYTES.labels(name).set(table.memory_bytes())
        took_s = time.monotonic() - started
        tcfg = self.tcfg
        if full:
            CHECKPOINT_SECONDS.observe(took_s)
            self.last_full, self.full_seq, self.full_dense_version = started, state.seq, state.dense_version
            if tcfg.row_updates:  # the next write is a row update, due after the usual interval
                self.full_wait_s = max(
                    tcfg.full_checkpoint_interval_s,
                    checkpoint_wait_s(took_s, tcfg.checkpoint_interval_s, tcfg.full_checkpoint_max_share),
                )
                self.checkpoint_wait_s = tcfg.checkpoint_interval_s
            else:
                self.full_wait_s = self.checkpoint_wait_s = checkpoint_wait_s(
                    took_s, tcfg.checkpoint_interval_s, tcfg.checkpoint_max_share
                )
        else:
            ROW_UPDATE_SECONDS.observe(took_s)
            self.checkpoint_wait_s = checkpoint_wait_s(took_s, tcfg.checkpoint_interval_s, tcfg.checkpoint_max_share)
        log.debug(
            "%s seq %d in %.3f s; next in %.2f s",
            "checkpoint" if full else "row update",
            state.seq,
            took_s,
            self.checkpoint_wait_s,
        )

    def _save_full(self, state: TrainerState, commit: bool) -> None:
        safe = self.merger.safe_offsets()
        applied = self.merger.applied_above()
        resume = {**self.resume_offsets, **safe}
        offsets = {partition_key(tp): off for tp, off in resume.items()}
        # a day the checkpoint's offsets have passed in every partition is never replayed again
        self.nightly_counted = [r for r in self.nightly_counted if not r.passed(resume)]
        extra = {
            APPLIED_ABOVE: {partition_key(tp): offs for tp, offs in applied.items()},
            NIGHTLY_COUNTED: [r.to_extra() for r in self.nightly_counted],
        }
        checkpoint.save(self.state_dir, state.to_checkpoint(offsets, extra))
        CHECKPOINTS.inc()
        if commit and self.consumer is not None and safe:
            commits = {TopicPartition(t, p): OffsetAndMetadata(off, "", -1) for (t, p), off in safe.items()}
            try:
                self.consumer.commit(commits)
            except KafkaError as exc:  # the state on disk is authoritative; the next commit catches up
                log.warning("offset commit failed (state is safe on disk): %s", exc)

    def _caught_up(self) -> bool:
        """Whether every assigned partition has answered a fetch and been read to its end (a
        slow first fetch on a busy machine is not idleness)."""
        assignment = self.consumer.assignment()
        for tp in assignment:
            high = self.consumer.highwater(tp)
            if high is None or self.consumer.position(tp) < high:
                return False
        return bool(assignment)

    def _report_lag(self) -> None:
        total = 0
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                total += max(0, high - self.consumer.position(tp))
        LAG.set(total)
