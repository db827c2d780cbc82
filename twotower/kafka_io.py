"""Kafka topics and clients, set up the same way by every stage.

One place names the topics and builds producers and consumers, so that key, timestamp and
dead-letter rules are the same for everyone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError
from kafka.structs import TopicPartition
from prometheus_client import Counter

from twotower.config import KafkaConfig
from twotower.events import (
    CatalogItem,
    Interaction,
    Profile,
    Record,
    SchemaError,
    dead_letter,
    decode,
    encode,
    record_key,
)

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "twotower_dead_letters_total",
    "Malformed messages sent to a dead-letter topic, by the schema rule they broke",
    ["topic", "reason"],
)
MAX_AHEAD_OF_TIMESTAMP_MS = 3_600_000
"""Furthest a record's event time may be ahead of its Kafka timestamp. The broker bounds the
timestamp by its clock (``message.timestamp.after.max.ms``, Kafka 4: one hour); the event time
in the payload is bounded by it here, since the trainer's clock follows event times (one far in
the future would expire every row). The system's producers send the event time as the
timestamp; a producer that leaves the timestamp to Kafka gets its send time there."""
DEAD_LETTER_KEEP_BYTES = 65_536
"""How much of a payload a dead letter keeps when the whole payload and the letter around it do
not fit in one message."""


@dataclass(frozen=True)
class Topics:
    """Topic names under a prefix."""

    prefix: str = ""

    @property
    def events(self) -> str:
        """Impressions and clicks, keyed by user id."""
        return f"{self.prefix}events"

    @property
    def catalog(self) -> str:
        """Catalogue items, keyed by item id, compacted."""
        return f"{self.prefix}catalog"

    @property
    def profiles(self) -> str:
        """User profiles, keyed by user id, compacted."""
        return f"{self.prefix}profiles"

    @staticmethod
    def dlq(topic: str) -> str:
        """The dead-letter topic of ``topic``."""
        return f"{topic}.dlq"

    def kind_of(self, topic: str) -> type[Record] | None:
        """The record type ``topic`` carries (``None``: not one of the system's topics)."""
        return self._kinds.get(topic)

    @cached_property
    def _kinds(self) -> dict[str, type[Record]]:  # asked for every consumed record: built once
        return {self.events: Interaction, self.catalog: CatalogItem, self.profiles: Profile}

    def all(self) -> list[str]:
        """Every topic the system uses, dead-letter topics included."""
        main = [self.events, self.catalog, self.profiles]
        return main + [self.dlq(t) for t in main]


def ensure_topics(cfg: KafkaConfig) -> Topics:
    """Create the system's topics if they do not exist yet."""
    topics = Topics(cfg.topic_prefix)
    compacted = {topics.catalog, topics.profiles}
    admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap, client_id="twotower-admin")
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                name,
                num_partitions=cfg.partitions,
                replication_factor=1,
                topic_configs={"cleanup.policy": "compact"}
                if name in compacted
                else {"retention.ms": str(cfg.events_retention_ms)},
            )
            for name in topics.all()
            if name not in existing
        ]
        if new:
            # Another process may create them between list and create: the goal is met either way.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
            log.info("created topics %s", [t.name for t in new])
            _wait_for_leaders(admin, [t.name for t in new])
    finally:
        admin.close()
    return topics


def partition_key(tp: tuple[str, int]) -> str:
    """``topic:partition``: how a partition is named where it is a key (checkpoint offsets, the
    serving state's offsets in Redis)."""
    return f"{tp[0]}:{tp[1]}"


def parse_partition_key(key: str) -> tuple[str, int]:
    """Inverse of :func:`partition_key`."""
    topic, _, part = key.rpartition(":")
    return topic, int(part)


def topic_configs(bootstrap: str, topic: str, names: Iterable[str]) -> dict[str, str]:
    """The values of a topic's settings ``names`` as the broker applies them (its own defaults
    included); a setting the broker does not know, or could not report, is left out.

    Diagnostics for the producers' own checks: any failure to ask gives ``{}``, never an error."""
    names = list(names)
    admin = None
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="twotower-admin")
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, dict.fromkeys(names))
        described = admin.describe_configs([resource], config_filter="All")["topic"].get(topic, {})
        values = {name: described.get(name, {}).get("value") for name in names}
        return {name: str(value) for name, value in values.items() if value is not None}
    except Exception as exc:
        log.debug("could not read %s of topic %s: %s", names, topic, exc)
        return {}
    finally:
        if admin is not None:
            admin.close()


def _wait_for_leaders(admin: KafkaAdminClient, names: list[str], timeout_s: float = 30.0) -> None:
    """Block until every partition of ``names`` has a leader (sends before that are retried)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            described = admin.describe_topics(names)
        except KafkaError:
            described = []
        ready = len(described) == len(names) and all(
            t.get("partitions") and all(p.get("leader_id", -1) >= 0 for p in t["partitions"]) for t in described
        )
        if ready:
            return
        time.sleep(0.2)
    log.warning("topics %s still have partitions without a leader after %.0f s", names, timeout_s)


def make_producer(cfg: KafkaConfig, **overrides: object) -> KafkaProducer:
    """A producer that waits for the broker's acknowledgement and retries transient errors."""
    options: dict[str, object] = {
        "bootstrap_servers": cfg.bootstrap,
        "acks": "all",
        "linger_ms": 5,
        # New topics elect leaders for a while: retry long enough that no send is lost to that.
        "retries": 50,
        "retry_backoff_ms": 200,
        "client_id": "twotower",
    }
    options.update(overrides)
    return KafkaProducer(**options)


