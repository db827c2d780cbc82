"""Unit tests of the towers and their training options: MIND, example age, self-supervised
item loss, and the invariants every option must keep (frozen dense weights when streaming,
content-only vectors of new items near their category, MIND serving covering every interest)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from publisher.build import full_snapshot
from retriever.state import ServingState
from trainer.state import TrainerState
from twotower import checkpoint
from twotower.config import ModelConfig, TrainerConfig
from twotower.events import CLICK, IMPRESSION, CatalogItem, Interaction
from twotower.model import (
    MindUserTower,
    TwoTower,
    UserTower,
    active_interests,
    dense_arrays,
    example_age_days,
    farthest_point_seeds,
    history_pools,
    history_tensor,
    squash,
)
from twotower.snapshot_parts import FullSnapshot
from twotower.snapshots import FULL, VersionMeta

MIND = ModelConfig(
    dim=8,
    id_dim=4,
    hidden=16,
    n_categories=4,
    content_dim=4,
    profile_dim=2,
    history_len=8,
    user_tower="mind",
    interests=3,
)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


# --- MIND tower ------------------------------------------------------------------------------------


def test_dynamic_interest_number_follows_log2_of_history_length() -> None:
    n = torch.tensor([0, 1, 2, 3, 4, 7, 8, 16, 100])
    assert active_interests(n, 4).tolist() == [1, 1, 1, 1, 2, 2, 3, 4, 4]
    assert active_interests(n, 2).max().item() == 2


def test_squash_keeps_direction_and_bounds_the_norm() -> None:
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = squash(z)
    assert out[0].norm().item() == pytest.approx(25 / 26)
    assert torch.allclose(unit(out[0]), unit(z[0]))
    assert torch.equal(out[1], torch.zeros(2))


def test_mind_shapes_unit_vectors_and_active_mask() -> None:
    torch.manual_seed(0)
    tower = MindUserTower(MIND)
    lengths = [0, 2, 4, 8]
    hist = unit(torch.randn(4, MIND.history_len, MIND.dim))
    mask = torch.arange(MIND.history_len).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    interests, active = tower(torch.randn(4, MIND.id_dim), torch.randn(4, MIND.profile_dim), hist, mask)
    assert interests.shape == (4, MIND.interests, MIND.dim) and active.shape == (4, MIND.interests)
    assert torch.allclose(interests.norm(dim=-1), torch.ones(4, MIND.interests), atol=1e-5)
    assert active.sum(1).tolist() == [1, 1, 2, 3]


def test_routing_is_deterministic_and_ignores_padding_and_batch_companions() -> None:
    torch.manual_seed(1)
    tower_a = MindUserTower(MIND)
    torch.manual_seed(1)
    tower_b = MindUserTower(MIND)
    hist = unit(torch.randn(3, MIND.history_len, MIND.dim))
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8, [True] * 2 + [False] * 6])
    rows, prof = torch.randn(3, MIND.id_dim), torch.randn(3, MIND.profile_dim)
    out_a, act_a = tower_a(rows, prof, hist, mask)
    out_b, act_b = tower_b(rows, prof, hist, mask)
    assert torch.equal(out_a, out_b) and torch.equal(act_a, act_b)  # same weights, same routing
    again, _ = tower_a(rows, prof, hist, mask)
    assert torch.equal(out_a, again)  # no randomness at call time
    noisy = hist.clone()
    noisy[0, 5:] = 100.0  # padding content is ignored
    alone, _ = tower_a(rows[:1], prof[:1], noisy[:1], mask[:1])
    torch.testing.assert_close(alone[0], out_a[0])  # and so are the other users of the batch
    short, _ = tower_a(rows[:1], prof[:1], hist[:1, :5], mask[:1, :5])  # shorter padding: same answer
    torch.testing.assert_close(short[0], out_a[0])


def test_routing_separates_two_clusters_of_history() -> None:
    """With the initial (identity) bilinear map the capsules are clusters of the history: a
    history of two orthogonal topics, in any order, gives one capsule per topic."""
    a, b = torch.eye(MIND.dim)[0], torch.eye(MIND.dim)[1]
    for seed in range(10):
        torch.manual_seed(seed)
        tower = MindUserTower(MIND.model_copy(update={"interests": 2}))
        order = torch.randperm(8)
        hist = unit(torch.stack([a, b, a, a, b, a, b, b])[order] + 0.05 * torch.randn(8, MIND.dim)).unsqueeze(0)
        caps, active = tower.capsules(hist, torch.ones(1, 8, dtype=torch.bool))
        assert active.all()
        sims = unit(caps[0]) @ torch.stack([a, b]).T  # [capsule, topic]
        assert sorted(sims.argmax(dim=1).tolist()) == [0, 1]
        assert (sims.max(dim=1).values - sims.min(dim=1).values).min() > 0.5


def test_farthest_point_seeds_skip_padding() -> None:
    e = torch.eye(4)
    hist = torch.stack([e[0], e[0], e[1], e[2] * 0]).unsqueeze(0)  # last one is padding
    mask = torch.tensor([[True, True, True, False]])
    assert farthest_point_seeds(hist, mask, 2).tolist() == [[0, 2]]


def test_score_interests_max_and_label_aware() -> None:
    model = TwoTower(MIND.model_copy(update={"interests": 2}))
    e = torch.eye(MIND.dim)
    interests = torch.stack([e[0], e[1]]).unsqueeze(0)  # one user with interests along axes 0 and 1
    items = torch.stack([e[0], e[1], unit(e[0] + e[1])])
    active = torch.tensor([[True, True]])
    t = MIND.temperature
    best = model.score_interests(interests, active, items, mode="max") * t
    torch.testing.assert_close(best, torch.tensor([[1.0, 1.0, 2**-0.5]]))
    label = model.score_interests(interests, active, items, torch.tensor([1]), mode="label_aware") * t
    torch.testing.assert_close(label, torch.tensor([[0.0, 1.0, 2**-0.5]]))  # interest 1 scores everything
    one = model.score_interests(interests, torch.tensor([[True, False]]), items, mode="max") * t
    torch.testing.assert_close(one, torch.tensor([[1.0, 0.0, 2**-0.5]]))  # inactive interests never score


def test_history_tensor_pads_and_cuts() -> None:
    vecs = np.arange(12, dtype=np.float32).reshape(4, 3)
    out, mask = history_tensor(vecs, [[2, 0], [], [0, 1, 2, 3]], 3)
    assert out.shape == (3, 3, 3) and mask.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert out[0, 0].tolist() == vecs[2].tolist() and out[2, 2].tolist() == vecs[2].tolist()


# --- example age -----------------------------------------------------------------------------------


def test_example_age_is_an_input_that_is_zero_at_serving() -> None:
    cfg = ModelConfig(dim=8, id_dim=4, hidden=16, content_dim=2, profile_dim=2, example_age=True)
    torch.manual_seed(0)
    tower = UserTower(cfg)
    assert tower.mlp[0].in_features == cfg.id_dim + cfg.profile_dim + history_pools(cfg) * cfg.dim + 1
    rows, prof, pooled = torch.randn(2, 4), torch.randn(2, 2), unit(torch.randn(2, 8 * history_pools(cfg)))
    serve = tower(rows, prof, pooled)
    torch.testing.assert_close(serve, tower(rows, prof, pooled, torch.zeros(2)))
    assert not torch.allclose(serve, tower(rows, prof, pooled, torch.tensor([3.0, 3.0])))
    ages = example_age_days([0, 86_400_000, 3 * 86_400_000], 2 * 86_400_000)
    torch.testing.assert_close(ages, torch.log1p(torch.tensor([2.0, 1.0, 0.0])))  # future events clip at 0
    assert UserTower(ModelConfig(dim=8, id_dim=4, hidden=16, recent_len=0)).mlp[0].in_features == 4 + 8 + 8
    assert UserTower(ModelConfig(dim=8, id_dim=4, hidden=16, recent_len=3)).mlp[0].in_features == 4 + 8 + 2 * 8


def test_trainer_feeds_the_example_age_of_each_click(monkeypatch: pytest.MonkeyPatch) -> None:
    state, clicks = _toy(model={"example_age": True})
    seen: list[torch.Tensor | None] = []
    original = state.model.user.forward

    def spy(*args: Any) -> torch.Tensor:
        seen.append(args[3] if len(args) > 3 else None)
        return original(*args)

    monkeypatch.setattr(state.model.user, "forward", spy)
    batch = clicks(16, 0)
    state.event_time_ms = 10 * 86_400_000  # the trainer's clock is ahead: the examples are old
    state.learn(state.observe_clicks(batch), dense=True)
    assert seen[-1] is not None and torch.allclose(seen[-1], torch.full((16,), np.log1p(10.0)), atol=1e-3)


# --- invariants for every option ---------------------------------------------------------------------

OPTIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("default", {}, {}),
    ("bce", {}, {"loss": "bce"}),
    ("pairwise_hinge", {}, {"loss": "pairwise_hinge"}),
    ("pairwise_logistic", {}, {"loss": "pairwise_logistic"}),
    ("logq_expected_count", {}, {"logq_correction": "expected_count"}),
    ("logq_none", {}, {"logq_correction": "none"}),
    ("hard_only", {}, {"negatives_popularity_ratio": 0.0}),
    ("mind_label_aware", {"user_tower": "mind"}, {}),
    ("mind_max", {"user_tower": "mind", "mind_scoring": "max"}, {}),
    ("example_age", {"example_age": True}, {}),
    ("ssl", {}, {"ssl_weight": 0.5}),
    ("everything", {"user_tower": "mind", "example_age": True}, {"loss": "bce", "ssl_weight": 0.5}),
]


def _toy(
    seed: int = 0,
    n_users: int = 40,
    n_items: int = 60,
    n_cats: int = 4,
    model: dict | None = None,
    trainer: dict | None = None,
):
    """Users who click items of their one or two favourite categories; content = category one-hot."""
    rng = np.random.default_rng(seed)
    cats = rng.integers(0, n_cats, n_items)
    favs = [rng.choice(n_cats, size=1 + u % 2, replace=False) for u in range(n_users)]
    mcfg = ModelConfig(
        **{"dim": 16, "id_dim": 8, "hidden": 32, "content_dim": 4, "n_categories": 8, "history_len": 8, **(model or {})}
    )
    state = TrainerState(mcfg, TrainerConfig(**{"stream_lr": 0.05, "stream_item_rows": True, **(trainer or {})}))
    for i in range(n_items):
        state.apply_catalog(CatalogItem(f"i{i}", f"c{cats[i]}", list(np.eye(4)[cats[i]]), 0))

    def clicks(n: int, t0: int, impressions: bool = False) -> list[Interaction]:
        out = []
        for k in range(n):
            u = int(rng.integers(n_users))
            i = int(rng.choice(np.flatnonzero(np.isin(cats, favs[u]))))
            request = f"r{t0 + k}"
            if impressions:  # what the retriever returned but the slate did not show
                retrieved = [f"i{j}" for j in rng.choice(n_items, 4, replace=False) if j != i]
                state.observe_impression(
                    Interaction(
                        f"{request}:i", request, f"u{u}", f"i{i}", IMPRESSION, 0, t0 + k, {"retrieved": retrieved}
                    )
                )
            out.append(Interaction(f"e{t0 + k}", request, f"u{u}", f"i{i}", CLICK, 0, t0 + k))
        return out

    _toy.cats = {f"i{i}": int(cats[i]) for i in range(n_items)}
    _toy.favs = {f"u{u}": {int(c) for c in favs[u]} for u in range(n_users)}
    return state, clicks


@pytest.mark.parametrize(("name", "model", "trainer"), OPTIONS, ids=[o[0] for o in OPTIONS])
def test_streaming_keeps_dense_weights_bit_identical_for_every_option(name: str, model: dict, trainer: dict) -> None:
    state, clicks = _toy(model=model, trainer=trainer)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    optimizer_before = repr(state.dense_optimizer.state_dict()["state"])
    rows_before = state.items.emb.clone()
    for step in range(6):
        result = state.learn(state.observe_clicks(clicks(32, step * 1_000, impressions=True)), dense=False)
        assert np.isfinite(result.loss)
    after = state.model.state_dict()
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert torch.equal(value, before[key]), f"{name}: {key} changed in streaming mode"
    assert repr(state.dense_optimizer.state_dict()["state"]) == optimizer_before
    assert not torch.equal(state.items.emb[: rows_before.shape[0]], rows_before)  # the rows did learn
    assert all(not p.requires_grad for p in state.model.parameters())


@pytest.mark.parametrize(("name", "model", "trainer"), OPTIONS, ids=[o[0] for o in OPTIONS])
def test_nightly_step_moves_dense_weights_for_every_option(name: str, model: dict, trainer: dict) -> None:
    state, clicks = _toy(model=model, trainer=trainer)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    state.learn(state.observe_clicks(clicks(16, 0, impressions=True)), dense=False)  # histories exist
    result = state.learn(state.observe_clicks(clicks(32, 1_000, impressions=True)), dense=True)
    assert np.isfinite(result.loss)
    assert [k for k, v in state.model.state_dict().items() if not torch.equal(v, before[k])]
    assert all(not p.requires_grad for p in state.model.parameters())  # frozen again afterwards


@pytest.mark.parametrize(("name", "model", "trainer"), OPTIONS, ids=[o[0] for o in OPTIONS])
def test_new_item_content_only_vector_lands_near_its_category(name: str, model: dict, trainer: dict) -> None:
    state, clicks = _toy(model=model, trainer=trainer)
    for step in range(25):
        state.learn(state.observe_clicks(clicks(48, step * 1_000, impressions=True)), dense=True)
    state.apply_catalog(CatalogItem("brand-new", "c2", [0, 0, 1, 0], 0))
    ids = [f"i{i}" for i in range(60)]
    with torch.no_grad():
        sims = state.item_vectors(ids) @ state.item_vectors(["brand-new"])[0]
    same = torch.tensor([_toy.cats[i] == 2 for i in ids])
    assert sims[same].mean() > sims[~same].mean() + 0.1
    assert sims.topk(5).indices.tolist() == [j for j in sims.topk(5).indices.tolist() if same[j]]


def test_checkpoint_round_trip_of_a_mind_model(tmp_path) -> None:
    state, clicks = _toy(model={"user_tower": "mind", "example_age": True})
    state.learn(state.observe_clicks(clicks(32, 0)), dense=True)
    state.seq += 1
    checkpoint.save(tmp_path, state.to_checkpoint({}))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None
    again = TrainerState.from_checkpoint(loaded, state.tcfg)
    assert isinstance(again.model.user, MindUserTower)
    batch = clicks(16, 5_000)
    assert state.learn(state.observe_clicks(batch), dense=False).loss == pytest.approx(
        again.learn(again.observe_clicks(batch), dense=False).loss, abs=1e-6
    )


# --- self-supervised item loss -----------------------------------------------------------------------


def test_ssl_views_are_complementary_and_the_loss_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each item's two views keep complementary feature groups (ID row / category / content), the
    loss runs only in dense steps, and training on it lowers it."""
    state, clicks = _toy(trainer={"ssl_weight": 1.0, "ssl_dropout": 0.0})
    ids = [f"i{i}" for i in range(60)]
    rows = torch.randn(60, state.model_cfg.id_dim)  # every group present in the input
    cats, content = state.item_side(ids)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = state.model.item.forward

    def spy(r: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        seen.append((r, c, x))
        return original(r, c, x)

    monkeypatch.setattr(state.model.item, "forward", spy)
    state._ssl_loss(rows, cats, content)
    (ra, ca, xa), (rb, cb, xb) = seen
    has = [
        torch.stack([r.abs().sum(1) > 0, c > 0, x.abs().sum(1) > 0], dim=1) for r, c, x in ((ra, ca, xa), (rb, cb, xb))
    ]
    assert torch.equal(has[0] ^ has[1], torch.ones(60, 3, dtype=torch.bool))  # every group in exactly one view
    assert has[0].any(1).all() and has[1].any(1).all()  # no view is empty
    monkeypatch.undo()

    def ssl_value() -> float:
        g = state.generator.get_state()
        with torch.no_grad():
            value = float(state._ssl_loss(state.items.gather(state.items.rows(ids)), cats, content))
        state.generator.set_state(g)
        return value

    before = ssl_value()
    for step in range(15):
        state.learn(state.observe_clicks(clicks(48, (step + 1) * 1_000)), dense=True)
    assert ssl_value() < before


# --- MIND serving ------------------------------------------------------------------------------------


def _mind_snapshot(n_per_axis: int = 5) -> tuple[FullSnapshot, list[str]]:
    cfg = ModelConfig(
        dim=8,
        id_dim=4,
        hidden=16,
        n_categories=4,
        content_dim=0,
        profile_dim=0,
        history_len=8,
        user_tower="mind",
        interests=2,
    )
    torch.manual_seed(0)
    model = TwoTower(cfg)
    with torch.no_grad():  # interests = their capsules (skip only), so the expected answer is known
        model.user.mlp[-1].weight.zero_()
        model.user.mlp[-1].bias.zero_()
    rng = np.random.default_rng(0)
    vecs, ids = [], []
    for axis in range(4):
        for j in range(n_per_axis):
            v = np.eye(8)[axis] + 0.1 * rng.standard_normal(8)
            vecs.append(v / np.linalg.norm(v))
            ids.append(f"a{axis}-{j}")
    import faiss

    matrix = np.asarray(vecs, dtype=np.float32)
    index = faiss.index_factory(8, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(matrix, np.arange(len(ids), dtype=np.int64))
    from twotower.blobs import Rows

    return (
        FullSnapshot(
            cfg, dense_arrays(model), Rows.empty(cfg.id_dim), Rows(ids, matrix), faiss.serialize_index(index).tobytes()
        ),
        ids,
    )


def test_mind_serving_queries_each_interest_and_merges_by_max() -> None:
    snap, ids = _mind_snapshot()
    state = ServingState.from_full(VersionMeta(1, FULL, None, 1, 0, 0), snap)
    history = [(f"a{axis}-{j}", 0) for j in range(2) for axis in (0, 2)]  # two interests: axes 0 and 2
    vecs = state.user_vector("u", history, None, 0)
    assert vecs.shape == (2, 8)
    got = state.search(vecs, 6, exclude={i for i, _ in history})
    axes = [item.split("-")[0] for item, _ in got]
    assert set(axes) == {"a0", "a2"} and axes.count("a0") == 3 and axes.count("a2") == 3
    # exactly the brute-force max over interests
    best = (snap.items.matrix @ vecs.T).max(axis=1)
    want = [ids[j] for j in np.argsort(-best) if ids[j] not in {i for i, _ in history}][:6]
    assert [item for item, _ in got] == want
    np.testing.assert_allclose([s for _, s in got], sorted(best[[ids.index(i) for i in want]])[::-1], rtol=1e-5)
    # a single interest (short history) is an ordinary one-vector query
    one = state.user_vector("u", history[:1], None, 0)
    assert one.shape == (1, 8)
    assert {i.split("-")[0] for i, _ in state.search(one, 3)} == {"a0"}


def test_trained_mind_model_serves_items_of_each_of_a_users_interests() -> None:
    """End to end: MIND trained on users with one or two favourite categories, published as a full
    snapshot, served. A two-interest user's interest vectors point at their two categories, each
    interest's own query returns that category, and the merged answer stays within them."""
    state, clicks = _toy(model={"user_tower": "mind", "interests": 2})
    for step in range(30):
        state.learn(state.observe_clicks(clicks(48, step * 1_000)), dense=True)
    serving = ServingState.from_full(VersionMeta(1, FULL, None, 1, 0, 0), full_snapshot(state.to_checkpoint({})))
    ids = list(_toy.cats)
    cats = np.array([_toy.cats[i] for i in ids])
    vectors = serving.item_vectors[[serving.item_pos[i] for i in ids]]
    centroids = np.stack([vectors[cats == c].mean(0) for c in range(4)])
    pointed, separate, precision = [], [], []
    for user, favs in _toy.favs.items():
        history = list(reversed(state.histories.get(user, [])))  # newest first, as Redis keeps it
        if len(favs) != 2 or len(history) < 4 or {_toy.cats[i] for i, _ in history} != favs:
            continue
        vecs = serving.user_vector(user, history, None, 10**9)
        assert vecs.shape == (2, state.model_cfg.dim)
        pointed.append({int(np.argmax(centroids @ v)) for v in vecs} == favs)
        per_interest = [{_toy.cats[i] for i, _ in serving.search(v, 3)} for v in vecs]
        separate.append(len(per_interest[0] | per_interest[1]) == 2 and all(len(p) == 1 for p in per_interest))
        precision.append(np.mean([_toy.cats[i] in favs for i, _ in serving.search(vecs, 10)]))
    assert len(pointed) >= 5
    assert np.mean(pointed) >= 0.8 and np.mean(separate) >= 0.8
    assert np.mean(precision) >= 0.9
