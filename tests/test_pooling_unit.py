"""Differentiable history pooling (``trainer.history_gradient``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.pooling import history_columns, pool_views, pooling_matrix
from trainer.state import TrainerState
from twotower.config import ModelConfig, TrainerConfig
from twotower.events import Interaction
from twotower.model import decay_weights, pool_history, pooling_weights


def test_history_columns_append_non_candidates_in_first_seen_order() -> None:
    hists = [[("c", 1), ("a", 2)], [("d", 3), ("c", 4), ("e", 5)]]
    assert history_columns(["a", "b"], hists) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("recent_len", [0, 2])
def test_pooling_matrix_matches_pool_history(recent_len: int) -> None:
    cfg = ModelConfig(dim=4, history_half_life_s=3600.0, recent_len=recent_len)
    rng = np.random.default_rng(0)
    cols = ["a", "b", "c", "d"]
    vecs = rng.normal(size=(4, 4)).astype(np.float32)
    hists = [[("a", 0), ("c", 3_600_000), ("a", 7_200_000)], [], [("d", 5)]]
    now = [10_000_000, 10_000_000, 6]
    w = pooling_matrix(cols, hists, now, cfg)
    views = 1 + (recent_len > 0)
    assert w.shape == (views, 3, 4)
    np.testing.assert_allclose(w.sum(dim=2).numpy(), [[1.0, 0.0, 1.0]] * views, rtol=1e-6)
    got = pool_views(w, torch.from_numpy(vecs)).numpy()
    assert got.shape == (3, views * 4)
    for b, hist in enumerate(hists):
        idx = [cols.index(i) for i, _ in hist]
        ts = np.array([t for _, t in hist], dtype=np.int64)
        want = pool_history(vecs[idx] if idx else np.zeros((0, 4), np.float32), ts, now[b], cfg)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)


def test_recent_view_is_the_plain_mean_of_the_newest_entries() -> None:
    cfg = ModelConfig(history_half_life_s=1.0, recent_len=2)
    w = pooling_weights(np.array([0, 10, 20_000_000], dtype=np.int64), 20_000_000, cfg)
    np.testing.assert_allclose(w[1], [0.0, 0.5, 0.5])  # by order: the oldest entry is out, whatever its time
    assert w[0, 2] > 0.99  # the time decay (1 s half-life) weighs only the newest


def _state(history_gradient: bool) -> TrainerState:
    cfg = ModelConfig(dim=8, id_dim=4, hidden=16, content_dim=2, history_len=5)
    return TrainerState(cfg, TrainerConfig(seed=0, history_gradient=history_gradient, min_extra_negatives=0))


def _clicks() -> list[Interaction]:
    out = []
    for k in range(40):
        user, item = f"u{k % 4}", f"i{k % 7}"
        out.append(Interaction(f"e{k}", "", user, item, "click", 0, 1_000 * k))
    return out


def test_history_gradient_moves_rows_of_items_only_in_histories() -> None:
    moved = {}
    for flag in (False, True):
        state = _state(flag)
        clicks = _clicks()
        state.observe_clicks(clicks[:-4])  # every item has a row and sits in some history
        # distinct non-zero rows: with equal rows every item vector is the same, the softmax's pull
        # on the user vector cancels exactly and no gradient reaches the history at all
        n = len(state.items.ids)
        state.items.emb[:n] = torch.randn(n, state.items.emb.shape[1], generator=torch.Generator().manual_seed(1))
        # one click whose history holds items the batch never clicks (and a single negative draw)
        examples = [(clicks[-1], [("i0", 1), ("i1", 2), ("i2", 3), ("i3", 4), ("i4", 5)])]
        before = state.items.emb.clone()
        state.learn(examples, dense=True)
        changed = (state.items.emb != before).any(dim=1)
        moved[flag] = {state.items.ids[r] for r in changed.nonzero().flatten().tolist()}
    history_only = {"i0", "i1", "i2", "i3", "i4"} - moved[False]
    assert history_only  # without the flag some history items do not move ...
    assert history_only <= moved[True]  # ... with it they do


def test_history_gradient_keeps_streaming_dense_weights_bit_identical() -> None:
    state = _state(True)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    state.learn(state.observe_clicks(_clicks()), dense=False)
    for name, value in state.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_min_extra_negatives_widens_a_small_batchs_candidates() -> None:
    cfg = ModelConfig(dim=8, id_dim=4, hidden=16, content_dim=2, history_len=5)
    widths = {}
    for least in (0, 64):
        state = TrainerState(cfg, TrainerConfig(seed=0, min_extra_negatives=least))
        clicks = [Interaction(f"e{k}", "", f"u{k % 5}", f"i{k}", "click", 0, k) for k in range(200)]
        state.observe_clicks(clicks)
        cand_ids, positive_cols, _ = state._candidates(clicks[:2])
        assert positive_cols.tolist() == [0, 1]
        widths[least] = len(cand_ids)
    assert widths[0] <= 4 and widths[64] > 30


def test_streaming_without_item_rows_moves_only_user_rows() -> None:
    state = TrainerState(
        ModelConfig(dim=8, id_dim=4, hidden=16, content_dim=2, history_len=5),
        TrainerConfig(seed=0, stream_item_rows=False),
    )
    examples = state.observe_clicks(_clicks())
    items, users = state.items.emb.clone(), state.users.emb.clone()
    result = state.learn(examples, dense=False)
    assert torch.equal(state.items.emb, items) and result.item_rows_updated == 0
    assert not torch.equal(state.users.emb, users)
    state.learn(examples, dense=True)
    assert not torch.equal(state.items.emb, items)


def test_user_row_dropout_hides_some_rows_in_dense_steps_only() -> None:
    cfg = ModelConfig(dim=8, id_dim=4, hidden=16, content_dim=2, history_len=5)
    moved = {}
    for dropout in (0.0, 0.5):
        state = TrainerState(cfg, TrainerConfig(seed=0, user_row_dropout=dropout))
        clicks = [Interaction(f"e{k}", "", f"u{k}", f"i{k % 7}", "click", 0, 1_000 * k) for k in range(64)]
        examples = state.observe_clicks(clicks)
        state.users.emb[: len(state.users.ids)] = 0.1
        before = state.users.emb.clone()
        state.learn(examples, dense=True)
        moved[dropout] = int((state.users.emb != before).any(dim=1).sum())
        before = state.users.emb.clone()
        state.learn(examples, dense=False)  # streaming steps never drop rows
        assert int((state.users.emb != before).any(dim=1).sum()) == 64
    assert moved[0.0] == 64
    assert 10 < moved[0.5] < 54  # a dropped row gets no gradient: about half of them stay put


def test_decay_depends_on_relative_ages_and_survives_an_old_history() -> None:
    ts = np.array([0, 3_600_000, 7_200_000], dtype=np.int64)  # one hour apart, half-life one hour
    near = decay_weights(ts, 7_200_000, 3600.0)
    np.testing.assert_allclose(near, np.array([1, 2, 4]) / 7, rtol=1e-6)
    thirty_years = 30 * 365 * 86_400_000  # a replayed log served at today's clock: no underflow
    np.testing.assert_allclose(decay_weights(ts, 7_200_000 + thirty_years, 3600.0), near, rtol=1e-6)
