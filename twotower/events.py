"""The event schema: what producers write to Kafka and every consumer reads.

Three record kinds travel as msgpack maps carrying a schema version ``v``:

* :class:`Interaction` (topic ``events``, key = user id): an impression or a click.
* :class:`CatalogItem` (topic ``catalog``, compacted, key = item id).
* :class:`Profile` (topic ``profiles``, compacted, key = user id).

IDs are strings on the wire (integers are accepted and converted), so any ID space fits.
``ts_ms`` is the event time in milliseconds since the epoch and is also the Kafka record
timestamp, so the broker's time index can find "yesterday".

Validation is the same on both sides: :func:`encode` refuses an invalid record before it is
sent, :func:`decode` raises :class:`SchemaError` with a reason, which consumers turn into a
dead letter (see :func:`dead_letter`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import msgpack

SCHEMA_VERSION = 1
IMPRESSION = "impression"
CLICK = "click"
INTERACTION_TYPES = (IMPRESSION, CLICK)
MAX_ID_LEN = 256
MAX_FEATURES = 4096
MAX_FEATURE_ABS = 1e9
"""Feature values are bounded so that the float32 towers stay finite: a value near float32's
limit (3.4e38) gave an item an infinite, then NaN, vector, and no index can be built with it.
Features are meant to be normalised; nothing sensible is lost above a billion."""
MAX_RETRIEVED = 1_000
"""Most item ids an impression's ``context["retrieved"]`` may list (the trainer keeps them for
its recent requests' hard negatives; the retriever answers at most ``retriever.max_k``, 1,000 by
default)."""
MAX_TS_MS = 253_402_300_799_999
"""The last millisecond of the year 9999 (UTC): a later ``ts_ms`` is a unit mistake (microseconds
or nanoseconds), and one such event would move the trainer's event-time clock past every row's
expiry."""


class SchemaError(ValueError):
    """A record that does not follow the schema; the message says why, ``code`` which rule it
    broke (one of :data:`SCHEMA_ERROR_CODES`: a fixed set, fit for a metric label)."""

    def __init__(self, message: str, code: str = "bad_value") -> None:
        super().__init__(message)
        self.code = code


SCHEMA_ERROR_CODES = (
    "tombstone", "not_msgpack", "not_a_map", "schema_version", "unknown_kind", "missing_field",
    "unknown_field", "bad_value", "wrong_topic", "ahead_of_timestamp",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Interaction:
    """An impression (item shown) or a click (item chosen) by a user."""

    event_id: str
    request_id: str
    user_id: str
    item_id: str
    type: Literal["impression", "click"]
    position: int
    ts_ms: int
    context: dict[str, Any] = field(default_factory=dict)
    """Optional extras, free-form but for two keys the trainer reads, which are checked:
    ``retrieved``, the item ids retrieved but not shown (at most :data:`MAX_RETRIEVED` ids), and
    ``features``, the request's dense context vector (numbers as profile features are)."""


@dataclass(frozen=True, slots=True)
class CatalogItem:
    """An item entering or changing in the catalogue; content features give a new item its vector."""

    item_id: str
    category: str
    features: list[float]
    ts_ms: int
    title: str = ""


@dataclass(frozen=True, slots=True)
class Profile:
    """Dense profile features of a user."""

    user_id: str
    features: list[float]
    ts_ms: int


Record = Interaction | CatalogItem | Profile
_KIND = {Interaction: "interaction", CatalogItem: "catalog", Profile: "profile"}


