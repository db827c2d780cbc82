"""The publisher daemon: trainer checkpoints → snapshot versions in Redis, plus the serving state.

Two loops run on their own threads, each with its own Redis/Kafka clients:

* **snapshot loop** — every ``publisher.poll_interval_s`` it looks at the trainer's checkpoint
  file (mtime first, then ``ckpt.seq``), then at the trainer's row updates written after it
  (:func:`twotower.checkpoint.save_row_update`: the rows changed since the trainer's previous
  write, between full checkpoints of a big state), each of which becomes a DELTA. A new
  checkpoint is published as a FULL version when there is no current version, when the dense
  weights changed (``dense_version``) or when the trainer's ``seq`` went backwards; otherwise
  as a DELTA of the rows changed since the trainer ``seq`` of the last published version
  (nothing is written when nothing changed). After ``publisher.full_every`` deltas (and once
  the last full version took at most ``publisher.full_build_max_share`` of the time since) a
  full version of the same weights is **built aside** to compact the chain: deltas go on, and
  when it is built it is written with a copy of every delta published meanwhile, and the
  pointer moves to the copy of the last one (the same state, on a short chain). After a
  full version, versions older than the ``publisher.keep_versions``-th newest full are trimmed.
* **serving-state loop** — :class:`~publisher.serving_state.ServingStateWriter` turns clicks,
  catalogue items and profiles into Redis history/item/profile keys. A catalogue item that
  the served snapshot lacks (and the trainer has no ID row for) gets a **content-only
  vector** with the served dense weights and is published at once as a DELTA — one delta per
  poll batch — so that new items are retrievable within about a second of their event.

Both loops append deltas to the same chain; one lock serialises every write so each delta
names the right parent. Full snapshots are built outside the lock (index builds can take a
while) and only written under it.

Catalogue items without an ID row live only in this process's memory (and in the compacted
catalogue topic): they are re-embedded into every full snapshot until the trainer admits
them. At startup the daemon replays the catalogue topic from the beginning to rebuild that
memory, and recovers the last published (version, trainer seq, deltas since full, served
item ids, and the items withheld as expired) from the current version in Redis (after a
rollback, an item stays withheld only if the version current before it withholds it too);
whether the dense weights still match is decided by comparing checksums of the weights part
with the next checkpoint's weights. Row updates already published are read again only for
which items they gave rows and which they expired, and no content-only vector goes out before
that first pass.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import redis
from kafka import TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from publisher.build import (
    category_indices,
    content_only_vectors,
    delta_snapshot,
    full_snapshot,
    is_empty,
    model_from_checkpoint,
)
from publisher.serving_state import BatchResult, ServingStateWriter
from twotower import checkpoint
from twotower.blobs import BlobError, Rows, checksum, unpack_rows, unpack_strings
from twotower.checkpoint import Checkpoint
from twotower.config import Config
from twotower.daemon import Daemon
from twotower.events import CatalogItem, SchemaError
from twotower.kafka_io import Topics, decode_message, ensure_topics, make_consumer
from twotower.model import TwoTower, dense_arrays
from twotower.snapshot_parts import (
    ITEMS,
    MODEL_CONFIG,
    WEIGHTS,
    WITHHELD_ITEMS,
    DeltaSnapshot,
    FullSnapshot,
    decode_delta,
    encode_delta,
    encode_full,
)
from twotower.snapshots import (
    DELTA,
    FULL,
    MissingVersionError,
    SnapshotError,
    SnapshotLayout,
    SnapshotStore,
    VersionMeta,
)

log = logging.getLogger(__name__)

SKIP = "skip"

VERSIONS = Counter("twotower_publisher_versions", "Snapshot versions published", ["kind"])
LAST_VERSION = Gauge("twotower_publisher_last_version", "Last snapshot version this publisher wrote")
PUBLISH_SECONDS = Histogram(
    "twotower_publisher_publish_seconds",
    "Time to build and write a snapshot version",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
NEW_ITEMS = Counter("twotower_publisher_new_items", "Catalogue items first served with a content-only vector")
LOOP_ERRORS = Counter("twotower_publisher_loop_errors", "Failed loop iterations (retried)", ["loop"])

_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
_STALE_MIN_S = 60.0
"""A loop without a successful iteration for this long (or 10 poll intervals) makes health "stalled"."""


@dataclass(frozen=True)
class Published:
    """What the publisher last wrote (or found current in Redis at startup)."""

    version: int
    trainer_seq: int
    dense_version: int | None
    """``None`` when recovered from Redis (the meta does not record it)."""
    deltas_since_full: int
    weights_sha: str = ""
    """sha256 of the base full version's ``weights`` part (to match weights after a restart)."""
    config_sha: str = ""
    """sha256 of the base full version's ``model_config`` part."""


