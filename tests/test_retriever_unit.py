"""Unit tests of the retriever's serving state (no Redis): pooling, search, deltas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import faiss
import msgpack
import numpy as np
import pytest
import torch

from publisher import index as ix
from retriever import malloc
from retriever.app import HistoryEvent, _merge_history, decode_history, decode_profile
from retriever.cli import clear_metrics_dir
from retriever.state import ServingState
from twotower.blobs import BlobError, Rows
from twotower.config import ModelConfig, RetrieverConfig
from twotower.model import TwoTower, context_matrix, dense_arrays, fit_features, pool_history
from twotower.snapshot_parts import DeltaSnapshot, FullSnapshot
from twotower.snapshots import FULL, SnapshotError, VersionMeta

CFG = ModelConfig(
    dim=8, id_dim=4, hidden=16, n_categories=4, content_dim=2, profile_dim=3, history_len=4, history_half_life_s=60.0
)
N_ITEMS = 40
NOW_MS = 1_700_000_000_000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def build_index(vectors: np.ndarray, kind: str) -> bytes:
    if kind == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
    elif kind == "ivf":
        index = faiss.index_factory(vectors.shape[1], "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1
        index.train(vectors)
        index.nprobe = 4  # every list: exact
        index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    elif kind == "hnsw":
        index = faiss.index_factory(vectors.shape[1], "IDMap,HNSW16", faiss.METRIC_INNER_PRODUCT)
        index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    elif kind == "hnsw-float16":  # as the publisher builds it by default
        index = ix.build_index(vectors, np.arange(len(vectors)), ix.HNSW, hnsw_m=16, recall_queries=0)
    else:
        index = faiss.index_factory(vectors.shape[1], "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
        index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return faiss.serialize_index(index).tobytes()


def make_full(seed: int = 0, kind: str = "idmap", n_items: int = N_ITEMS) -> FullSnapshot:
    torch.manual_seed(seed)
    model = TwoTower(CFG)
    rng = np.random.default_rng(seed)
    items = unit(rng.standard_normal((n_items, CFG.dim)))
    users = rng.standard_normal((5, CFG.id_dim)).astype(np.float32)
    return FullSnapshot(
        model_config=CFG,
        weights=dense_arrays(model),
        users=Rows([f"u{j}" for j in range(5)], users),
        items=Rows([f"i{j}" for j in range(n_items)], items),
        index=build_index(items, kind),
    )


def meta(version: int = 1) -> VersionMeta:
    return VersionMeta(version=version, kind=FULL, parent=None, base=version, created_ms=123, trainer_seq=0)


def category(item_id: str) -> str:
    return f"c{int(item_id[1:]) % 3}"


def lookup(ids):
    return [category(i) for i in ids]


def brute_force(state: ServingState, vec: np.ndarray, k: int, exclude=()) -> list[tuple[str, float]]:
    pairs = [(item_id, float(state.item_vectors[pos] @ vec)) for item_id, pos in state.item_pos.items()]
    pairs = [p for p in pairs if p[0] not in exclude]
    return sorted(pairs, key=lambda p: -p[1])[:k]


def assert_same_ranking(got, want) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5, atol=1e-6)


@pytest.fixture
def snap() -> FullSnapshot:
    return make_full()


@pytest.fixture
def state(snap: FullSnapshot) -> ServingState:
    return ServingState.from_full(meta(), snap)


def delta(users=None, items=None, removed=()) -> DeltaSnapshot:
    return DeltaSnapshot(
        users=users or Rows.empty(CFG.id_dim), items=items or Rows.empty(CFG.dim), removed_items=list(removed)
    )


# --- user vector --------------------------------------------------------------------------------
def test_user_vector_matches_the_tower_on_pooled_known_history(state: ServingState, snap: FullSnapshot) -> None:
    history = [("i3", NOW_MS - 1_000), ("nope", NOW_MS - 2_000), ("i7", NOW_MS - 90_000)]
    profile = [0.5, -1.0]
    got = state.user_vector("u2", history, profile, NOW_MS)

    pooled = pool_history(snap.items.matrix[[7, 3]], np.array([NOW_MS - 90_000, NOW_MS - 1_000]), NOW_MS, CFG)
    with torch.no_grad():
        want = state.model.user(
            torch.from_numpy(snap.users.matrix[2:3].copy()),
            torch.from_numpy(fit_features(profile, CFG.profile_dim))[None],
            torch.from_numpy(pooled)[None],
            None,
            context_matrix(CFG, [NOW_MS], [None]),  # the request's time; no dense context
        )[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (CFG.dim,)
    assert abs(np.linalg.norm(got) - 1.0) < 1e-5


def test_user_vector_skips_unknown_items_and_pools_only_history_len(state: ServingState) -> None:
    known = [("i1", NOW_MS - 10), ("i2", NOW_MS - 20), ("i3", NOW_MS - 30), ("i4", NOW_MS - 40)]
    base = state.user_vector("u0", known, None, NOW_MS)
    older = [*known, ("i9", NOW_MS - 50)]  # beyond history_len=4: ignored
    np.testing.assert_allclose(state.user_vector("u0", older, None, NOW_MS), base, atol=1e-6)
    unknown_first = [("zz", NOW_MS), *known[:3]]  # window of 4 → zz (skipped) + 3 known
    np.testing.assert_allclose(
        state.user_vector("u0", unknown_first, None, NOW_MS),
        state.user_vector("u0", known[:3], None, NOW_MS),
        atol=1e-6,
    )
    assert not np.allclose(base, state.user_vector("u0", [], None, NOW_MS))


def test_recent_view_takes_the_newest_history_items(state: ServingState, snap: FullSnapshot) -> None:
    """Serving reads histories newest first, the trainer oldest first: the recent view must take the
    same (newest) items either way."""
    assert CFG.recent_len == 3 and CFG.history_len == 4
    history = [(f"i{k}", NOW_MS - 1_000 * k) for k in (1, 2, 3, 4, 5)]  # newest first
    got = state.user_vector("u1", history, None, NOW_MS)
    oldest_first = [4, 3, 2, 1]  # the newest history_len, reversed
    pooled = pool_history(
        snap.items.matrix[oldest_first], np.array([NOW_MS - 1_000 * k for k in oldest_first]), NOW_MS, CFG
    )
    np.testing.assert_allclose(pooled[CFG.dim :], snap.items.matrix[[3, 2, 1]].mean(axis=0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        want = state.model.user(
            torch.from_numpy(snap.users.matrix[1:2].copy()),
            torch.zeros(1, CFG.profile_dim),
            torch.from_numpy(pooled)[None],
            None,
            context_matrix(CFG, [NOW_MS], [None]),
        )[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_user_gets_a_zero_id_row(state: ServingState) -> None:
    history = [("i5", NOW_MS)]
    got = state.user_vector("stranger", history, None, NOW_MS)
    with torch.no_grad():
        want = state.model.user(
            torch.zeros(1, CFG.id_dim),
            torch.zeros(1, CFG.profile_dim),
            torch.from_numpy(pool_history(state.item_vectors[5:6], np.array([NOW_MS]), NOW_MS, CFG))[None],
            None,
            context_matrix(CFG, [NOW_MS], [None]),
        )[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --- search -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["idmap", "flat", "ivf"])
def test_exact_top_k_equals_brute_force(kind: str) -> None:
    state = ServingState.from_full(meta(), make_full(kind=kind))
    for user in ("u0", "u1", "newbie"):
        vec = state.user_vector(user, [("i0", NOW_MS)], None, NOW_MS)
        assert_same_ranking(state.search(vec, 10), brute_force(state, vec, 10))
    assert len(state.search(vec, 1000)) == N_ITEMS


def test_search_excludes_and_still_fills_k(state: ServingState) -> None:
    vec = state.user_vector("u1", [], None, NOW_MS)
    top = [i for i, _ in state.search(vec, 5)]
    exclude = {*top, "not-an-item"}
    got = state.search(vec, 5, exclude)
    assert len(got) == 5
    assert not exclude & {i for i, _ in got}
    assert_same_ranking(got, brute_force(state, vec, 5, exclude))


def test_category_filter(state: ServingState) -> None:
    vec = state.user_vector("u1", [], None, NOW_MS)
    got = state.search(vec, 5, {"i1"}, category_filter={"c1"}, item_category=lookup)
    assert len(got) == 5
    assert all(category(i) == "c1" for i, _ in got)
    want = [p for p in brute_force(state, vec, N_ITEMS, {"i1"}) if category(p[0]) == "c1"][:5]
    assert_same_ranking(got, want)
    # a category with fewer items than k: all of them, nothing else
    assert {i for i, _ in state.search(vec, 50, category_filter={"c2"}, item_category=lookup)} == {
        i for i in state.item_pos if category(i) == "c2"
    }
    assert state.search(vec, 5, category_filter={"none"}, item_category=lookup) == []
    with pytest.raises(ValueError, match="item_category"):
        state.search(vec, 5, category_filter={"c1"})


def test_diversity_cap(state: ServingState) -> None:
    vec = state.user_vector("u3", [], None, NOW_MS)
    got = state.search(vec, 6, item_category=lookup, max_per_category=2)
    assert len(got) == 6
    counts = {}
    for item_id, _ in got:
        counts[category(item_id)] = counts.get(category(item_id), 0) + 1
    assert max(counts.values()) <= 2
    # soft cap: one category only → the best capped-out items fill k, ranked
    got = state.search(vec, 4, category_filter={"c0"}, item_category=lookup, max_per_category=1)
    want = [p for p in brute_force(state, vec, N_ITEMS) if category(p[0]) == "c0"][:4]
    assert_same_ranking(got, want)


def test_search_rejects_a_wrong_vector_shape(state: ServingState) -> None:
    with pytest.raises(ValueError, match="shape"):
        state.search(np.zeros(3, dtype=np.float32), 5)


@pytest.mark.parametrize("kind", ["hnsw", "hnsw-float16"])
def test_scores_are_the_cosines_even_from_an_index_of_float16_codes(kind: str) -> None:
    state = ServingState.from_full(meta(), make_full(kind=kind))
    assert state.rescore is (kind == "hnsw-float16")
    queries = unit(np.random.default_rng(3).standard_normal((20, CFG.dim)))
    codes_off = 0.0
    for q in queries:
        top = state.search(q, 10)
        exact = {item: float(state.item_vectors[state.item_pos[item]] @ q) for item, _ in top}
        np.testing.assert_allclose([s for _, s in top], [exact[i] for i, _ in top], rtol=1e-5, atol=1e-6)
        assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
        scores, ids = state.index.search(q[None], 10)
        off = [abs(float(s) - float(state.item_vectors[pos] @ q)) for s, pos in zip(scores[0], ids[0], strict=True)]
        codes_off = max(codes_off, *off)
    # the index's own scores: exact from float32 vectors, near from float16 codes
    assert (codes_off > 1e-6) is (kind == "hnsw-float16"), codes_off
    assert codes_off < 5e-3


# --- deltas -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["idmap", "flat", "ivf", "hnsw", "hnsw-float16"])
def test_delta_adds_a_retrievable_item_and_leaves_the_old_state_alone(kind: str) -> None:
    old = ServingState.from_full(meta(), make_full(kind=kind))
    vec = old.user_vector("u0", [], None, NOW_MS)
    old_top = old.search(vec, 5)
    old_vectors = old.item_vectors.copy()

    new = old.apply_delta(delta(items=Rows(["fresh"], vec[None].copy())), version=2, created_ms=456)

    assert new.version == 2 and new.base == 1 and new.created_ms == 456
    top = new.search(vec, 5)
    assert top[0][0] == "fresh" and top[0][1] == pytest.approx(1.0, abs=1e-5)
    assert_same_ranking(top, brute_force(new, vec, 5))
    assert new.n_items == N_ITEMS + 1
    # the old state is untouched
    assert old.version == 1 and old.n_items == N_ITEMS and "fresh" not in old.item_pos
    assert len(old.item_ids) == N_ITEMS and old.index.ntotal == N_ITEMS
    np.testing.assert_array_equal(old.item_vectors, old_vectors)
    assert old.search(vec, 5) == old_top
    # the new item now counts in history pooling
    assert not np.allclose(new.user_vector("u0", [("fresh", NOW_MS)], None, NOW_MS), vec)


@pytest.mark.parametrize("kind", ["idmap", "flat", "ivf", "hnsw", "hnsw-float16"])
def test_delta_replaces_a_changed_item_vector(kind: str) -> None:
    state = ServingState.from_full(meta(), make_full(kind=kind))
    vec = state.user_vector("u0", [], None, NOW_MS)
    first, last = brute_force(state, vec, N_ITEMS)[0][0], brute_force(state, vec, N_ITEMS)[-1][0]
    moved = state.apply_delta(delta(items=Rows([last, first], np.vstack([vec, -vec]))), version=2)
    assert moved.item_pos[last] == state.item_pos[last]  # same position, new vector
    assert moved.n_items == N_ITEMS and moved.overlay is not None and moved.overlay.ntotal == 2
    assert moved.index is state.index  # the base index is shared, never edited
    got = moved.search(vec, N_ITEMS)
    assert got[0][0] == last and got[-1][0] == first  # the stale base vectors are masked out
    want = brute_force(moved, vec, N_ITEMS)
    if kind.startswith("hnsw"):  # a filtered graph search asked for every item may miss one or two
        assert len({i for i, _ in got}) >= N_ITEMS - 2
        want = [w for w in want if w[0] in {i for i, _ in got}]
    assert len({i for i, _ in got}) == len(want)
    assert_same_ranking(got, want)
    assert state.search(vec, 1)[0][0] == first


def test_removed_items_disappear(state: ServingState) -> None:
    vec = state.user_vector("u0", [], None, NOW_MS)
    top3 = [i for i, _ in state.search(vec, 3)]
    new = state.apply_delta(delta(removed=[*top3, "never-existed"]), version=2)
    got = new.search(vec, N_ITEMS)
    assert len(got) == N_ITEMS - 3
    assert not set(top3) & {i for i, _ in got}
    assert new.overlay is None and new.base_filter is not None
    assert new.removed == {state.item_pos[i] for i in top3}
    # a removed item no longer counts in history pooling
    np.testing.assert_allclose(
        new.user_vector("u0", [(top3[0], NOW_MS)], None, NOW_MS), new.user_vector("u0", [], None, NOW_MS), atol=1e-6
    )
    assert {i for i, _ in state.search(vec, 3)} == set(top3)


def test_removed_then_readded_in_one_delta_is_live_at_a_new_position(state: ServingState) -> None:
    vec = state.user_vector("u0", [], None, NOW_MS)
    new = state.apply_delta(delta(items=Rows(["i4"], vec[None].copy()), removed=["i4"]), version=2)
    assert new.item_pos["i4"] == N_ITEMS and state.item_pos["i4"] in new.removed
    assert new.search(vec, 1)[0][0] == "i4"
    assert [i for i, _ in new.search(vec, N_ITEMS)].count("i4") == 1


def test_several_deltas_at_once_equal_one_by_one(state: ServingState) -> None:
    rng = np.random.default_rng(7)
    deltas = [
        delta(items=Rows(["i1", "n1"], unit(rng.standard_normal((2, CFG.dim)))), removed=["i2"]),
        delta(
            users=Rows(["u1", "u9"], rng.standard_normal((2, CFG.id_dim)).astype(np.float32)),
            items=Rows(["n1", "n2"], unit(rng.standard_normal((2, CFG.dim)))),
            removed=["i1"],
        ),
    ]
    stepwise = state.apply_delta(deltas[0], 2).apply_delta(deltas[1], 3)
    at_once = state.apply_deltas(deltas, 3)
    assert at_once.item_pos == stepwise.item_pos and at_once.removed == stepwise.removed
    np.testing.assert_array_equal(at_once.item_vectors, stepwise.item_vectors)
    for user in ("u1", "u9", "u0"):
        vec = at_once.user_vector(user, [("n2", NOW_MS)], None, NOW_MS)
        np.testing.assert_allclose(vec, stepwise.user_vector(user, [("n2", NOW_MS)], None, NOW_MS), atol=1e-6)
        assert_same_ranking(at_once.search(vec, 10), brute_force(at_once, vec, 10))


def test_delta_user_rows_change_the_user_vector(state: ServingState) -> None:
    before = state.user_vector("u9", [], None, NOW_MS)
    row = np.ones((1, CFG.id_dim), dtype=np.float32)
    new = state.apply_delta(delta(users=Rows(["u9", "u0"], np.vstack([row, row]))), version=2)
    assert not np.allclose(new.user_vector("u9", [], None, NOW_MS), before)
    np.testing.assert_allclose(new.user_vector("u0", [], None, NOW_MS), new.user_vector("u9", [], None, NOW_MS))
    assert "u9" not in state.user_rows
    assert new.item_vectors is state.item_vectors and new.index is state.index  # nothing copied for items


def test_bad_parts_are_rejected(snap: FullSnapshot) -> None:
    index = build_index(snap.items.matrix[:5], "idmap")
    short = FullSnapshot(snap.model_config, snap.weights, snap.users, snap.items, index)
    with pytest.raises(SnapshotError, match="index has 5"):
        ServingState.from_full(meta(), short)
    with pytest.raises(SnapshotError, match="not a faiss index"):
        ServingState.from_full(meta(), FullSnapshot(snap.model_config, snap.weights, snap.users, snap.items, b"junk"))
    state = ServingState.from_full(meta(), snap)
    with pytest.raises(SnapshotError, match="widths"):
        state.apply_delta(delta(items=Rows(["x"], np.zeros((1, CFG.dim + 1), dtype=np.float32))), 2)
    with pytest.raises(SnapshotError, match="weights"):
        ServingState.from_full(meta(), FullSnapshot(snap.model_config, {}, snap.users, snap.items, snap.index))


def test_state_arrays_are_read_only(state: ServingState) -> None:
    with pytest.raises(ValueError):
        state.item_vectors[0, 0] = 1.0
    with pytest.raises(ValueError):
        state.user_matrix[0, 0] = 1.0


# --- request helpers ----------------------------------------------------------------------------
def test_decode_history_and_profile_skip_malformed_values() -> None:
    entries = [msgpack.packb(v) for v in (["i1", 5], ["i2"], [3, 4], ["i3", 1], ["i4", True])]
    entries.insert(1, b"\xc1")
    assert decode_history(entries) == [("i1", 5), ("i3", 1)]
    assert decode_profile(msgpack.packb([1, 2.5])) == [1.0, 2.5]
    assert decode_profile(msgpack.packb(["x"])) is None
    assert decode_profile(b"\xc1") is None
    assert decode_profile(None) is None


def test_merge_history_puts_fresh_events_first_and_dedups() -> None:
    stored = [("a", 300), ("b", 200)]
    assert _merge_history([], stored, 1_000) is stored
    fresh = ["x", HistoryEvent(item_id="a", ts_ms=300), HistoryEvent(item_id="y", ts_ms=250)]
    merged = _merge_history(fresh, stored, 1_000)
    assert merged == [("x", 1_000), ("a", 300), ("y", 250), ("b", 200)]


def test_merge_history_orders_a_stored_history_by_event_time() -> None:
    """Redis holds a history in arrival order; a late event goes by its event time, as in the
    trainer's history, so the newest pooled items are the same."""
    late = [("c", 400), ("a", 100), ("b", 300), ("d", 300)]  # "a" arrived late
    assert _merge_history([], late, 1_000) == [("c", 400), ("b", 300), ("d", 300), ("a", 100)]


