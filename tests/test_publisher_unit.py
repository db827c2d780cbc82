"""Unit tests of the publisher: Faiss indexes, snapshot building, publish planning (no services)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from kafka.errors import KafkaError
from prometheus_client import REGISTRY

from publisher import index as ix
from publisher import serving_state
from publisher.build import (
    category_indices,
    content_only_vectors,
    delta_snapshot,
    full_snapshot,
    is_empty,
    item_vectors,
    model_from_checkpoint,
)
from publisher.daemon import SKIP, Published, PublisherDaemon, compaction_allowed, plan_publish, weight_checksums
from publisher.serving_state import decode_history_entry, encode_history_entry, encode_profile
from twotower.checkpoint import Checkpoint, TableState
from twotower.config import Config, ModelConfig
from twotower.events import CatalogItem
from twotower.model import TwoTower
from twotower.snapshot_parts import decode_delta, decode_full, encode_delta, encode_full
from twotower.snapshots import DELTA, FULL, SnapshotLayout

MODEL = ModelConfig(dim=8, id_dim=4, hidden=16, n_categories=4, content_dim=3, profile_dim=2, history_len=5)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, clusters: int = 30, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres (item vectors cluster by category)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(clusters, d)))
    return unit(centres[rng.integers(0, clusters, n)] + rng.normal(scale=0.35, size=(n, d)))


def table(ids: list[str], dim: int, updated: list[int], seed: int, scale: float = 0.1) -> TableState:
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    return TableState(
        ids=list(ids),
        emb=torch.randn(n, dim, generator=g) * scale,
        accum=torch.zeros(n),
        count=torch.ones(n, dtype=torch.int64),
        last_seen_ms=torch.zeros(n, dtype=torch.int64),
        updated_seq=torch.tensor(updated, dtype=torch.int64),
    )


def make_checkpoint(
    seq: int = 3,
    dense_version: int = 1,
    users: int = 5,
    item_categories: tuple[int, ...] = (1, 1, 2, 2, 3, 0),
    user_updated: list[int] | None = None,
    item_updated: list[int] | None = None,
    removed: list[tuple[int, str]] | None = None,
    seed: int = 0,
) -> Checkpoint:
    """A small, hand-made trainer checkpoint (ID rows small, category embeddings strong)."""
    torch.manual_seed(seed)
    model = TwoTower(MODEL)
    with torch.no_grad():
        model.item.category.weight.normal_(0.0, 1.0)
    n_items = len(item_categories)
    user_ids = [f"u{i}" for i in range(users)]
    item_ids = [f"i{i}" for i in range(n_items)]
    g = torch.Generator().manual_seed(seed + 1)
    return Checkpoint(
        seq=seq,
        dense_version=dense_version,
        model_config=MODEL.model_dump(),
        dense={k: v.clone() for k, v in model.state_dict().items()},
        users=table(user_ids, MODEL.id_dim, user_updated or [1] * users, seed + 2),
        items=table(item_ids, MODEL.id_dim, item_updated or [1] * n_items, seed + 3, scale=0.05),
        item_category=torch.tensor(item_categories, dtype=torch.int64),
        item_content=torch.rand(n_items, MODEL.content_dim, generator=g) * 0.1,
        categories=["books", "music", "games"],
        removed_items=removed or [],
        offsets={"events:0": 10},
        event_time_ms=1_700_000_000_000,
        histories={},
    )


# ---------------------------------------------------------------- index


def test_flat_index_is_exact_and_returns_ids() -> None:
    x = clustered(500, 16)
    ids = np.arange(1000, 1500)
    index = ix.build_index(x, ids)
    assert ix.index_kind(index) == ix.FLAT and index.ntotal == 500
    scores, found = index.search(x[:20], 5)
    exact = np.argsort(-(x[:20] @ x.T), axis=1)[:, :5] + 1000
    assert (found[:, 0] == ids[:20]).all()
    np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(exact, axis=1))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert REGISTRY.get_sample_value("twotower_publisher_index_recall") == 1.0


@pytest.mark.parametrize(
    ("kind", "options", "tolerance"),
    [(ix.HNSW, {}, 0.95), (ix.HNSW, {"hnsw_storage": ix.FLOAT32}, 0.95), (ix.IVF, {"nlist": 40}, 0.90)],
)
def test_approximate_index_recall_against_exact(kind: str, options: dict[str, Any], tolerance: float) -> None:
    """Recall@10 on 4000 clustered unit vectors (d=32): HNSW (M=32, efSearch=64, float16 or
    float32 vectors) ≥ 0.95;
    IVF with 40 lists (100 vectors per list) and nprobe=16 ≥ 0.90. (The default nlist of
    4·√n targets ≥ 100k vectors; on 4000 it would leave 16 vectors per list.)"""
    x = clustered(4000, 32)
    index = ix.build_index(x, np.arange(4000), kind, recall_queries=200, **options)
    assert ix.index_kind(index) == kind
    queries = ix.sample_queries(x, 300, seed=7)
    recall = ix.recall_at_k(index, x, queries, 10)
    assert recall >= tolerance, f"{kind} recall@10 {recall:.3f} below {tolerance}"
    gauge = REGISTRY.get_sample_value("twotower_publisher_index_recall")
    assert gauge is not None and gauge >= tolerance


def test_hnsw_stores_float16_codes_by_default_and_float32_on_request() -> None:
    import faiss

    x = clustered(500, 16)
    built = ix.build_index(x, np.arange(500), ix.HNSW, recall_queries=0)  # owns what is looked at below
    default = faiss.downcast_index(built.index)
    assert isinstance(default, faiss.IndexHNSWSQ)
    assert faiss.downcast_index(default.storage).code_size == 2 * 16  # two bytes per dimension
    built = ix.build_index(x, np.arange(500), ix.HNSW, hnsw_storage=ix.FLOAT32, recall_queries=0)
    assert isinstance(faiss.downcast_index(built.index), faiss.IndexHNSWFlat)
    with pytest.raises(ix.IndexBuildError, match="hnsw_storage"):
        ix.build_index(x, np.arange(500), ix.HNSW, hnsw_storage="int4")


def test_auto_picks_exact_below_threshold_and_large_kind_above() -> None:
    x = clustered(300, 8)
    assert ix.index_kind(ix.build_index(x, np.arange(300), exact_below=301)) == ix.FLAT
    assert ix.index_kind(ix.build_index(x, np.arange(300), exact_below=300)) == ix.HNSW
    assert ix.index_kind(ix.build_index(x, np.arange(300), exact_below=10, large_kind=ix.IVF)) == ix.IVF
    assert ix.default_nlist(10_000) == 400 and ix.default_nlist(1) == 1


@pytest.mark.parametrize("kind", [ix.FLAT, ix.HNSW, ix.IVF, ix.IVFPQ])
def test_serialize_round_trip_keeps_results_and_search_parameters(kind: str) -> None:
    x = clustered(2000, 16)
    index = ix.build_index(x, np.arange(2000), kind, nprobe=9, ef_search=48, recall_queries=0)
    data = ix.serialize(index)
    assert isinstance(data, bytes) and len(data) > 0
    back = ix.deserialize(data)
    assert ix.index_kind(back) == kind and back.ntotal == 2000
    q = ix.sample_queries(x, 50, seed=3)
    np.testing.assert_array_equal(index.search(q, 10)[1], back.search(q, 10)[1])
    if kind in (ix.IVF, ix.IVFPQ):
        assert back.nprobe == 9
    if kind == ix.HNSW:
        import faiss

        assert faiss.downcast_index(back.index).hnsw.efSearch == 48


@pytest.mark.parametrize("kind", [ix.FLAT, ix.HNSW, ix.IVF])
def test_new_items_added_with_ids_are_found_and_removal_where_supported(kind: str) -> None:
    x = clustered(1500, 16, seed=1)
    index = ix.deserialize(ix.serialize(ix.build_index(x[:1400], np.arange(1400), kind, recall_queries=0)))
    new_ids = np.arange(5000, 5100)
    index.add_with_ids(x[1400:], new_ids)
    assert index.ntotal == 1500
    _, found = index.search(x[1400:], 1)
    assert (found[:, 0] == new_ids).mean() >= 0.95
    if ix.supports_remove(index):
        assert index.remove_ids(new_ids[:10]) == 10
        _, found = index.search(x[1400:1410], 1)
        assert not set(found[:, 0]) & set(new_ids[:10].tolist())
    else:
        assert kind == ix.HNSW
        with pytest.raises(RuntimeError):
            index.remove_ids(new_ids[:10])


def test_ivfpq_builds_reports_recall_and_round_trips(caplog: pytest.LogCaptureFixture) -> None:
    """IVF-PQ over 4000 clustered unit vectors (d=32: 8 one-byte codes per vector, 40 lists,
    nprobe 16): built, its recall@10 against exact search measured and reported (log and
    gauge) at build time, and the serialized bytes give the same results and parameters."""
    x = clustered(4000, 32)
    with caplog.at_level(logging.INFO, logger="publisher.index"):
        index = ix.build_index(x, np.arange(4000) + 7, ix.IVFPQ, nlist=40, nprobe=16, recall_queries=200)
    assert ix.index_kind(index) == ix.IVFPQ and index.ntotal == 4000
    assert index.pq.M == ix.default_pq_m(32) == 8 and index.pq.nbits == 8
    assert index.code_size == 8  # bytes per vector, against 128 for float32
    built = [r for r in caplog.records if getattr(r, "index_kind", None) == ix.IVFPQ]
    assert built and 0.5 <= built[-1].recall <= 1.0
    assert REGISTRY.get_sample_value("twotower_publisher_index_recall") == pytest.approx(built[-1].recall)
    recall = ix.recall_at_k(index, x, ix.sample_queries(x, 300, seed=7), 10, ids=np.arange(4000) + 7)
    assert recall >= 0.5, f"ivfpq recall@10 {recall:.3f}"
    back = ix.deserialize(ix.serialize(index))
    assert ix.index_kind(back) == ix.IVFPQ and back.ntotal == 4000 and back.nprobe == 16
    q = ix.sample_queries(x, 50, seed=3)
    np.testing.assert_array_equal(index.search(q, 10)[1], back.search(q, 10)[1])
    assert ix.supports_remove(back)
    back.add_with_ids(x[:5], np.arange(90_000, 90_005))  # new items go in without a rebuild
    assert back.ntotal == 4005 and back.remove_ids(np.arange(90_000, 90_005)) == 5


def test_auto_picks_ivfpq_above_its_threshold_and_checks_pq_parameters() -> None:
    x = clustered(600, 16)
    assert ix.index_kind(ix.build_index(x, np.arange(600), exact_below=10, ivfpq_above=600, recall_queries=0)) == (
        ix.IVFPQ
    )
    assert ix.index_kind(ix.build_index(x, np.arange(600), exact_below=10, ivfpq_above=601, recall_queries=0)) == (
        ix.HNSW
    )
    assert ix.default_pq_m(64) == 16 and ix.default_pq_m(30) == 6 and ix.default_pq_m(3) == 1
    with pytest.raises(ix.IndexBuildError, match="divide"):
        ix.build_index(x, np.arange(600), ix.IVFPQ, pq_m=5)
    with pytest.raises(ix.IndexBuildError, match="at least 256 vectors"):
        ix.build_index(x[:100], np.arange(100), ix.IVFPQ)
    assert ix.build_index(x[:100], np.arange(100), ix.IVFPQ, pq_bits=6, recall_queries=0).ntotal == 100


def test_recall_at_k_maps_ids_and_handles_edges() -> None:
    x = clustered(200, 8)
    index = ix.build_index(x, np.arange(200) * 3)
    assert ix.recall_at_k(index, x, x[:10], 5, ids=np.arange(200) * 3) == 1.0
    assert ix.recall_at_k(index, x, x[:10], 5) < 0.5  # positions are not the ids here
    assert ix.recall_at_k(index, x, x[:0], 5) == 1.0


def test_bad_inputs_and_bytes_raise() -> None:
    x = clustered(10, 4)
    with pytest.raises(ix.IndexBuildError, match="ids"):
        ix.build_index(x, np.arange(9))
    with pytest.raises(ix.IndexBuildError, match="kind"):
        ix.build_index(x, np.arange(10), "annoy")
    with pytest.raises(ix.IndexBuildError, match="NaN"):
        ix.build_index(np.full((2, 4), np.nan, dtype=np.float32), np.arange(2))
    with pytest.raises(ix.IndexBuildError, match="zero vectors"):
        ix.build_index(np.zeros((0, 4), dtype=np.float32), np.arange(0), ix.IVF)
    assert ix.build_index(np.zeros((0, 4), dtype=np.float32), np.arange(0)).ntotal == 0
    with pytest.raises(ix.IndexBuildError, match="not a faiss index"):
        ix.deserialize(b"definitely not an index")
    with pytest.raises(ix.IndexBuildError, match="empty"):
        ix.deserialize(b"")


# ---------------------------------------------------------------- build


def test_item_vectors_are_unit_batched_and_match_the_item_tower() -> None:
    ckpt = make_checkpoint()
    model = model_from_checkpoint(ckpt)
    vec = item_vectors(model, ckpt)
    assert vec.shape == (6, MODEL.dim) and vec.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(item_vectors(model, ckpt, batch_size=4), vec, atol=1e-6)
    with torch.no_grad():
        direct = model.item(ckpt.items.emb[[2, 4]], ckpt.item_category[[2, 4]], ckpt.item_content[[2, 4]])
    np.testing.assert_allclose(item_vectors(model, ckpt, rows=[2, 4]), direct.numpy(), atol=1e-6)


def test_full_snapshot_holds_everything_and_round_trips() -> None:
    ckpt = make_checkpoint()
    extras = [
        CatalogItem("new1", "music", [0.1, 0.2], 5),
        CatalogItem("i0", "books", [0.0], 5),  # the trainer has a row for i0: ignored
    ]
    snap = full_snapshot(ckpt, extra_items=extras)
    assert snap.model_config == MODEL
    assert snap.users.ids == ckpt.users.ids
    np.testing.assert_array_equal(snap.users.matrix, ckpt.users.emb.numpy())
    assert snap.items.ids == [*ckpt.items.ids, "new1"]
    np.testing.assert_allclose(np.linalg.norm(snap.items.matrix, axis=1), 1.0, atol=1e-5)
    index = ix.deserialize(snap.index)
    assert index.ntotal == 7
    _, found = index.search(snap.items.matrix, 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(7))  # ids are row positions in items
    back = decode_full(encode_full(snap))
    assert back.items.ids == snap.items.ids and back.users.ids == snap.users.ids
    rebuilt = TwoTower(back.model_config)
    rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in back.weights.items()})
    model = model_from_checkpoint(ckpt)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], tensor)


def test_delta_snapshot_takes_rows_changed_after_since_seq() -> None:
    ckpt = make_checkpoint(
        seq=7,
        user_updated=[1, 5, 7, 2, 6],
        item_updated=[1, 1, 6, 7, 2, 1],
        removed=[(3, "gone-old"), (6, "gone1"), (7, "i2"), (7, "gone1")],
    )
    delta = delta_snapshot(ckpt, since_seq=5)
    assert delta.users.ids == ["u2", "u4"]
    np.testing.assert_array_equal(delta.users.matrix, ckpt.users.emb[[2, 4]].numpy())
    assert delta.items.ids == ["i2", "i3"]
    full = full_snapshot(ckpt)
    np.testing.assert_allclose(delta.items.matrix, full.items.matrix[[2, 3]], atol=1e-6)
    assert delta.removed_items == ["gone1"]  # i2 is live again; gone-old is older than since_seq
    back = decode_delta(encode_delta(delta))
    assert back.items.ids == delta.items.ids and back.removed_items == ["gone1"]
    assert is_empty(delta_snapshot(ckpt, since_seq=7))
    with_new = delta_snapshot(ckpt, since_seq=7, extra_items=[CatalogItem("n", "games", [1.0], 1)])
    assert with_new.items.ids == ["n"] and not is_empty(with_new)


def test_content_only_vectors_land_nearer_their_category() -> None:
    ckpt = make_checkpoint(item_categories=(1,) * 20 + (2,) * 20)
    model = model_from_checkpoint(ckpt)
    trained = item_vectors(model, ckpt)
    books, music = trained[:20].mean(axis=0), trained[20:].mean(axis=0)
    rng = np.random.default_rng(0)
    # content on the trained items' scale (make_checkpoint: uniform * 0.1), so the category decides
    new = [CatalogItem(f"b{i}", "books", (rng.random(3) * 0.1).tolist(), 1) for i in range(10)]
    new += [CatalogItem(f"m{i}", "music", (rng.random(3) * 0.1).tolist(), 1) for i in range(10)]
    rows = content_only_vectors(model, ckpt.categories, new)
    assert rows.ids == [it.item_id for it in new]
    np.testing.assert_allclose(np.linalg.norm(rows.matrix, axis=1), 1.0, atol=1e-5)
    assert (rows.matrix[:10] @ books > rows.matrix[:10] @ music).all()
    assert (rows.matrix[10:] @ music > rows.matrix[10:] @ books).all()


def test_content_only_vectors_unknown_category_and_zero_id_row() -> None:
    ckpt = make_checkpoint()
    model = model_from_checkpoint(ckpt)
    features = [0.3, 0.1, 0.2, 9.9]  # longer than content_dim: cut
    rows = content_only_vectors(
        model,
        ckpt.categories,
        [CatalogItem("a", "unheard-of", features, 1), CatalogItem("b", "music", features, 1)],
    )
    with torch.no_grad():
        expected = model.item(
            torch.zeros(2, MODEL.id_dim), torch.tensor([0, 2]), torch.tensor([features[:3]] * 2)
        ).numpy()
    np.testing.assert_allclose(rows.matrix, expected, atol=1e-6)
    assert content_only_vectors(model, ckpt.categories, []).matrix.shape == (0, MODEL.dim)
    # the last of a repeated id wins
    again = content_only_vectors(
        model, ckpt.categories, [CatalogItem("a", "books", [], 1), CatalogItem("a", "music", features, 2)]
    )
    assert again.ids == ["a"]
    np.testing.assert_allclose(again.matrix[0], rows.matrix[1], atol=1e-6)


def test_category_indices_skip_names_beyond_the_model_vocabulary() -> None:
    assert category_indices(["a", "b", "c"], 2) == {"a": 1, "b": 2}


def test_bad_checkpoints_are_refused() -> None:
    ckpt = make_checkpoint()
    ckpt.item_category = ckpt.item_category[:-1]
    with pytest.raises(ValueError, match="item ids"):
        full_snapshot(ckpt)
    ckpt = make_checkpoint(item_categories=(1, 9))
    with pytest.raises(ValueError, match="category index"):
        full_snapshot(ckpt)
    ckpt = make_checkpoint()
    ckpt.dense.pop("item.category.weight")
    with pytest.raises(ValueError, match="do not fit"):
        model_from_checkpoint(ckpt)


# ---------------------------------------------------------------- planning and serving-state encoding


def test_compaction_waits_for_the_last_full_builds_share_of_time() -> None:
    assert compaction_allowed(0.05, 1.0, 0.1)  # a small catalogue: a 50 ms build allows one a second
    assert not compaction_allowed(300.0, 60.0, 0.1)  # a 5-minute index build, a minute ago
    assert compaction_allowed(300.0, 3000.0, 0.1)
    assert compaction_allowed(300.0, 0.0, 0.0)  # 0: no limit


def test_plan_publish() -> None:
    last = Published(version=4, trainer_seq=10, dense_version=2, deltas_since_full=3)
    assert plan_publish(None, 1, 1, None, 50) == FULL
    assert plan_publish(last, 11, 2, None, 50) == DELTA
    assert plan_publish(last, 10, 2, None, 50) == SKIP
    assert plan_publish(last, 11, 3, None, 50) == FULL  # new dense weights
    assert plan_publish(last, 9, 2, None, 50) == FULL  # the trainer went back
    assert plan_publish(last, 11, 2, None, 3) == FULL  # full_every reached
    recovered = Published(version=4, trainer_seq=10, dense_version=None, deltas_since_full=0)
    assert plan_publish(recovered, 11, 7, True, 50) == DELTA
    assert plan_publish(recovered, 11, 7, False, 50) == FULL
    # restarted after publishing row updates newer than the last full checkpoint: nothing to rebuild
    assert plan_publish(recovered, 9, 7, True, 50) == SKIP
    assert plan_publish(recovered, 9, 7, False, 50) == FULL  # other weights: the state did go back


def test_weight_checksums_match_the_full_snapshot_parts() -> None:
    from twotower.blobs import checksum

    ckpt = make_checkpoint()
    parts = encode_full(full_snapshot(ckpt))
    assert weight_checksums(model_from_checkpoint(ckpt)) == (
        checksum(parts["weights"]),
        checksum(parts["model_config"]),
    )
    other = make_checkpoint(seed=5)
    assert weight_checksums(model_from_checkpoint(other))[0] != checksum(parts["weights"])


def test_history_and_profile_encoding() -> None:
    assert decode_history_entry(encode_history_entry("i9", 123)) == ("i9", 123)
    with pytest.raises(ValueError):
        decode_history_entry(b"\xc1")
    with pytest.raises(ValueError):
        decode_history_entry(encode_profile([1.0]))
    import msgpack

    assert msgpack.unpackb(encode_profile([1, 2.5])) == [1.0, 2.5]


def test_note_catalog_marks_new_and_changed_content_only_items() -> None:
    daemon = PublisherDaemon(Config())
    daemon._owned = {"owned"}
    daemon._served = {"served"}
    daemon._catalog = {"served": CatalogItem("served", "a", [1.0], 1)}
    marked = daemon.note_catalog(
        [
            CatalogItem("owned", "a", [1.0], 2),  # the trainer's
            CatalogItem("served", "a", [1.0], 2),  # unchanged
            CatalogItem("new", "b", [0.5], 2),
        ]
    )
    assert marked == 1 and daemon._pending == {"new"}
    assert daemon.note_catalog([CatalogItem("served", "b", [1.0], 3)]) == 1  # category changed
    assert daemon._pending == {"new", "served"}
    assert set(daemon._catalog) == {"owned", "served", "new"}
    assert daemon.health()["status"] == "starting"


def test_a_versions_keys_pattern_escapes_the_prefixs_glob_characters() -> None:
    assert SnapshotLayout("tt").version_keys(3) == "tt:snap:v:3:*"
    assert SnapshotLayout("a*b[1]?").version_keys(3) == "a\\*b\\[1\\]\\?:snap:v:3:*"


def test_the_tip_key_sits_beside_the_current_pointer() -> None:
    assert (SnapshotLayout("tt").current, SnapshotLayout("tt").tip) == ("tt:snap:current", "tt:snap:tip")


def test_a_serving_state_writer_that_cannot_start_closes_what_it_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving loop retries the writer while Kafka is down: a failed start must not leave
    a producer (and its thread) behind each time."""
    closed: list[str] = []

    class Producer:
        def close(self, timeout: float | None = None) -> None:
            closed.append("producer")

    def no_kafka(*args: object, **kwargs: object) -> object:
        raise KafkaError("injected: no broker")

    monkeypatch.setattr(serving_state, "make_producer", lambda *a, **k: Producer())
    monkeypatch.setattr(serving_state, "make_consumer", no_kafka)
    with pytest.raises(KafkaError):
        serving_state.ServingStateWriter(Config())
    assert closed == ["producer"]
