"""The id table the snapshots carry ids in (twotower.id_table): lookups both ways, its checks."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from twotower.blobs import BlobError, Rows, pack_rows, unpack_rows, unpack_rows_gently
from twotower.id_table import LONG_ID_SHARE, IdTable, IdTableError


def mixed_ids(n: int, seed: int = 0) -> list[str]:
    """Ids of many lengths and scripts, a few of them far longer than the rest."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        base = f"{['i', 'é', '項目', 'x' * 3][j % 4]}{j}"
        out.append(base * int(rng.integers(60, 90)) if j % 997 == 5 else base)
    return out


def test_lookups_agree_with_a_dict_both_ways() -> None:
    ids = mixed_ids(5000)
    table = IdTable.of(ids)
    assert len(table) == 5000 and list(table) == ids == table.tolist()
    by_id = {item_id: pos for pos, item_id in enumerate(ids)}
    keys = [*ids[::7], "absent", "i", "é" * 200, "", "a\x00b", "\ud800", ids[5] + "x", ids[4][:-1]]
    assert table.positions(keys) == [by_id.get(k) for k in keys]
    assert [table.position(k) for k in keys[:50]] == [by_id.get(k) for k in keys[:50]]
    positions = list(range(0, 5000, 3))
    assert table.ids_at(positions) == [ids[p] for p in positions]
    assert table[5] == ids[5] and table[-1] == ids[-1] and table[2:6] == ids[2:6]
    assert ids[5] in table and "absent" not in table and 5 not in table
    with pytest.raises(IndexError):
        table[5000]


def test_long_ids_are_few_and_kept_apart() -> None:
    ids = mixed_ids(5000)
    table = IdTable.of(ids)
    width = table.to_map()["ranked"].shape[1]
    long = {item_id for _, item_id in table.to_map()["long"]}
    assert 0 < len(long) <= LONG_ID_SHARE * len(ids) + 1
    assert all(len(item_id.encode()) > width for item_id in long)
    assert width == max(len(i.encode()) for i in ids if i not in long)  # the longest of the rest
    one = IdTable.of(["only" * 50])  # a single id is its own width
    assert one.to_map()["long"] == [] and one.position("only" * 50) == 0


def test_bad_ids_are_refused() -> None:
    for bad in (["a", "b", "a"], ["a", ""], ["a", "b\x00"], ["a", 3]):
        with pytest.raises(IdTableError):
            IdTable.of(bad)  # type: ignore[arg-type]
    with pytest.raises(BlobError):
        pack_rows(Rows(["a", "a"], np.zeros((2, 1), dtype=np.float32)))
    empty = IdTable.of([])
    assert len(empty) == 0 and empty.positions(["a"]) == [None] and empty.ids_at([]) == []


def test_a_corrupt_table_in_a_part_is_refused_not_served() -> None:
    rows = Rows(mixed_ids(3000), np.zeros((3000, 2), dtype=np.float32))
    raw = msgpack.unpackb(pack_rows(rows))

    def variant(**ids: object) -> bytes:
        return msgpack.packb({**raw, "ids": {**raw["ids"], **ids}})

    def array(name: str) -> np.ndarray:
        spec = raw["ids"][name]
        return np.frombuffer(spec["data"], dtype=spec["dtype"]).reshape(spec["shape"]).copy()

    def replaced(name: str, value: np.ndarray) -> dict:
        return {**raw["ids"][name], "data": value.tobytes()}

    order, ranked = array("order"), array("ranked")
    unsorted = ranked.copy()
    unsorted[[100, 200]] = unsorted[[200, 100]]
    repeated = order.copy()
    repeated[7] = repeated[8]
    outside = order.copy()
    outside[0] = len(order)

    long = raw["ids"]["long"]
    bad = [
        variant(ranked=replaced("ranked", unsorted)),
        variant(order=replaced("order", repeated)),
        variant(order=replaced("order", outside)),
        variant(long=long[1:]),
        variant(long=[*long, [3, "x" * 500]]),
        variant(long=[[long[0][0], "short"], *long[1:]]),
        variant(long="nope"),
        variant(ranked={**raw["ids"]["ranked"], "dtype": "float32", "shape": [0]}),
        msgpack.packb({**raw, "ids": ["a", "b"]}),
    ]
    for payload in bad:
        with pytest.raises(BlobError):
            unpack_rows(payload)
        with pytest.raises(BlobError):
            unpack_rows_gently(payload)
    assert unpack_rows(variant()).ids == rows.ids


def test_remembered_lookups_give_the_same_answers_also_when_the_memo_overflows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from twotower import id_table

    ids = mixed_ids(2000)
    by_id = {item_id: pos for pos, item_id in enumerate(ids)}
    rng = np.random.default_rng(1)
    for memo_max in (id_table.MEMO_MAX, 7):
        monkeypatch.setattr(id_table, "MEMO_MAX", memo_max)
        table = IdTable.of(ids)
        for _ in range(20):
            keys = [ids[j] if j < 2000 else f"absent{j}" for j in rng.integers(0, 2300, 15)]
            assert table.positions(keys) == [by_id.get(k) for k in keys]
            positions = [int(p) for p in rng.integers(0, 2000, 15)]
            assert table.ids_at(positions) == [ids[p] for p in positions]


def test_remembered_keys_are_answered_without_a_search(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = mixed_ids(3000)
    table = IdTable.of(ids)
    keys = [ids[j] for j in range(0, 3000, 11)] + ["gone"]
    table.remember(keys)

    def no_search(self: IdTable, keys: list[str]) -> list[int]:
        raise AssertionError(f"searched for {keys[:3]}")

    monkeypatch.setattr(IdTable, "_search", no_search)
    by_id = {item_id: pos for pos, item_id in enumerate(ids)}
    assert table.positions(keys) == [by_id.get(k) for k in keys]
    assert table.ids_at([by_id[k] for k in keys[:-1]]) == keys[:-1]  # and the ids at their positions