@dataclass
class _Compaction:
    """A full version of checkpoint ``seq`` built aside (same weights as served) while deltas
    keep being published; ``after`` lists the versions written on the served chain since that
    checkpoint's own delta, carried over onto the new full version when it is written."""

    seq: int
    dense_version: int
    started: float
    after: list[int] = field(default_factory=list)
    parts: dict[str, bytes] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def plan_publish(
    last: Published | None, ckpt_seq: int, dense_version: int, dense_matches: bool | None, full_every: int
) -> str:
    """What to publish for a new checkpoint: ``full``, ``delta`` or ``skip``.

    Args:
        last: the last published version, or ``None`` if there is none.
        ckpt_seq: the checkpoint's ``seq``.
        dense_version: the checkpoint's ``dense_version``.
        dense_matches: for a ``last`` recovered from Redis (``dense_version is None``): whether
            the checkpoint's weights are the ones served; ignored otherwise.
        full_every: deltas after which a full version is due.
    """
    if last is None:
        return FULL
    same_dense = bool(dense_matches) if last.dense_version is None else last.dense_version == dense_version
    if ckpt_seq < last.trainer_seq:
        # The trainer's state went back (restored): rebuild. Except for a publisher that restarted
        # after publishing row updates newer than the trainer's last full checkpoint: it finds that
        # checkpoint behind what it serves, with the same weights, and has nothing to publish.
        return SKIP if last.dense_version is None and same_dense else FULL
    if not same_dense:
        return FULL
    if ckpt_seq == last.trainer_seq:
        return SKIP
    if last.deltas_since_full >= full_every:
        return FULL
    return DELTA


def compaction_allowed(last_full_s: float, since_s: float, max_share: float) -> bool:
    """Whether a full version that only compacts the delta chain may be published now: the last
    full version took ``last_full_s`` seconds to publish, ``since_s`` ago, and full versions may
    take at most ``max_share`` of the publisher's time (0: always)."""
    return max_share <= 0 or last_full_s <= max_share * since_s


def weight_checksums(model: TwoTower) -> tuple[str, str]:
    """sha256 of the ``weights`` and ``model_config`` parts a full snapshot of ``model`` would have."""
    cfg = model.cfg
    parts = encode_full(FullSnapshot(cfg, dense_arrays(model), Rows.empty(cfg.id_dim), Rows.empty(cfg.dim), b""))
    return checksum(parts[WEIGHTS]), checksum(parts[MODEL_CONFIG])


class Served(NamedTuple):
    """What a version serves, as a restarted publisher needs it."""

    items: set[str]
    """Item ids served (the chain applied)."""
    withheld: set[str]
    """Items left out because the trainer expired them: the full version's ``withheld_items``
    and the deltas' removals, less the items a later delta served again."""
    chain: list[VersionMeta]


def served_items(store: SnapshotStore, version: int) -> Served:
    """What ``version`` serves (its chain applied), and the chain's metas.

    Raises:
        SnapshotError: a version of the chain is missing or corrupt.
        BlobError: a part does not decode.
    """
    chain = store.chain(version)
    items: set[str] = set()
    withheld: set[str] = set()
    for meta in chain:
        if meta.kind == FULL:
            items = set(unpack_rows(store.read_part(meta, ITEMS)).ids)
            withheld = set()  # full versions written before the part existed have none
            if WITHHELD_ITEMS in meta.parts:
                withheld = set(unpack_strings(store.read_part(meta, WITHHELD_ITEMS)))
        else:
            delta = decode_delta(store.read_parts(meta))
            items |= set(delta.items.ids)
            items -= set(delta.removed_items)
            withheld = (withheld | set(delta.removed_items)) - set(delta.items.ids)
    return Served(items, withheld, chain)


