"""The serving-state writer: Kafka events, catalogue and profiles → the Redis keys retrievers read.

Per poll batch, in one MULTI/EXEC:

* a **click** → msgpack ``[item_id, ts_ms]`` into ``layout.history(user)`` in its place by event
  time, newest first, and the list trimmed to ``history_max_len`` (:data:`PUSH_CLICK`: a late
  click goes after the newer ones, and one older than every entry of a full history is left
  out, as the trainer does; pushed and trimmed by arrival instead, a burst of old clicks pushed
  the newest out); impressions are no history;
* a :class:`~twotower.events.CatalogItem` → ``HSET layout.item(item)`` with ``category``,
  ``title`` and ``ts_ms``;
* a :class:`~twotower.events.Profile` → ``SET layout.profile(user)`` to a msgpack list of floats.

Malformed messages go to the dead-letter topic (:class:`~twotower.kafka_io.RecordDecoder`)
and never stop the loop. Offsets are committed only after the Redis transaction succeeded;
if decoding or writing fails, the consumer is rewound to the start of the batch so that the
next poll retries it. Each transaction also records, per partition, the next offset Redis
holds (``layout.serving_offsets``, watched, so that the client never re-sends a transaction
whose reply it lost), and a batch read again (after a crash between the Redis write and the
commit, or a write whose reply was lost) pushes only the clicks above it: every click is in a
history once. Item and profile writes are idempotent and are applied again.

The catalogue items of each batch are handed back to the caller, which decides whether an
item needs a content-only vector (see :class:`publisher.daemon.PublisherDaemon`); through
``before_commit`` it can hold the offsets' commit until that vector is published, so that a
crash in between replays the listing rather than losing it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgpack
import redis
from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import Counter

from twotower.config import Config
from twotower.events import CLICK, CatalogItem, Interaction, Profile, Record
from twotower.kafka_io import PartitionAssigner, RecordDecoder, Topics, make_consumer, make_producer, partition_key
from twotower.snapshots import SnapshotLayout

log = logging.getLogger(__name__)

HISTORY_WRITES = Counter("twotower_publisher_history_writes", "Clicks pushed onto user histories in Redis")
SERVING_RECORDS = Counter("twotower_publisher_serving_records", "Records applied by the serving-state writer", ["kind"])


def encode_history_entry(item_id: str, ts_ms: int) -> bytes:
    """The bytes of one history entry: msgpack ``[item_id, ts_ms]``."""
    return msgpack.packb([item_id, ts_ms], use_bin_type=True)


def decode_history_entry(payload: bytes) -> tuple[str, int]:
    """Inverse of :func:`encode_history_entry`.

    Raises:
        ValueError: the payload is not such an entry.
    """
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise ValueError(f"history entry is not msgpack: {exc}") from None
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str) and isinstance(raw[1], int)):
        raise ValueError(f"history entry must be [item_id, ts_ms], got {raw!r}")
    return raw[0], raw[1]


def encode_profile(features: Sequence[float]) -> bytes:
    """The bytes stored under ``layout.profile(user)``: msgpack list of floats."""
    return msgpack.packb([float(x) for x in features], use_bin_type=True)


@dataclass
class BatchResult:
    """What one poll applied."""

    messages: int = 0
    dead_letters: int = 0
    clicks: int = 0
    impressions: int = 0
    profiles: int = 0
    catalog: list[CatalogItem] = field(default_factory=list)
    """Catalogue items of the batch, in arrival order."""


PUSH_CLICK = """
local key, entry, ts, cap = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local head = redis.call('LINDEX', key, 0)
if not head or cmsgpack.unpack(head)[2] <= ts then
    redis.call('LPUSH', key, entry)