def test_gentle_rows_decoding_equals_unpack_rows_and_rejects_what_it_rejects() -> None:
    from twotower.blobs import pack_rows, unpack_rows, unpack_rows_gently

    decode = unpack_rows_gently
    rows = Rows([f"i{j}" for j in range(300)], np.random.default_rng(0).standard_normal((300, 5)).astype(np.float32))
    payload = pack_rows(rows)
    got, want = decode(payload), unpack_rows(payload)
    assert list(got.ids) == want.ids == rows.ids
    np.testing.assert_array_equal(got.matrix, want.matrix)
    # ids across several 1 MiB feeds, of many widths (the longest 0.1 % kept apart)
    many = Rows([f"é{j}" * (1 + j % 40) for j in range(60_000)], np.zeros((60_000, 2), dtype=np.float32))
    assert list(decode(pack_rows(many)).ids) == unpack_rows(pack_rows(many)).ids == many.ids
    empty = pack_rows(Rows.empty(3))
    assert decode(empty).matrix.shape == (0, 3)
    bad_payloads = [
        b"",
        b"\xc1",
        payload + b"\x00",
        payload[:-7],
        msgpack.packb({"ids": [1, 2], "matrix": None}),
        msgpack.packb({"ids": ["a"], "other": 1}),
        msgpack.packb({"ids": [["a"], "b"], "matrix": None}),
        msgpack.packb([1, 2]),
        pack_rows(Rows(["a", "b"], np.zeros((2, 2), dtype=np.float32)))[:-1],
    ]
    for bad in bad_payloads:
        with pytest.raises(BlobError):
            decode(bad)
        with pytest.raises(BlobError):
            unpack_rows(bad)