def make_consumer(cfg: KafkaConfig, group_id: str | None, **overrides: object) -> KafkaConsumer:
    """A consumer with manual commits (the caller commits after its state is safe).

    It joins no group: callers assign partitions with :class:`PartitionAssigner`. ``group_id``
    only names where offsets are committed (and read back from when no position is given).
    """
    options: dict[str, object] = {
        "bootstrap_servers": cfg.bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": 2_000,
        "client_id": "twotower",
    }
    options.update(overrides)
    return KafkaConsumer(**options)


class PartitionAssigner:
    """Assigns a consumer every partition of some topics, and the new ones as they appear.

    Every consuming daemon of the system is a single writer of its state (the trainer holds a
    file lock on its state directory; the publisher owns the snapshot versions), so Kafka's
    group membership would buy no scaling, only rebalances: a consumer whose heartbeats lapse
    is silently dropped from its group and stops receiving records. Manual assignment has no
    membership to lose. Offsets still commit under the consumer's ``group_id``, so lag tools
    see them.

    Args:
        consumer: a consumer built by :func:`make_consumer`.
        topics: the topics to read in full.
        start: the offset to start a newly assigned partition from, or ``None`` for the
            committed offset of the consumer's group (else ``auto_offset_reset``).
        refresh_s: how often :meth:`refresh` looks for new partitions.
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        topics: Iterable[str],
        start: Callable[[TopicPartition], int | None] | None = None,
        refresh_s: float = 10.0,
    ) -> None:
        self.consumer = consumer
        self.topics = list(topics)
        self.start = start
        self.refresh_s = refresh_s
        self.assigned: set[TopicPartition] = set()
        self._last = -float("inf")

    def refresh(self, force: bool = False) -> list[TopicPartition]:
        """Assign partitions not assigned yet (checked every ``refresh_s``); returns the new ones."""
        now = time.monotonic()
        if not force and now - self._last < self.refresh_s:
            return []
        self._last = now
        found: set[TopicPartition] = set()
        for topic in self.topics:
            found.update(TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic) or ())
        new = sorted(found - self.assigned)
        if not new:
            return []
        self.assigned |= found
        self.consumer.assign(sorted(self.assigned))
        for tp in new:
            offset = self.start(tp) if self.start is not None else None
            if offset is not None:
                self.consumer.seek(tp, offset)
        log.info("assigned %d new partition(s) of %s", len(new), sorted({tp.topic for tp in new}))
        return new


def send_record(producer: KafkaProducer, topic: str, record: Record):
    """Send one record with its key and its event time as the Kafka timestamp."""
    return producer.send(topic, key=record_key(record), value=encode(record), timestamp_ms=record.ts_ms)


def decode_message(message, topics: Topics) -> Record:
    """The record of a consumed ``ConsumerRecord``, checked against the message around it: the
    kind its topic carries, and an event time at most :data:`MAX_AHEAD_OF_TIMESTAMP_MS` ahead
    of the message's timestamp (each consumer judges a record the same way, whenever it reads it).

    Raises:
        SchemaError: what :func:`~twotower.events.decode` raises, or ``wrong_topic``, or
            ``ahead_of_timestamp``.
    """
    record = decode(message.value)
    kind = topics.kind_of(message.topic)
    if kind is not None and not isinstance(record, kind):
        raise SchemaError(
            f"a {type(record).__name__} record on topic {message.topic}, which carries {kind.__name__} records",
            "wrong_topic",
        )
    stamp = message.timestamp
    if stamp is not None and stamp >= 0 and record.ts_ms > stamp + MAX_AHEAD_OF_TIMESTAMP_MS:
        raise SchemaError(
            f"event time {record.ts_ms} is {(record.ts_ms - stamp) / 3_600_000:.1f} h ahead of the message's "
            f"timestamp {stamp} (at most {MAX_AHEAD_OF_TIMESTAMP_MS} ms)",
            "ahead_of_timestamp",
        )
    return record


class RecordDecoder:
    """Decodes consumed messages; a malformed one goes to the dead-letter topic and is counted.

    Never raises for bad input: :meth:`decode` returns ``None`` for a message it dead-lettered.
    """

    def __init__(self, producer: KafkaProducer, topics: Topics) -> None:
        self._producer = producer
        self._topics = topics

    def decode(self, message) -> Record | None:
        """The record of a consumed ``ConsumerRecord`` (:func:`decode_message`), or ``None`` if
        it was dead-lettered."""
        try:
            return decode_message(message, self._topics)
        except SchemaError as exc:
            self._send_letter(message, exc)
            DEAD_LETTERS.labels(message.topic, exc.code).inc()
            log.warning("dead-lettered %s[%d]@%d: %s", message.topic, message.partition, message.offset, exc)
            return None

    def _send_letter(self, message, error: SchemaError) -> None:
        """Send the letter and wait for the ack (the caller commits the offset afterwards, so the
        letter must exist). A payload that fills a whole message leaves no room for the letter
        around it: that one is sent again with the payload cut to :data:`DEAD_LETTER_KEEP_BYTES`
        (and marked so) rather than failing the daemon on it at every restart."""
        where = (message.topic, message.partition, message.offset)
        try:
            body = dead_letter(message.value, error, *where)
            self._producer.send(Topics.dlq(message.topic), key=message.key, value=body).get(timeout=30)
        except MessageSizeTooLargeError as exc:
            log.warning("dead letter of %s[%d]@%d too large (%s): payload cut", *where, exc)
            body = dead_letter(message.value, error, *where, keep=DEAD_LETTER_KEEP_BYTES)
            self._producer.send(Topics.dlq(message.topic), key=message.key, value=body).get(timeout=30)