else
    local entries = redis.call('LRANGE', key, 0, -1)
    local placed = false
    for i = 2, #entries do
        if cmsgpack.unpack(entries[i])[2] <= ts then
            redis.call('LINSERT', key, 'BEFORE', entries[i], entry)
            placed = true
            break
        end
    end
    if not placed then
        if #entries >= cap then
            return 0
        end
        redis.call('RPUSH', key, entry)
    end
end
redis.call('LTRIM', key, 0, cap - 1)
return 1
"""
"""Insert one history entry (``ARGV``: entry, its ts_ms, the cap) in its place by event time,
newest first (after entries of the same time), and trim to the cap; an entry older than every
one of a full history is left out. In order, it is one ``LINDEX`` and an ``LPUSH``."""


def queue_writes(
    pipe: redis.client.Pipeline, layout: SnapshotLayout, records: Iterable[Record], history_max_len: int
) -> BatchResult:
    """Queue the Redis commands of ``records`` on ``pipe`` (nothing is executed here).

    Args:
        pipe: a pipeline (the caller executes it).
        layout: key names.
        records: decoded records in arrival order.
        history_max_len: length cap of a user's history list.

    Returns:
        Counts and the catalogue items seen.
    """
    result = BatchResult()
    push_click = pipe.register_script(PUSH_CLICK)  # EVALSHA; the pipeline loads it first if Redis lacks it
    for record in records:
        if isinstance(record, Interaction):
            if record.type == CLICK:
                entry = encode_history_entry(record.item_id, record.ts_ms)
                push_click(keys=[layout.history(record.user_id)], args=[entry, record.ts_ms, history_max_len])
                result.clicks += 1
            else:
                result.impressions += 1
        elif isinstance(record, CatalogItem):
            pipe.hset(
                layout.item(record.item_id),
                mapping={"category": record.category, "title": record.title, "ts_ms": record.ts_ms},
            )
            result.catalog.append(record)
        elif isinstance(record, Profile):
            pipe.set(layout.profile(record.user_id), encode_profile(record.features))
            result.profiles += 1
    return result


class ServingStateWriter:
    """Consumes events, catalogue and profiles and writes Redis; offsets commit under ``publisher.group_id``.

    Owns its clients (one consumer, one producer for dead letters, one Redis connection), so
    it must be used from one thread.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        client: redis.Redis | None = None,
        producer: KafkaProducer | None = None,
    ) -> None:
        """Connect (or adopt the given clients).

        Args:
            cfg: the configuration (kafka, redis and publisher sections are used).
            client: Redis client; built from ``cfg.redis.url`` when ``None``.
            producer: producer for dead letters; built when ``None``.
        """
        self.cfg = cfg
        self.layout = SnapshotLayout(cfg.redis.key_prefix)
        self.topics = Topics(cfg.kafka.topic_prefix)
        self.redis = client if client is not None else redis.Redis.from_url(cfg.redis.url)
        built: list[Callable[[], object]] = [] if client is not None else [self.redis.close]
        try:  # a Kafka outage fails this, and the caller retries: close what was built each time
            if producer is None:
                producer = make_producer(cfg.kafka, client_id="twotower-publisher")
                built.append(lambda: self.producer.close(timeout=5))
            self.producer = producer
            self.consumer = make_consumer(cfg.kafka, cfg.publisher.group_id, client_id="twotower-publisher")
            built.append(lambda: self.consumer.close(autocommit=False))
            # Partitions start from the group's committed offsets (the last batch written to Redis).
            self.assigner = PartitionAssigner(
                self.consumer, [self.topics.events, self.topics.catalog, self.topics.profiles]
            )
        except BaseException:
            for close in reversed(built):
                with contextlib.suppress(Exception):
                    close()
            raise
        self.decoder = RecordDecoder(self.producer, self.topics)
        self._held_by_redis: dict[str, int] | None = None
        self._held = False
        """Batches are in Redis whose offsets are not committed yet."""

    def poll_once(
        self, timeout_ms: int = 200, before_commit: Callable[[BatchResult], bool] | None = None
    ) -> BatchResult:
        """Poll one batch, apply it to Redis in one transaction, then commit its offsets.

        Args:
            timeout_ms: longest wait for a batch.
            before_commit: called once Redis has a batch, with its result, to decide whether
                its offsets may be committed now (``False``: not yet; a later commit covers
                them, and a crash before it replays them). Called with an empty result after
                an empty poll while a commit is held. What it raises propagates, with the
                batch's offsets uncommitted; the batch is not read again.

        Raises:
            Exception: whatever Kafka or Redis raised while reading or writing a batch (the
                consumer was rewound to its start, so calling again retries it), or what
                ``before_commit`` raised.
        """
        self.assigner.refresh()
        batch = self.consumer.poll(timeout_ms=timeout_ms)
        if not batch:
            if self._held and (before_commit is None or before_commit(BatchResult())):
                self._commit()
            return BatchResult()
        firsts = {tp: messages[0].offset for tp, messages in batch.items() if messages}
        try:
            held = self._held_offsets()
            records: list[Record] = []
            dead = 0
            count = 0
            for tp, messages in batch.items():
                floor = held.get(partition_key(tp), 0)
                for message in messages:
                    count += 1
                    record = self.decoder.decode(message)
                    if record is None:
                        dead += 1
                    elif not (message.offset < floor and isinstance(record, Interaction) and record.type == CLICK):
                        records.append(record)  # a click below the floor is in its history already
            nexts = {partition_key(tp): messages[-1].offset + 1 for tp, messages in batch.items() if messages}
            with self.redis.pipeline(transaction=True) as pipe:
                # watched: the client then never sends the transaction again after losing its reply
                pipe.watch(self.layout.serving_offsets)
                pipe.multi()
                result = queue_writes(pipe, self.layout, records, self.cfg.publisher.history_max_len)
                pipe.hset(self.layout.serving_offsets, mapping=nexts)
                pipe.execute()
            held.update((name, max(held.get(name, 0), offset)) for name, offset in nexts.items())
        except Exception:
            self._held_by_redis = None  # what Redis holds is read again: the write may have happened
            self._rewind(firsts)
            raise
        result.messages, result.dead_letters = count, dead
        HISTORY_WRITES.inc(result.clicks)
        for kind, n in (
            ("click", result.clicks),
            ("impression", result.impressions),
            ("catalog", len(result.catalog)),
            ("profile", result.profiles),
            ("dead_letter", dead),
        ):
            if n:
                SERVING_RECORDS.labels(kind).inc(n)
        # Redis has the batch: from here on it is never read again in this process (a second
        # LPUSH of its clicks would repeat them in histories), only its commit may wait
        self._held = True
        if before_commit is None or before_commit(result):
            self._commit()
        return result

    def _held_offsets(self) -> dict[str, int]:
        """Per ``topic:partition``, the next offset whose writes Redis holds (read once, then
        kept up to date; read again after a failure)."""
        if self._held_by_redis is None:
            raw = self.redis.hgetall(self.layout.serving_offsets)
            self._held_by_redis = {key.decode(): int(value) for key, value in raw.items()}
        return self._held_by_redis

    def _commit(self) -> None:
        try:
            self.consumer.commit()
        except KafkaError as exc:  # Redis has the batch; a restart replays it (at least once)
            log.warning("offset commit failed (the batch is replayed on restart): %s", exc)
            return
        self._held = False

    def _rewind(self, firsts: dict[TopicPartition, int]) -> None:
        for tp, offset in firsts.items():
            try:
                self.consumer.seek(tp, offset)
            except Exception as exc:  # a restart replays from the last commit
                log.warning("cannot rewind %s to %d: %s", tp, offset, exc)

    def close(self) -> None:
        """Close every client, without committing anything further."""
        try:
            self.consumer.close(autocommit=False)
        finally:
            try:
                self.producer.close(timeout=5)
            finally:
                self.redis.close()