def test_an_ivfpq_base_index_serves_and_takes_new_items_through_the_overlay() -> None:
    from dataclasses import replace

    from publisher import index as ix

    snap = make_full(n_items=300)
    built = ix.build_index(snap.items.matrix, np.arange(300), ix.IVFPQ, nlist=4, nprobe=4, pq_bits=6)
    state = ServingState.from_full(meta(), replace(snap, index=ix.serialize(built)))
    vec = state.user_vector("u0", [], None, NOW_MS)
    top = state.search(vec, 10, {"i1"})
    assert len(top) == 10 and "i1" not in {i for i, _ in top}
    exact = [i for i, _ in brute_force(state, vec, 30)]
    assert len({i for i, _ in top} & set(exact)) >= 5  # approximate, but near the exact top
    new = state.apply_delta(delta(items=Rows(["fresh"], vec[None].copy())), version=2)
    assert new.search(vec, 1)[0][0] == "fresh"  # a new item is live without rebuilding the index
    assert new.index is state.index


def test_tunables_join_the_other_glibc_tunables() -> None:
    huge = malloc.HUGE_PAGES
    assert malloc.tunables_with(None, huge) == "glibc.malloc.hugetlb=1"
    assert malloc.tunables_with("", huge) == "glibc.malloc.hugetlb=1"
    kept = malloc.tunables_with("glibc.malloc.tcache_count=2:glibc.malloc.hugetlb=0", huge)
    assert kept == "glibc.malloc.tcache_count=2:glibc.malloc.hugetlb=1"
    assert malloc.active(huge, {"GLIBC_TUNABLES": kept})
    assert not malloc.active(huge, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not malloc.active(huge, {})
    both = malloc.tunables_with("glibc.malloc.arena_max=4", {**huge, **malloc.RETAIN_FREED})
    assert both.count("arena_max") == 1 and "glibc.malloc.arena_max=1" in both.split(":")
    assert malloc.active(malloc.RETAIN_FREED, {"GLIBC_TUNABLES": both})
    assert not malloc.active(malloc.RETAIN_FREED, {"GLIBC_TUNABLES": kept})


def test_tunables_follow_the_retriever_config() -> None:
    assert malloc.wanted(RetrieverConfig()) == {**malloc.HUGE_PAGES, **malloc.RETAIN_FREED}
    assert malloc.wanted(RetrieverConfig(retain_freed_memory=False)) == malloc.HUGE_PAGES
    assert malloc.wanted(RetrieverConfig(index_huge_pages=False)) == malloc.RETAIN_FREED
    assert malloc.wanted(RetrieverConfig(index_huge_pages=False, retain_freed_memory=False)) == {}


_FREE_IN_A_THREAD = """
import threading
import numpy as np

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20

def work():
    before = rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, allocated and freed by a thread, as the watcher does
    del block
    print(rss_mb() - before)

thread = threading.Thread(target=work)
thread.start()
thread.join()
"""


@pytest.mark.parametrize("retain", [True, False])
def test_freed_memory_stays_in_the_process_with_the_tunables(retain: bool) -> None:
    if not malloc.supported():
        pytest.skip("glibc tunables need Linux with glibc")
    env = {k: v for k, v in os.environ.items() if k != malloc.ENV}
    if retain:
        env[malloc.ENV] = malloc.tunables_with(None, malloc.RETAIN_FREED)
    kept_mb = int(
        subprocess.run(
            [sys.executable, "-c", _FREE_IN_A_THREAD], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    # with the tunables the freed 64 MiB are still resident (ready for the next version);
    # without them glibc unmapped the block when it was freed
    assert (kept_mb >= 60) is retain, kept_mb


def test_a_given_metrics_directory_is_cleared_of_an_earlier_runs_files(tmp_path: Path) -> None:
    for name in ("counter_123.db", "gauge_liveall_456.db", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert clear_metrics_dir(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
