"""The checkpoint file: format-3 round trip of every part of the trainer's state, format-1 and
format-2 files still loading, and the columnar encodings refusing what does not fit."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer.state import HistoryColumns, TrainerState
from twotower import checkpoint
from twotower.columns import PackedStrings, Ragged, pack_strings, unpack_strings
from twotower.config import ModelConfig, TrainerConfig
from twotower.events import CLICK, IMPRESSION, CatalogItem, Interaction, Profile

DAY_MS = 86_400_000
ODD_ITEM = "ï\0tem"  # a NUL inside an id: the packed string lists take their slower form


def _state() -> TrainerState:
    """A small state with every part filled: rows, pending IDs, catalogue (also items without a
    row), profiles, histories, hard negatives, removed items, a nightly step's optimizer state."""
    state = TrainerState(
        ModelConfig(dim=8, id_dim=4, hidden=16, content_dim=3, profile_dim=2, history_len=4),
        TrainerConfig(admission_min_count=2, row_ttl_days=5.0, hard_negative_requests=3, min_extra_negatives=0),
    )
    items = [f"i{i}" for i in range(12)] + [ODD_ITEM, "日本"]
    for n, item in enumerate(items):
        state.apply_catalog(CatalogItem(item, f"c{n % 3}", [float(n), 1.0, -1.0], 0))
    for n in range(6):
        state.apply_profile(Profile(f"u{n}", [float(n), 0.5], 0))
    rng = np.random.default_rng(1)
    clicks = []
    for n in range(60):
        user, item = f"u{rng.integers(0, 8)}", items[rng.integers(0, len(items))]
        clicks.append(Interaction(f"e{n}", f"r{n % 5}", user, item, CLICK, 0, DAY_MS + 1_000 * n))
    state.learn(state.observe_clicks(clicks[:30]), dense=True)
    clicks.append(Interaction("once", "r9", "u-once", "i1", CLICK, 0, DAY_MS))  # stays pending (admission 2)
    state.learn(state.observe_clicks(clicks[30:]), dense=False)
    for r in range(5):  # an LRU of 3: the first two are dropped
        context = {"retrieved": [items[r], items[r + 1], ODD_ITEM, items[r + 3]]}
        state.observe_impression(Interaction(f"imp{r}", f"r{r}", "u1", items[r], IMPRESSION, 0, DAY_MS, context))
    state.items.add("stale", 0, state.next_seq)
    state.expire(DAY_MS * 11 // 2)  # "stale" and the never-clicked catalogue items go
    state.nightly_done.append("2026-01-01")
    state.seq += 1
    assert state.removed_items and state.users.pending and len(state.requests) == 3
    return state


def _assert_same_state(a: TrainerState, b: TrainerState) -> None:
    assert (a.seq, a.dense_version, a.event_time_ms) == (b.seq, b.dense_version, b.event_time_ms)
    for name in ("users", "items"):
        ta, tb = getattr(a, name), getattr(b, name)
        ka, ra = ta.live_rows()
        kb, rb = tb.live_rows()
        assert ka == kb and ta.pending == tb.pending
        for col in ("emb", "accum", "count", "last_seen_ms", "updated_seq"):
            assert torch.equal(getattr(ta, col)[ra], getattr(tb, col)[rb]), (name, col)
    assert a.catalog.keys() == b.catalog.keys()
    for item, (cat, content) in a.catalog.items():
        assert b.catalog[item][0] == cat and np.array_equal(b.catalog[item][1], content)
    assert a.profiles.keys() == b.profiles.keys()
    assert all(np.array_equal(a.profiles[u], b.profiles[u]) for u in a.profiles)
    assert {u: list(h) for u, h in a.histories.items()} == {u: list(h) for u, h in b.histories.items()}
    assert all(len(h) <= a.model_cfg.history_len for h in b.histories.values())
    assert list(a.requests) == list(b.requests)
    for rid, entry in a.requests.items():
        assert b.requests[rid].shown == entry.shown and list(b.requests[rid].not_shown) == list(entry.not_shown)
    assert a.hard_counts == b.hard_counts and a.hard_total == b.hard_total
    assert a.removed_items == b.removed_items and a.nightly_done == b.nightly_done
    assert a.categories == b.categories
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    sa, sb = a.dense_optimizer.state_dict()["state"], b.dense_optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_round_trip_restores_every_part_of_the_state(tmp_path: Path) -> None:
    state = _state()
    offsets = {"events:0": 60, "catalog:0": 14}
    extra = {"applied_above": {"events:1": [7, 9]}}
    checkpoint.save(tmp_path, state.to_checkpoint(offsets, extra))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]  # no temporary file left
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.format == checkpoint.FORMAT == 3
    assert loaded.offsets == offsets and loaded.extra["applied_above"] == {"events:1": [7, 9]}
    assert loaded.histories.as_dict() == {u: list(h) for u, h in state.histories.items()}
    assert loaded.hard_negatives.counts == state.hard_counts
    # the publisher's view: item side aligned to the item rows
    for row, item in enumerate(loaded.items.ids):
        assert int(loaded.item_category[row]) == state.catalog[item][0]
        assert np.array_equal(loaded.item_content[row].numpy(), state.catalog[item][1])
    _assert_same_state(state, TrainerState.from_checkpoint(loaded, state.tcfg))