def check_id(value: Any, name: str) -> str:
    """``value`` as an id the schema accepts (a string or integer of 1..:data:`MAX_ID_LEN`
    characters, no NUL), or :class:`SchemaError` saying why not."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise SchemaError(f"{name} must be a string or integer, got {type(value).__name__}")
    text = str(value)
    if not text or len(text) > MAX_ID_LEN:
        raise SchemaError(f"{name} must have 1..{MAX_ID_LEN} characters")
    if "\x00" in text:  # snapshots hold ids as NUL-padded bytes (twotower.id_table)
        raise SchemaError(f"{name} must not contain NUL")
    return text


def _int(value: Any, name: str, low: int = 0, high: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise SchemaError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise SchemaError(f"{name} must be <= {high}, got {value}")
    return value


def _ts_ms(value: Any) -> int:
    return _int(value, "ts_ms", high=MAX_TS_MS)


def _floats(value: Any, name: str) -> list[float]:
    if not isinstance(value, list | tuple):
        raise SchemaError(f"{name} must be a list of numbers")
    if len(value) > MAX_FEATURES:
        raise SchemaError(f"{name} has {len(value)} values, more than {MAX_FEATURES}")
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            raise SchemaError(f"{name} must hold finite numbers only")
        if abs(x) > MAX_FEATURE_ABS:
            raise SchemaError(f"{name} must hold numbers within ±{MAX_FEATURE_ABS:g}, got {x!r}")
        out.append(float(x))
    return out


def _check_context(context: dict[str, Any]) -> None:
    """The context keys the trainer reads hold what it can use: a vector of 1e39 (finite as a
    Python float, infinite as the towers' float32) once made every row it touched NaN."""
    if "features" in context:
        _floats(context["features"], "context.features")
    if "retrieved" in context:
        retrieved = context["retrieved"]
        if not isinstance(retrieved, list | tuple):
            raise SchemaError("context.retrieved must be a list of item ids")
        if len(retrieved) > MAX_RETRIEVED:
            raise SchemaError(f"context.retrieved has {len(retrieved)} ids, more than {MAX_RETRIEVED}")
        for item_id in retrieved:
            check_id(item_id, "context.retrieved")


def _fields(raw: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    missing = [k for k in required if k not in raw]
    if missing:
        raise SchemaError(f"missing field(s): {', '.join(missing)}", "missing_field")
    unknown = sorted(set(raw) - set(required) - set(optional) - {"v", "kind"})
    if unknown:
        raise SchemaError(f"unknown field(s): {', '.join(unknown)}", "unknown_field")


def from_dict(raw: Any) -> Record:
    """Validate a decoded map and build the record it describes.

    Raises:
        SchemaError: with the first problem found.
    """
    if not isinstance(raw, dict):
        raise SchemaError(f"a record must be a map, got {type(raw).__name__}", "not_a_map")
    if raw.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema version {raw.get('v')!r} (expected {SCHEMA_VERSION})", "schema_version")
    kind = raw.get("kind")
    if kind == "interaction":
        _fields(raw, ("event_id", "request_id", "user_id", "item_id", "type", "position", "ts_ms"), ("context",))
        if raw["type"] not in INTERACTION_TYPES:
            raise SchemaError(f"type must be one of {INTERACTION_TYPES}, got {raw['type']!r}")
        context = raw.get("context", {})
        if not isinstance(context, dict):
            raise SchemaError("context must be a map")
        _check_context(context)
        return Interaction(
            event_id=check_id(raw["event_id"], "event_id"),
            request_id=check_id(raw["request_id"], "request_id"),
            user_id=check_id(raw["user_id"], "user_id"),
            item_id=check_id(raw["item_id"], "item_id"),
            type=raw["type"],
            position=_int(raw["position"], "position"),
            ts_ms=_ts_ms(raw["ts_ms"]),
            context=context,
        )
    if kind == "catalog":
        _fields(raw, ("item_id", "category", "features", "ts_ms"), ("title",))
        title = raw.get("title", "")
        if not isinstance(title, str):
            raise SchemaError("title must be a string")
        return CatalogItem(
            item_id=check_id(raw["item_id"], "item_id"),
            category=check_id(raw["category"], "category"),
            features=_floats(raw["features"], "features"),
            ts_ms=_ts_ms(raw["ts_ms"]),
            title=title,
        )
    if kind == "profile":
        _fields(raw, ("user_id", "features", "ts_ms"), ())
        return Profile(
            user_id=check_id(raw["user_id"], "user_id"),
            features=_floats(raw["features"], "features"),
            ts_ms=_ts_ms(raw["ts_ms"]),
        )
    raise SchemaError(f"unknown record kind {kind!r}", "unknown_kind")


def to_dict(record: Record) -> dict[str, Any]:
    """The wire map of a record (validated: building it back must succeed)."""
    data = asdict(record)
    data["v"] = SCHEMA_VERSION
    data["kind"] = _KIND[type(record)]
    from_dict(data)
    return data


def encode(record: Record) -> bytes:
    """msgpack bytes of a valid record.

    Raises:
        SchemaError: the record is invalid; nothing should be sent.
    """
    return msgpack.packb(to_dict(record), use_bin_type=True)


def decode(payload: bytes | None) -> Record:
    """The record in ``payload``.

    Raises:
        SchemaError: not msgpack, or not a valid record.
    """
    if payload is None:
        raise SchemaError("empty payload (tombstone)", "tombstone")
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise SchemaError(f"not msgpack: {exc}", "not_msgpack") from None
    return from_dict(raw)


def record_key(record: Record) -> bytes:
    """The Kafka key: user id for interactions and profiles, item id for catalog items."""
    key = record.item_id if isinstance(record, CatalogItem) else record.user_id
    return key.encode()


def dead_letter(
    payload: bytes | None, error: SchemaError, topic: str, partition: int, offset: int, keep: int | None = None
) -> bytes:
    """The msgpack body of a dead letter: the raw bytes plus why and where they came from.

    Args:
        keep: keep only the first ``keep`` bytes of the payload (for a payload too large to be
            sent again with the letter around it); ``payload_bytes`` gives its full size, and
            ``truncated`` says whether bytes were left out.
    """
    size = len(payload) if payload is not None else 0
    truncated = payload is not None and keep is not None and size > keep
    return msgpack.packb(
        {
            "payload": payload[:keep] if truncated and payload is not None else payload,
            "payload_bytes": size,
            "truncated": truncated,
            "reason": str(error),
            "code": error.code,
            "topic": topic,
            "partition": partition,
            "offset": offset,
        },
        use_bin_type=True,
    )