class PublisherDaemon(Daemon):
    """Publishes trainer checkpoints and maintains the serving state (see the module docstring)."""

    name = "publisher"

    def __init__(
        self,
        cfg: Config,
        *,
        index_kind: str | None = None,
        index_options: dict[str, Any] | None = None,
        catalog_replay_timeout_s: float = 60.0,
    ) -> None:
        """Set the daemon up (no I/O before :meth:`startup`).

        Args:
            cfg: the configuration.
            index_kind: Faiss index kind of full snapshots (see :func:`publisher.index.build_index`);
                default ``publisher.index_kind``.
            index_options: further ``build_index`` keyword arguments; ``exact_below``,
                ``ivfpq_above`` and ``hnsw_storage`` default to ``publisher.exact_below`` /
                ``publisher.ivfpq_above`` / ``publisher.hnsw_storage``.
            catalog_replay_timeout_s: longest the startup replay of the catalogue topic may take.
        """
        super().__init__()
        self.cfg = cfg
        self.layout = SnapshotLayout(cfg.redis.key_prefix)
        self.topics = Topics(cfg.kafka.topic_prefix)
        self.state_dir = Path(cfg.trainer.state_dir)
        self.index_kind = index_kind or cfg.publisher.index_kind
        self.index_options = {
            "exact_below": cfg.publisher.exact_below,
            "ivfpq_above": cfg.publisher.ivfpq_above,
            "hnsw_storage": cfg.publisher.hnsw_storage,
            **(index_options or {}),
        }
        self.catalog_replay_timeout_s = catalog_replay_timeout_s
        # --- guarded by _lock: everything about what is served and the chain's tip --------
        self._lock = threading.Lock()
        self._last: Published | None = None
        self._served: set[str] = set()
        self._catalog: dict[str, CatalogItem] = {}
        self._pending: set[str] = set()
        """Catalogue items that need a content-only vector published (new or changed)."""
        self._removed: set[str] = set()
        """Items the trainer expired and no catalogue event revived since."""
        self._caught_up = False
        """The snapshot loop has read the checkpoint and row updates once (:meth:`poll_checkpoint`)."""
        self._revived: set[str] = set()
        """Items listed again after an expiry, until their vector is published (or they leave
        ``_pending`` otherwise): see :meth:`listings_safe`."""
        self._model: TwoTower | None = None
        self._vocab: dict[str, int] = {}
        self._owned: set[str] = set()
        """Item ids the trainer has ID rows for, as of the last processed checkpoint or row update."""
        self._last_full_cost: tuple[float, float] | None = None
        """(seconds it took, ``time.monotonic()`` when written) of this process's last full version."""
        self._compaction: _Compaction | None = None
        """The full version being built aside to compact the chain, if any."""
        self._ckpt_seq: int | None = None
        self._removals_through = -1
        """Trainer ``seq`` up to which the trainer's removals are in ``_removed`` (a checkpoint
        lists its newest removals with their ``seq``; older ones are not taken again, so an
        item listed again since stays listed)."""
        # --- snapshot loop only ------------------------------------------------------------
        self._ckpt_mtime: float | None = None
        self._full_seq: int | None = None
        """``seq`` of the last full checkpoint read: the row updates that follow it name it."""
        # --- lifecycle ------------------------------------------------------------------------
        self._threads: list[threading.Thread] = []
        self._ticks: dict[str, float] = {}
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def _redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.cfg.redis.url)

    def startup(self) -> None:
        """Check Redis and Kafka, recover the published state and replay the catalogue."""
        client = self._redis()
        try:
            client.ping()
            self.recover(SnapshotStore(client, self.layout))
        finally:
            client.close()
        ensure_topics(self.cfg.kafka)
        self.replay_catalog()
        with self._lock:
            self._pending = {i for i in self._catalog if i not in self._served and i not in self._removed}
        log.info(
            "publisher state: version %s, %d served items, %d catalogue items, %d pending",
            self._last.version if self._last else None,
            len(self._served),
            len(self._catalog),
            len(self._pending),
        )

    def main_loop(self) -> None:
        """Run both loops until shutdown; a loop that dies stops the daemon with an error."""
        self._threads = [
            threading.Thread(target=self._run, args=("snapshot", self._snapshot_loop), name="snapshot", daemon=True),
            threading.Thread(target=self._run, args=("serving", self._serving_loop), name="serving", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        while not self.shutdown_flag.wait(0.5):
            if self._failure is not None or not all(t.is_alive() for t in self._threads):
                self.shutdown_flag.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._failure is not None:
            raise RuntimeError("a publisher loop failed") from self._failure

    def shutdown(self) -> None:
        self.shutdown_flag.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)

    def health(self) -> dict[str, Any]:
        now = time.time()
        running = len(self._threads) == 2 and all(t.is_alive() for t in self._threads)
        ticked = {"snapshot", "serving"} <= set(self._ticks)
        stale_after = max(_STALE_MIN_S, 10 * self.cfg.publisher.poll_interval_s)
        if self._failure is not None:
            status = "failed"
        elif running and ticked:
            # a loop whose iterations keep failing stops ticking: report it instead of "ok"
            status = "ok" if all(now - t < stale_after for t in self._ticks.values()) else "stalled"
        else:
            status = "starting"
        last = self._last
        return {
            "status": status,
            "daemon": self.name,
            "uptime_s": round(now - self.started_at, 1),
            "version": last.version if last else None,
            "trainer_seq": last.trainer_seq if last else None,
            "deltas_since_full": last.deltas_since_full if last else None,
            "served_items": len(self._served),
            "pending_items": len(self._pending),
            "loop_idle_s": {name: round(now - t, 1) for name, t in self._ticks.items()},
        }

    def _run(self, name: str, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:
            log.exception("%s loop died", name)
            self._failure = exc
            self.shutdown_flag.set()

    def _retrying(self, name: str, step: Callable[[], None], interval_s: float) -> None:
        """Call ``step`` until shutdown, ``interval_s`` apart; failures are logged and retried with backoff."""
        backoff = _BACKOFF_MIN_S
        while not self.shutdown_flag.is_set():
            try:
                step()
            except Exception:
                LOOP_ERRORS.labels(name).inc()
                log.exception("%s loop iteration failed; retrying in %.1fs", name, backoff)
                if self.shutdown_flag.wait(backoff):
                    return
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            backoff = _BACKOFF_MIN_S
            self._ticks[name] = time.time()
            if interval_s > 0 and self.shutdown_flag.wait(interval_s):
                return

    # ------------------------------------------------------------------ recovery
    def recover(self, store: SnapshotStore) -> None:
        """Adopt the current version in Redis as the last published one (if readable)."""
        current = store.current_version()
        if current is None:
            return
        try:
            served = served_items(store, current)
            chain = served.chain
            base = chain[0]
            last = Published(
                version=current,
                trainer_seq=chain[-1].trainer_seq,
                dense_version=None,
                deltas_since_full=len(chain) - 1,
                weights_sha=base.parts[WEIGHTS][0] if WEIGHTS in base.parts else "",
                config_sha=base.parts[MODEL_CONFIG][0] if MODEL_CONFIG in base.parts else "",
            )
        except (SnapshotError, BlobError) as exc:
            log.warning("current version %d is unreadable (%s); the next publish will be a full version", current, exc)
            return
        at_tip = self._withheld_at_tip(store, current)
        withheld = served.withheld if at_tip is None else served.withheld & at_tip
        with self._lock:
            self._last = last
            self._served = served.items
            self._removed = withheld
            if WITHHELD_ITEMS in base.parts:  # the chain holds every removal up to its tip
                self._removals_through = last.trainer_seq
        LAST_VERSION.set(current)
        log.info(
            "recovered version %d (trainer seq %d, %d deltas since full %d, %d items, %d withheld as expired)",
            current,
            last.trainer_seq,
            last.deltas_since_full,
            base.version,
            len(served.items),
            len(withheld),
        )

    @staticmethod
    def _withheld_at_tip(store: SnapshotStore, current: int) -> set[str] | None:
        """The items withheld at the newest version a writer made current
        (:meth:`~twotower.snapshots.SnapshotStore.tip_version`) when a rollback moved the
        pointer back from it; else ``None``.

        The version rolled back to withholds what was withheld when it was written, items
        listed again since among them: those listings were read (and their offsets committed)
        before the restart, so nothing would list them again until their next catalogue event.
        The tip serves them again, so an item stays withheld only if the tip withholds it too.
        Nothing withheld only at the tip is added: the trainer's removals after the ``seq`` of
        the version rolled back to are taken from its checkpoint again (as they must be after
        a trainer restored to an older state, whose new removals reuse those ``seq``).
        """
        tip = store.tip_version()
        if tip is None or tip <= current:  # no rollback, or one to a version never current
            return None
        try:
            at_tip = served_items(store, tip)
        except (SnapshotError, BlobError) as exc:
            log.warning("version %d, current before a rollback, is unreadable (%s): withheld as rolled back", tip, exc)
            return None
        if WITHHELD_ITEMS not in at_tip.chain[0].parts:  # its full version predates the list
            return None
        log.info("version %d was current before a rollback; it withholds %d items", tip, len(at_tip.withheld))
        return at_tip.withheld

    def replay_catalog(self) -> int:
        """Read the compacted catalogue topic from its start into memory (no writes).

        Returns:
            The number of catalogue records read.
        """
        consumer = make_consumer(self.cfg.kafka, None, client_id="twotower-publisher-replay")
        count = 0
        try:
            partitions = consumer.partitions_for_topic(self.topics.catalog) or set()
            tps = [TopicPartition(self.topics.catalog, p) for p in sorted(partitions)]
            if not tps:
                return 0
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            ends = consumer.end_offsets(tps)
            deadline = time.monotonic() + self.catalog_replay_timeout_s
            while any(consumer.position(tp) < ends[tp] for tp in tps):
                if self.shutdown_flag.is_set() or time.monotonic() > deadline:
                    log.warning("catalogue replay stopped early after %d records", count)
                    break
                for messages in consumer.poll(timeout_ms=500).values():
                    for message in messages:
                        try:
                            record = decode_message(message, self.topics)
                        except SchemaError:
                            continue  # the serving-state loop dead-letters it
                        if isinstance(record, CatalogItem):
                            count += 1
                            with self._lock:
                                self._catalog[record.item_id] = record
        finally:
            consumer.close(autocommit=False)
        log.info("replayed %d catalogue records (%d items)", count, len(self._catalog))
        return count

    # ------------------------------------------------------------------ snapshot loop
    def _snapshot_loop(self) -> None:
        client = self._redis()
        store = SnapshotStore(client, self.layout)
        try:
            self._retrying("snapshot", lambda: self.poll_checkpoint(store), self.cfg.publisher.poll_interval_s)
        finally:
            client.close()

    def poll_checkpoint(self, store: SnapshotStore) -> int | None:
        """Publish the trainer's checkpoint if it changed since the last look, then the row
        updates written after it (oldest first) that are new.

        Content-only vectors wait for the first such pass to end: until then, after a restart,
        which items the trainer owns is known only up to its last full checkpoint.

        Returns:
            The last version written, or ``None``.
        """
        version = self._poll_checkpoint(store)
        with self._lock:
            self._caught_up = True
        return version

    def _poll_checkpoint(self, store: SnapshotStore) -> int | None:
        version = self.finish_compaction(store)
        mtime = checkpoint.stat_seq(self.state_dir)
        if mtime is not None and mtime != self._ckpt_mtime:
            ckpt = checkpoint.load(self.state_dir)
            if ckpt is not None:
                if ckpt.seq != self._ckpt_seq:
                    version = self.publish_checkpoint(store, ckpt)
                self._full_seq = ckpt.seq
            self._ckpt_mtime = mtime
        if self._full_seq is None:
            return version
        for seq, path in checkpoint.row_updates(self.state_dir):
            with self._lock:
                read = self._ckpt_seq or 0
                published = self._last.trainer_seq if self._last is not None else 0
            if seq <= read:
                continue
            update = checkpoint.load_row_update(path)
            if update is None or update.base_seq != self._full_seq:
                break  # a newer full checkpoint superseded it: the next poll reads that one
            if seq <= published:
                # published before a restart: nothing to send, but which items it gave rows
                # (the trainer's now, not content-only) and which it expired still counts
                with self._lock:
                    self._adopt_items(update)
                continue
            version = self.publish_checkpoint(store, update) or version
        return version

    def publish_checkpoint(self, store: SnapshotStore, ckpt: Checkpoint) -> int | None:
        """Publish ``ckpt`` as a full or delta version (or nothing if nothing changed).

        A row update (``ckpt.base_seq`` set) only ever becomes a delta: when a full version is
        due for another reason than ``publisher.full_every`` (none yet, new dense weights, the
        trainer's ``seq`` went back) it is skipped and the next full checkpoint publishes it.

        Returns:
            The last version written, or ``None``.
        """
        started = time.perf_counter()
        model = model_from_checkpoint(ckpt)
        partial = ckpt.base_seq is not None
        with self._lock:
            last = self._last
            matches = None
            if last is not None and last.dense_version is None:
                matches = weight_checksums(model) == (last.weights_sha, last.config_sha)
            compact = not partial and self._compaction_allowed()
            full_every = self.cfg.publisher.full_every if compact else sys.maxsize
            kind = plan_publish(last, ckpt.seq, ckpt.dense_version, matches, full_every)
            if partial and kind == FULL:
                log.info("row update %d needs a full version: waiting for the next full checkpoint", ckpt.seq)
                return None
            # A full version due only to compact the chain (same weights) is built aside while
            # this checkpoint and the ones after it go on as deltas: its index build would stop
            # the parameter path for minutes at 1M items.
            aside = kind == FULL and plan_publish(last, ckpt.seq, ckpt.dense_version, matches, sys.maxsize) == DELTA
            if aside:
                kind = DELTA
            extras: list[CatalogItem] = []
            withheld: list[str] = []
            if kind == FULL:  # content-only items, re-embedded
                extras, withheld = self._catalog_split(self._after(ckpt)[1])
        if kind == FULL:
            return self._publish_full(store, ckpt, model, extras, withheld, started)
        with self._lock:
            if self._last is None:  # plan_publish returns FULL without a last version; nothing else clears it
                raise RuntimeError("no published version to append a delta to")
            if self._last.dense_version is None:  # recovered, and the weights matched: remember it
                self._last = replace(self._last, dense_version=ckpt.dense_version)
            after = self._after(ckpt)
            owned, removed = after
            version = None
            if kind == DELTA:
                pending = [self._catalog[i] for i in self._pending if i in self._catalog and i not in removed]
                delta = delta_snapshot(ckpt, self._last.trainer_seq, extra_items=pending, model=model, owned=owned)
                if is_empty(delta):
                    self._last = replace(self._last, trainer_seq=ckpt.seq)
                    log.debug("checkpoint %d changes nothing", ckpt.seq)
                else:
                    version = self._write_delta_locked(store, delta, ckpt.seq, started)
                    self._pending.difference_update(delta.items.ids)
            # only once written: a write that fails leaves the checkpoint to the next poll (adopted
            # first, it counted as published and its rows were never sent)
            self._adopt(ckpt, model, after)
            if aside and self._compaction is None:
                # the content-only items as of now (the serving loop may have published some
                # since the section above): the deltas after this point are carried over
                self._compaction = self._start_compaction(ckpt, model, *self._catalog_split(self._removed))
            flushed = self._flush_pending_locked(store)
        return flushed or version

    def _start_compaction(
        self, ckpt: Checkpoint, model: TwoTower, extras: list[CatalogItem], withheld: list[str]
    ) -> _Compaction:
        """Build the full version of ``ckpt`` on a thread of its own (caller holds the lock, and has
        just published ``ckpt`` as a delta: the served chain is at ``ckpt`` now)."""
        job = _Compaction(ckpt.seq, ckpt.dense_version, time.perf_counter())

        def build() -> None:
            try:
                job.parts = encode_full(self._build_full(ckpt, model, extras, withheld))
            except Exception as exc:  # reported (and dropped) by _finish_compaction
                job.error = exc
            finally:
                job.done.set()

        threading.Thread(target=build, name="publisher-compaction", daemon=True).start()
        log.info("building a full version of checkpoint %d aside to compact the chain", ckpt.seq)
        return job

    def finish_compaction(self, store: SnapshotStore) -> int | None:
        """Publish the full version built aside, once it is built: write it, then a copy of every
        version published on the served chain since its checkpoint, and only then move the
        pointer, so retrievers go from the old chain's tip to the same state on the new chain.

        Returns:
            The new tip's version, or ``None`` (nothing built yet, the build failed, or new
            weights were published meanwhile and made it useless).
        """
        with self._lock:
            job = self._compaction
            if job is None or not job.done.is_set():
                return None
            self._compaction = None
            last = self._last
            if job.error is not None or job.parts is None:
                log.error("the full version of checkpoint %d built aside failed: %r", job.seq, job.error)
                return None
            if last is None or last.dense_version != job.dense_version:
                return None  # superseded by a full version with new weights
            version = store.write(FULL, job.parts, None, job.seq, current=False)
            full = version
            for old in job.after:
                meta = store.meta(old)
                version = store.write(DELTA, store.read_parts(meta), version, meta.trainer_seq, current=False)
            store.make_current(version)
            self._last = replace(last, version=version, deltas_since_full=len(job.after))
            self._record(FULL, version, job.started)  # the gauge shows the new tip
            took_s = time.perf_counter() - job.started
            self._last_full_cost = (took_s, time.monotonic())
            log.info(
                "published full version %d of checkpoint %d (built aside in %.1f s) and %d deltas carried over onto it",
                full,
                job.seq,
                took_s,
                len(job.after),
                extra={"version": full, "kind": FULL, "trainer_seq": job.seq},
            )
        self._trim(store)
        return version

    def _trim(self, store: SnapshotStore) -> None:
        """Delete the versions older than the ``publisher.keep_versions``-th newest full one."""
        trimmed = store.trim(self.cfg.publisher.keep_versions)
        if trimmed:
            log.info("trimmed %d old versions (%d..%d)", len(trimmed), min(trimmed), max(trimmed))

    def _compaction_allowed(self) -> bool:
        """``publisher.full_build_max_share`` against this process's last full version (a
        publisher that has published none yet may compact)."""
        if self._last_full_cost is None:
            return True
        took_s, at = self._last_full_cost
        return compaction_allowed(took_s, time.monotonic() - at, self.cfg.publisher.full_build_max_share)

    def _after(self, ckpt: Checkpoint) -> tuple[set[str], set[str]]:
        """The owned and removed item ids once ``ckpt`` is applied (not stored; caller holds the
        lock). Owned: a checkpoint's items, or for a row update those owned before, minus its
        removals, plus its items."""
        since = self._removals_through
        gone = {item for seq, item in ckpt.removed_items if seq > since}
        owned = set(ckpt.items.ids) if ckpt.base_seq is None else (self._owned - gone) | set(ckpt.items.ids)
        return owned, (self._removed | gone) - owned

    def _catalog_split(self, removed: set[str]) -> tuple[list[CatalogItem], list[str]]:
        """The catalogue items a full version serves (content-only where the trainer has no row)
        and those it withholds as expired, given the ``removed`` ids (caller holds the lock)."""
        extras = [it for i, it in self._catalog.items() if i not in removed]
        return extras, sorted(i for i in self._catalog if i in removed)

    def _adopt(self, ckpt: Checkpoint, model: TwoTower, after: tuple[set[str], set[str]] | None = None) -> None:
        """Make ``ckpt``'s model, vocabulary, rows and removals the current ones (caller holds the
        lock; ``after``: :meth:`_after` of ``ckpt``, when the caller has it already)."""
        self._adopt_items(ckpt, after)
        self._model = model
        self._vocab = category_indices(ckpt.categories, model.cfg.n_categories)

    def _adopt_items(self, ckpt: Checkpoint, after: tuple[set[str], set[str]] | None = None) -> None:
        """Make ``ckpt``'s owned and removed items the current ones, and ``ckpt`` the last read."""
        self._owned, self._removed = after if after is not None else self._after(ckpt)
        self._pending -= self._removed
        self._ckpt_seq = ckpt.seq
        self._removals_through = max(self._removals_through, ckpt.seq)

    def _build_full(
        self, ckpt: Checkpoint, model: TwoTower, extras: list[CatalogItem], withheld: list[str]
    ) -> FullSnapshot:
        """The full version of ``ckpt`` serving ``extras`` besides its rows (no lock needed)."""
        return full_snapshot(
            ckpt,
            extra_items=extras,
            withheld_items=withheld,
            model=model,
            index_kind=self.index_kind,
            index_options=self.index_options,
        )

    def _publish_full(
        self,
        store: SnapshotStore,
        ckpt: Checkpoint,
        model: TwoTower,
        extras: list[CatalogItem],
        withheld: list[str],
        started: float,
    ) -> int:
        snap = self._build_full(ckpt, model, extras, withheld)
        parts = encode_full(snap)
        with self._lock:
            self._compaction = None  # a full version built aside for the old weights is of no use now
            version = store.write(FULL, parts, None, ckpt.seq)
            weights_sha, config_sha = checksum(parts[WEIGHTS]), checksum(parts[MODEL_CONFIG])
            self._last = Published(version, ckpt.seq, ckpt.dense_version, 0, weights_sha, config_sha)
            self._served = set(snap.items.ids)
            self._adopt(ckpt, model)
            # Items served meanwhile through content-only deltas on the old chain (or that
            # arrived during the build) are not in this full version: publish them again; and so
            # are content-only items whose catalogue entry changed during the build (built from
            # the entry before).
            changed = {it.item_id for it in extras if self._catalog.get(it.item_id, it) is not it}
            self._pending = {i for i in self._catalog if i not in self._served} | (changed - self._owned)
            self._record(FULL, version, started)
            self._last_full_cost = (time.perf_counter() - started, time.monotonic())
            log.info(
                "published full version %d: trainer seq %d, dense version %d, %d users, %d items (%d content-only), "
                "%.1f MB",
                version,
                ckpt.seq,
                ckpt.dense_version,
                len(snap.users.ids),
                len(snap.items.ids),
                len(snap.items.ids) - len(ckpt.items.ids),
                sum(len(p) for p in parts.values()) / 1e6,
                extra={"version": version, "kind": FULL, "trainer_seq": ckpt.seq},
            )
            flushed = self._flush_pending_locked(store)
        self._trim(store)
        return flushed or version

    def _write_delta_locked(self, store: SnapshotStore, delta: DeltaSnapshot, trainer_seq: int, started: float) -> int:
        last = self._last
        if last is None:
            raise RuntimeError("a delta needs a published parent version")
        try:
            version = store.write(DELTA, encode_delta(delta), last.version, trainer_seq)
        except MissingVersionError as exc:
            if exc.version != last.version:
                raise
            # Redis lost its data (a restart without it, a restore from an older save): no
            # delta can go on the chain. As with no version at all, the next one is full.
            self._last = None
            self._compaction = None
            self._ckpt_seq = self._ckpt_mtime = None  # read the checkpoint again, whoever failed here
            log.error("the last published version %d is gone from Redis; the next version will be full", last.version)
            raise
        if self._compaction is not None:
            self._compaction.after.append(version)
        self._last = replace(
            last, version=version, trainer_seq=trainer_seq, deltas_since_full=last.deltas_since_full + 1
        )
        self._served |= set(delta.items.ids)
        self._served -= set(delta.removed_items)
        self._record(DELTA, version, started)
        log.info(
            "published delta version %d (parent %d): trainer seq %d, %d users, %d items, %d removed",
            version,
            last.version,
            trainer_seq,
            len(delta.users.ids),
            len(delta.items.ids),
            len(delta.removed_items),
            extra={"version": version, "kind": DELTA, "trainer_seq": trainer_seq},
        )
        return version

    @staticmethod
    def _record(kind: str, version: int, started: float) -> None:
        VERSIONS.labels(kind).inc()
        LAST_VERSION.set(version)
        PUBLISH_SECONDS.labels(kind).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ new items
    def note_catalog(self, items: Iterable[CatalogItem]) -> int:
        """Remember catalogue items; mark those needing a content-only vector as pending.

        An item needs one when the trainer has no ID row for it and it is not served yet, or
        its category or features changed.

        Returns:
            How many items became pending.
        """
        marked = 0
        with self._lock:
            for item in items:
                previous = self._catalog.get(item.item_id)
                self._catalog[item.item_id] = item
                if item.item_id in self._removed:  # listed again after an expiry
                    self._removed.discard(item.item_id)
                    self._revived.add(item.item_id)
                if item.item_id in self._owned:
                    continue  # the trainer's row (and its content) decide this item's vector
                unchanged = previous is not None and (previous.category, previous.features) == (
                    item.category,
                    item.features,
                )
                if item.item_id in self._served and unchanged:
                    continue
                self._pending.add(item.item_id)
                marked += 1
        return marked

    def listings_safe(self) -> bool:
        """Whether the serving state's offsets may be committed: no expired item listed again
        waits for its vector. A restart withholds such an item again (the served version says
        it expired) unless the listing is read again, so its commit waits for the vector;
        every other listing a restart finds unserved in the replayed catalogue."""
        with self._lock:
            self._revived &= self._pending
            return not self._revived

    def flush_pending(self, store: SnapshotStore) -> int | None:
        """Publish pending content-only vectors as one delta (if a model and a version exist)."""
        with self._lock:
            return self._flush_pending_locked(store)

    def _flush_pending_locked(self, store: SnapshotStore) -> int | None:
        if not self._pending or self._model is None or self._last is None or not self._caught_up:
            return None
        started = time.perf_counter()
        ids = [i for i in self._pending if i in self._catalog and i not in self._owned and i not in self._removed]
        if not ids:
            self._pending.clear()
            return None
        rows = content_only_vectors(self._model, self._vocab, [self._catalog[i] for i in ids])
        new = sum(1 for i in ids if i not in self._served)
        delta = DeltaSnapshot(users=Rows.empty(self._model.cfg.id_dim), items=rows, removed_items=[])
        version = self._write_delta_locked(store, delta, self._last.trainer_seq, started)
        self._pending.clear()
        NEW_ITEMS.inc(new)
        return version

    # ------------------------------------------------------------------ serving-state loop
    def _serving_loop(self) -> None:
        client = self._redis()
        store = SnapshotStore(client, self.layout)
        holder: list[ServingStateWriter] = []

        def publish_listed(result: BatchResult) -> bool:
            if result.catalog:
                self.note_catalog(result.catalog)
            if self._pending:
                self.flush_pending(store)
            return self.listings_safe()

        def step() -> None:
            if not holder:
                holder.append(ServingStateWriter(self.cfg))
            holder[0].poll_once(timeout_ms=200, before_commit=publish_listed)
            if self._pending:  # items listed before a model or a version existed
                self.flush_pending(store)

        try:
            self._retrying("serving", step, 0)
        finally:
            try:
                if holder:
                    holder[0].close()
            finally:
                client.close()


__all__ = ["SKIP", "Published", "PublisherDaemon", "plan_publish", "served_items", "weight_checksums"]