def test_the_history_overflow_round_trips_and_a_file_without_one_loads(tmp_path: Path) -> None:
    state = _state()
    later = [Interaction(f"n{k}", "r", f"u{k % 3}", f"i{k}", CLICK, 0, 6 * DAY_MS + k) for k in range(12)]
    state.observe_clicks(later)  # 4 clicks each on a later day: the older entries overflow
    overflow = dict(state.history_overflow)
    assert set(overflow) == {"u0", "u1", "u2"} and all(overflow.values())
    checkpoint.save(tmp_path, state.to_checkpoint({}))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.history_overflow.as_dict() == overflow
    assert dict(TrainerState.from_checkpoint(loaded, state.tcfg).history_overflow) == overflow
    data = checkpoint.encode(state.to_checkpoint({}))
    del data["history_overflow"]  # written before the overflow
    torch.save(data, checkpoint.path_in(tmp_path))
    older = checkpoint.load(tmp_path)
    assert older is not None and len(older.history_overflow) == 0
    assert older.histories.as_dict() == loaded.histories.as_dict()


def test_saving_removes_temporary_files_a_dead_writer_left(tmp_path: Path) -> None:
    """A forced exit mid-write leaves its temporary file; the next save (one writer) removes it."""
    (tmp_path / "checkpoint.tmp.99999").write_bytes(b"half a checkpoint")
    checkpoint.row_updates_dir(tmp_path).mkdir()
    (checkpoint.row_updates_dir(tmp_path) / ".000000000007.tmp.99999").write_bytes(b"half a row update")
    checkpoint.save(tmp_path, _state().to_checkpoint({}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.FILENAME, checkpoint.ROW_UPDATES_DIR]
    assert list(checkpoint.row_updates_dir(tmp_path).iterdir()) == []


def test_an_empty_state_round_trips(tmp_path: Path) -> None:
    state = TrainerState(ModelConfig(dim=8, id_dim=4, hidden=16), TrainerConfig())
    checkpoint.save(tmp_path, state.to_checkpoint({}))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and len(loaded.histories) == 0 and loaded.profiles.ids == []
    _assert_same_state(state, TrainerState.from_checkpoint(loaded, state.tcfg))


def _format_1(state: TrainerState, offsets: dict[str, int]) -> dict[str, Any]:
    """What the format-1 code wrote for ``state``: ``asdict`` of the old checkpoint, with the
    histories as a dict of (item, ts) tuples and profiles, catalogue and hard negatives in extra."""
    users, _ = state.users.to_state()
    items, _ = state.items.to_state()
    cats, content = state.item_side(items.ids)

    def table(t: checkpoint.TableState) -> dict[str, Any]:
        return {
            "ids": t.ids,
            "emb": t.emb,
            "accum": t.accum,
            "count": t.count,
            "last_seen_ms": t.last_seen_ms,
            "updated_seq": t.updated_seq,
            "pending": t.pending,
        }

    return {
        "seq": state.seq,
        "dense_version": state.dense_version,
        "model_config": state.model_cfg.model_dump(),
        "dense": {k: v.clone() for k, v in state.model.state_dict().items()},
        "users": table(users),
        "items": table(items),
        "item_category": cats,
        "item_content": content,
        "categories": sorted(state.categories, key=state.categories.__getitem__),
        "removed_items": list(state.removed_items),
        "offsets": offsets,
        "event_time_ms": state.event_time_ms,
        "histories": {u: list(h) for u, h in state.histories.items()},
        "extra": {
            "dense_optimizer": state.dense_optimizer.state_dict(),
            "category_index": dict(state.categories),
            "nightly_done": list(state.nightly_done),
            "generator": state.generator.get_state(),
            "profiles": {u: torch.from_numpy(p) for u, p in state.profiles.items()},
            "catalog_ids": list(state.catalog),
            "catalog_category": torch.tensor([c for c, _ in state.catalog.values()], dtype=torch.int64),
            "catalog_content": torch.from_numpy(np.stack([f for _, f in state.catalog.values()])),
            "hard_negative_requests": {rid: [sorted(e.shown), list(e.not_shown)] for rid, e in state.requests.items()},
            "hard_negative_counts": dict(state.hard_counts),
            "applied_above": {"events:0": [3]},
        },
        "format": 1,
    }


def test_a_format_1_checkpoint_still_loads_and_resumes(tmp_path: Path) -> None:
    state = _state()
    torch.save(_format_1(state, {"events:0": 60}), checkpoint.path_in(tmp_path))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.offsets == {"events:0": 60}
    assert loaded.extra["applied_above"] == {"events:0": [3]}
    assert not {"profiles", "catalog_ids", "hard_negative_requests"} & loaded.extra.keys()
    _assert_same_state(state, TrainerState.from_checkpoint(loaded, state.tcfg))
    # and it is written back in the current format
    checkpoint.save(tmp_path, loaded)
    again = checkpoint.load(tmp_path)
    assert again is not None and again.format == checkpoint.FORMAT
    _assert_same_state(state, TrainerState.from_checkpoint(again, state.tcfg))


def _format_2(state: TrainerState, offsets: dict[str, int]) -> dict[str, Any]:
    """What the format-2 code wrote: today's columns, but the histories' item ids as a ragged
    string column, every int64 column as int64, the item rows' side features written out."""
    ckpt = state.to_checkpoint(offsets)
    data = checkpoint.encode(ckpt)
    del data["item_catalog_row"], data["history_overflow"]
    data["item_category"], data["item_content"] = ckpt.item_category, ckpt.item_content
    for name, table in (("users", ckpt.users), ("items", ckpt.items)):
        for col in ("count", "last_seen_ms", "updated_seq"):
            data[name][col] = getattr(table, col)
    hist = state.histories
    users = list(hist)
    data["histories"] = {
        "items": Ragged.from_lists(users, [[i for i, _ in hist[u]] for u in users]).encode(),
        "ts_ms": torch.tensor([t for u in users for _, t in hist[u]], dtype=torch.int64),
    }
    data["format"] = 2
    return data


def test_a_format_2_checkpoint_still_loads_and_resumes(tmp_path: Path) -> None:
    state = _state()
    torch.save(_format_2(state, {"events:0": 60}), checkpoint.path_in(tmp_path))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.offsets == {"events:0": 60}
    assert loaded.histories.as_dict() == dict(state.histories.items())
    _assert_same_state(state, TrainerState.from_checkpoint(loaded, state.tcfg))
    checkpoint.save(tmp_path, loaded)
    again = checkpoint.load(tmp_path)
    assert again is not None and again.format == checkpoint.FORMAT
    _assert_same_state(state, TrainerState.from_checkpoint(again, state.tcfg))


def test_history_times_beyond_the_int32_span_are_written_as_int64(tmp_path: Path) -> None:
    state = _state()
    state.histories["u-old"] = [("i1", 5), ("i2", 2**40)]  # a span of more than 2^32 ms
    checkpoint.save(tmp_path, state.to_checkpoint({}))
    data = torch.load(checkpoint.path_in(tmp_path), weights_only=True)
    assert isinstance(data["histories"]["ts_ms"], torch.Tensor)  # not narrowed to int32 offsets
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.histories.as_dict() == dict(state.histories.items())


def test_unknown_formats_and_inconsistent_columns_are_refused(tmp_path: Path) -> None:
    torch.save({"format": 99}, checkpoint.path_in(tmp_path))
    with pytest.raises(ValueError, match="format 99"):
        checkpoint.load(tmp_path)
    data = checkpoint.encode(_state().to_checkpoint({}))
    data["users"]["emb"] = data["users"]["emb"][:-1]  # one row short of the ids
    torch.save(data, checkpoint.path_in(tmp_path))
    with pytest.raises(ValueError, match=r"users\.emb"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("strings", [[], [""], ["a", "", "bc"], ["日本", "x\0y", ""], ["\0"]])
def test_packed_strings_round_trip(strings: list[str]) -> None:
    packed = pack_strings(strings)
    assert ("ends" in packed) == any("\0" in s for s in strings)
    assert unpack_strings(packed) == strings


def test_packed_strings_refuse_a_wrong_count() -> None:
    packed = pack_strings(["a", "b", "c"])
    with pytest.raises(ValueError):
        unpack_strings({**packed, "count": 2})
    with pytest.raises(ValueError):
        unpack_strings({**packed, "utf8": torch.zeros(3)})  # not bytes
    odd = pack_strings(["x\0", "y"])
    with pytest.raises(ValueError):
        PackedStrings.decode({**odd, "ends": torch.tensor([2, 9])}, "odd").unpack()


def test_ragged_lists_round_trip_and_check_offsets() -> None:
    ragged = Ragged.from_lists(["k1", "k2", "k3"], [["a", "b"], [], ["a"]])
    assert ragged.lists() == [["a", "b"], [], ["a"]]
    decoded = Ragged.decode(ragged.encode(), "r")
    assert decoded.keys == ["k1", "k2", "k3"] and decoded.lists() == ragged.lists()
    bad = {**ragged.encode(), "offsets": torch.tensor([0, 2, 1, 3])}
    with pytest.raises(ValueError, match="ascending"):
        Ragged.decode(bad, "r")


def test_item_side_is_written_once_and_gathered_on_load(tmp_path: Path) -> None:
    state = _state()
    del state.catalog["i3"]  # a freed catalogue slot: positions are renumbered
    state.apply_catalog(CatalogItem("late", "c9", [7.0, 7.0, 7.0], 0))
    ckpt = state.to_checkpoint({})
    data = checkpoint.encode(ckpt)
    assert "item_content" not in data and data["item_catalog_row"].dtype == torch.int32
    checkpoint.save(tmp_path, ckpt)
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and torch.equal(loaded.item_content, ckpt.item_content)
    assert torch.equal(loaded.item_category, ckpt.item_category)
    for row, item in enumerate(loaded.items.ids):
        side = state.catalog.get(item)
        assert int(loaded.item_category[row]) == (side[0] if side else 0)
        assert np.array_equal(loaded.item_content[row].numpy(), side[1] if side else np.zeros(3))
    _assert_same_state(state, TrainerState.from_checkpoint(loaded, state.tcfg))
    ckpt.item_catalog_row = None  # a checkpoint built elsewhere: its item side is written as it is
    ckpt.item_content = ckpt.item_content + 1.0
    checkpoint.save(tmp_path, ckpt)
    again = checkpoint.load(tmp_path)
    assert again is not None and torch.equal(again.item_content, ckpt.item_content)


def test_int64_columns_are_narrowed_only_when_they_fit() -> None:
    for values in ([], [5], [-(2**40), -(2**40) + 2**32 - 1], [0, 2**32]):
        column = torch.tensor(values, dtype=torch.int64)
        encoded = checkpoint._encode_int64(column)
        assert isinstance(encoded, dict) == (len(values) > 0 and max(values) - min(values) < 2**32)
        assert torch.equal(checkpoint._decode_int64(encoded, "c"), column)


def test_history_columns_refuse_codes_outside_the_vocabulary(tmp_path: Path) -> None:
    data = checkpoint.encode(_state().to_checkpoint({}))
    data["histories"]["codes"] = data["histories"]["codes"] + 1000
    torch.save(data, checkpoint.path_in(tmp_path))
    with pytest.raises(ValueError, match="vocabulary"):
        checkpoint.load(tmp_path)


def test_history_columns_behave_as_bounded_deques() -> None:
    hist = HistoryColumns(3)
    ref: dict[str, deque[tuple[str, int]]] = {}
    rng = np.random.default_rng(0)
    for n in range(3000):
        user, item = f"u{rng.integers(0, 40)}", f"i{rng.integers(0, 2000)}"
        held = ref.setdefault(user, deque(maxlen=3))
        assert hist.append(user, item, n) == (held[0] if len(held) == 3 else None)  # what falls out
        held.append((item, n))
        if n % 700 == 0:  # a checkpoint: the vocabulary is compacted once it has doubled
            assert HistoryColumns.from_columns(hist.to_columns(), 3) == _plain(ref)
    del hist["u1"]
    del ref["u1"]
    hist["u-new"] = ref["u-new"] = deque([("a", 1), ("b", 2), ("c", 3), ("d", 4)], maxlen=3)
    hist["u2"] = ref["u2"] = deque([("x", 9)], maxlen=3)
    assert hist == _plain(ref) and hist["u-new"] == [("b", 2), ("c", 3), ("d", 4)]
    assert len(hist.vocab) < 2000  # ids no history holds any more were dropped
    cols = hist.to_columns()
    assert cols.as_dict() == _plain(ref) and HistoryColumns.from_columns(cols, 3) == _plain(ref)
    assert HistoryColumns.from_columns(cols, 2) == {u: list(h)[-2:] for u, h in ref.items()}  # newest kept


def test_a_late_click_takes_its_place_in_a_history_by_event_time() -> None:
    """As the retriever orders a stored history: a click released after newer ones (late) is not
    the newest, and one older than a full history holds is not kept."""
    rng = np.random.default_rng(1)
    for trial in range(2000):
        length = int(rng.integers(1, 6))
        hist, ref = HistoryColumns(length), []
        for _ in range(int(rng.integers(0, 15))):
            item, ts = f"i{rng.integers(0, 9)}", int(rng.integers(0, 20))
            hist.append("u", item, ts)
            ref = sorted([*ref, (item, ts)], key=lambda entry: entry[1])[-length:]  # stable: after equal times
            assert hist["u"] == ref, trial
    hist = HistoryColumns(3)
    for item, ts in [("a", 10), ("b", 30), ("c", 20), ("d", 5), ("e", 30)]:
        hist.append("u", item, ts)
    assert hist["u"] == [("c", 20), ("b", 30), ("e", 30)]


def _plain(histories: dict[str, deque[tuple[str, int]]]) -> dict[str, list[tuple[str, int]]]:
    return {u: list(h) for u, h in histories.items()}


def test_history_times_are_rebased_then_widened_as_their_span_grows(tmp_path: Path) -> None:
    hist = HistoryColumns(2)
    ref: dict[str, deque[tuple[str, int]]] = {}
    for n, ts in enumerate([1_700_000_000_000, 1_700_000_000_000 - 2**31, 1_700_000_000_000 + 2**31, 5]):
        user = f"u{n % 2}"
        hist.append(user, "i", ts)
        ref[user] = deque(sorted([*ref.get(user, ()), ("i", ts)], key=lambda entry: entry[1]), maxlen=2)
        assert hist == _plain(ref) and HistoryColumns.from_columns(hist.to_columns(), 2) == _plain(ref)
        expect_int32 = n < 2  # the span passes 2^32 ms at the third time
        assert (hist.times.dtype == np.int32) == expect_int32
        assert (hist.to_columns().ts_offsets.dtype == torch.int32) == expect_int32
    state = _state()
    state.histories = hist
    checkpoint.save(tmp_path, state.to_checkpoint({}))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.histories.as_dict() == _plain(ref)


def test_a_row_update_holds_only_the_rows_changed_since_and_a_full_save_deletes_them(tmp_path: Path) -> None:
    state = _state()
    checkpoint.save(tmp_path, state.to_checkpoint({"events:0": 60}))
    since = base = state.seq
    user = next(u for u in state.users.ids if u is not None)
    state.learn(state.observe_clicks([Interaction("x1", "rx", user, "i3", CLICK, 0, DAY_MS * 5)]), dense=False)
    state.apply_catalog(CatalogItem("i-new", "c9", [7.0, 8.0, 9.0], DAY_MS * 5))
    state.items.add("gone", 0, state.next_seq)
    state.expire(DAY_MS * 11 // 2)  # "gone" (never seen) expires
    state.seq += 1  # the write's seq: what next_seq was while the rows changed
    update = state.to_row_update(since, base)

    assert update.base_seq == base and update.seq == state.seq and update.offsets == {}
    assert user in update.users.ids and len(update.users.ids) < len(state.users)  # only the changed rows
    assert "i-new" in update.items.ids and "gone" not in update.items.ids and len(update.items.ids) < len(state.items)
    assert bool((update.users.updated_seq == state.seq).all()) and bool((update.items.updated_seq == state.seq).all())
    row = update.items.ids.index("i-new")
    assert int(update.item_category[row]) == state.categories["c9"]
    np.testing.assert_array_equal(update.item_content[row].numpy(), [7.0, 8.0, 9.0])
    assert update.removed_items == [(state.seq, "gone")]  # the removals after `since` only
    assert update.histories.users == [] and update.profiles.ids == [] and update.catalog.ids == []

    path = checkpoint.save_row_update(tmp_path, update)
    assert checkpoint.row_updates(tmp_path) == [(update.seq, path)]
    loaded = checkpoint.load_row_update(path)
    assert loaded is not None and loaded.base_seq == base and loaded.users.ids == update.users.ids
    torch.testing.assert_close(loaded.users.emb, update.users.emb, rtol=0, atol=0)
    torch.testing.assert_close(loaded.item_content, update.item_content, rtol=0, atol=0)
    assert loaded.removed_items == update.removed_items
    with pytest.raises(ValueError, match="base_seq"):
        checkpoint.save_row_update(tmp_path, state.to_checkpoint({}))  # a full state is not a row update
    with pytest.raises(ValueError, match="not a row update"):
        checkpoint.load_row_update(checkpoint.path_in(tmp_path))

    checkpoint.save(tmp_path, state.to_checkpoint({"events:0": 61}))  # a full checkpoint supersedes them all
    assert checkpoint.row_updates(tmp_path) == []
    assert checkpoint.load_row_update(path) is None  # gone: a reader skips it
