"""The event schema: round trips, the errors a malformed record gets, dead letters (no services)."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from twotower.events import (
    CLICK,
    MAX_TS_MS,
    SCHEMA_ERROR_CODES,
    CatalogItem,
    Interaction,
    Profile,
    SchemaError,
    dead_letter,
    decode,
    encode,
    from_dict,
    to_dict,
)
from twotower.kafka_io import MAX_AHEAD_OF_TIMESTAMP_MS, Topics, decode_message

CLICK_EVENT = Interaction("e1", "r1", "u1", "i1", CLICK, 0, 1_700_000_000_000, {"retrieved": ["i2"]})


@pytest.mark.parametrize(
    "record",
    [CLICK_EVENT, CatalogItem("i1", "c1", [0.5, 1.0], 5, "a title"), Profile("u1", [1.0], MAX_TS_MS)],
)
def test_a_record_survives_encode_and_decode(record: Any) -> None:
    assert decode(encode(record)) == record


def _raw(**changes: Any) -> dict[str, Any]:
    raw = to_dict(CLICK_EVENT)
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        ([1, 2], "not_a_map", "a record must be a map"),
        (_raw(v=2), "schema_version", "unsupported schema version 2"),
        (_raw(kind="x1"), "unknown_kind", "unknown record kind 'x1'"),
        (_raw(user_id=None), "missing_field", "missing field(s): user_id"),
        (_raw(extra=1), "unknown_field", "unknown field(s): extra"),
        (_raw(ts_ms=-1), "bad_value", "ts_ms must be >= 0"),
        (_raw(ts_ms=MAX_TS_MS + 1), "bad_value", "ts_ms must be <="),  # microseconds, say
        (_raw(ts_ms=2**63), "bad_value", "ts_ms must be <="),
        (_raw(position=True), "bad_value", "position must be an integer"),
        (_raw(type="view"), "bad_value", "type must be one of"),
        (_raw(user_id="x" * 257), "bad_value", "user_id must have 1..256 characters"),
        # the context keys the trainer reads: 1e39 is finite here, infinite in the float32 towers,
        # and once made every row its step touched NaN
        (_raw(context={"features": [1e39]}), "bad_value", "context.features must hold numbers within"),
        (_raw(context={"features": "warm"}), "bad_value", "context.features must be a list of numbers"),
        (_raw(context={"retrieved": "i1"}), "bad_value", "context.retrieved must be a list of item ids"),
        (_raw(context={"retrieved": ["i1", None]}), "bad_value", "context.retrieved must be a string or integer"),
        (_raw(context={"retrieved": ["i"] * 1001}), "bad_value", "context.retrieved has 1001 ids, more than 1000"),
    ],
)
def test_a_malformed_record_names_the_rule_it_broke(raw: Any, code: str, message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        from_dict(raw)
    assert caught.value.code == code and code in SCHEMA_ERROR_CODES
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ([float("nan")], "finite numbers only"),
        ([1e39], r"within ±1e\+09"),  # finite here, infinite in the float32 towers
        ([-2e9], r"within ±1e\+09"),
    ],
)
def test_features_must_stay_finite_in_float32(features: list[float], message: str) -> None:
    raw = to_dict(CatalogItem("i1", "c1", [0.0], 1))
    raw["features"] = features
    with pytest.raises(SchemaError, match=message):
        from_dict(raw)
    raw["features"] = [1e9, -1e9]
    assert from_dict(raw) == CatalogItem("i1", "c1", [1e9, -1e9], 1)


def test_undecodable_payloads() -> None:
    with pytest.raises(SchemaError) as caught:
        decode(b"\xc1not msgpack")
    assert caught.value.code == "not_msgpack"
    with pytest.raises(SchemaError) as caught:
        decode(None)
    assert caught.value.code == "tombstone"


def test_a_dead_letter_keeps_the_payload_and_says_why() -> None:
    error = SchemaError("unknown record kind 'x1'", "unknown_kind")
    letter = msgpack.unpackb(dead_letter(b"abcdef", error, "events", 3, 42))
    assert letter == {
        "payload": b"abcdef", "payload_bytes": 6, "truncated": False, "reason": "unknown record kind 'x1'",
        "code": "unknown_kind", "topic": "events", "partition": 3, "offset": 42,
    }  # fmt: skip
    cut = msgpack.unpackb(dead_letter(b"abcdef", error, "events", 3, 42, keep=4))
    assert cut["payload"] == b"abcd" and cut["payload_bytes"] == 6 and cut["truncated"] is True
    whole = msgpack.unpackb(dead_letter(b"abcdef", error, "events", 3, 42, keep=6))
    assert whole["payload"] == b"abcdef" and whole["truncated"] is False
    tombstone = msgpack.unpackb(dead_letter(None, SchemaError("empty", "tombstone"), "events", 0, 1, keep=4))
    assert tombstone["payload"] is None and tombstone["payload_bytes"] == 0


def test_a_message_is_checked_against_its_topic_and_timestamp() -> None:
    """What the message around a valid record says of it: each consumer judges it the same way,
    whenever it reads it (the streaming trainer at once, the nightly a day later)."""
    topics = Topics("p.")
    hour = MAX_AHEAD_OF_TIMESTAMP_MS

    def message(record: Any, topic: str, timestamp: int | None) -> SimpleNamespace:
        return SimpleNamespace(value=encode(record), topic=topic, timestamp=timestamp)

    at = CLICK_EVENT.ts_ms
    assert decode_message(message(CLICK_EVENT, topics.events, at), topics) == CLICK_EVENT
    assert decode_message(message(CLICK_EVENT, topics.events, at - hour), topics) == CLICK_EVENT  # at the bound
    assert decode_message(message(CLICK_EVENT, topics.events, -1), topics) == CLICK_EVENT  # no timestamp
    assert decode_message(message(CLICK_EVENT, "elsewhere", at), topics) == CLICK_EVENT  # not a topic of ours
    with pytest.raises(SchemaError, match=r"1\.0 h ahead of the message's timestamp") as caught:
        decode_message(message(CLICK_EVENT, topics.events, at - hour - 1), topics)
    assert caught.value.code == "ahead_of_timestamp" and caught.value.code in SCHEMA_ERROR_CODES
    profile = Profile("u1", [0.5], at)
    assert decode_message(message(profile, topics.profiles, at), topics) == profile
    for record, topic in ((profile, topics.events), (CLICK_EVENT, topics.catalog), (profile, topics.catalog)):
        with pytest.raises(SchemaError, match=f"on topic {re.escape(topic)}, which carries") as caught:
            decode_message(message(record, topic, at), topics)
        assert caught.value.code == "wrong_topic" and caught.value.code in SCHEMA_ERROR_CODES
