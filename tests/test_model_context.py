"""User-tower context features: time of the request (cyclical, UTC) and a caller's dense vector."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import pytest
import torch

from publisher.build import full_snapshot, model_from_checkpoint
from retriever.state import ServingState
from trainer.state import TrainerState
from twotower import checkpoint
from twotower.config import ModelConfig, TrainerConfig, stored_model_config
from twotower.events import CLICK, CatalogItem, Interaction
from twotower.model import (
    CONTEXT_WEIGHT,
    TwoTower,
    context_matrix,
    context_vector,
    context_width,
    dense_arrays,
    history_pools,
    load_dense_arrays,
    time_features,
)
from twotower.snapshots import FULL, VersionMeta

SMALL = {"dim": 8, "id_dim": 4, "hidden": 16, "n_categories": 4, "content_dim": 4, "profile_dim": 2, "history_len": 6}


def _ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1000)


def test_time_features_are_cyclical_hour_of_day_and_day_of_week_in_utc() -> None:
    monday_midnight = _ms(2024, 1, 1)  # a Monday
    got = time_features([monday_midnight, _ms(2024, 1, 1, 6), _ms(2024, 1, 3, 12), _ms(2024, 1, 7, 23, 59, 59)])
    np.testing.assert_allclose(got[0], [0.0, 1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(got[1, :2], [1.0, 0.0], atol=1e-6)  # 06:00 is a quarter of the day
    week = 2 * math.pi * 2.5 / 7  # Wednesday noon: 2.5 days into the week
    np.testing.assert_allclose(got[2], [0.0, -1.0, math.sin(week), math.cos(week)], atol=1e-6)
    np.testing.assert_allclose(got[3], got[0], atol=1e-3)  # Sunday 23:59:59 is next to Monday 00:00
    assert got.dtype == np.float32 and got.shape == (4, 4)


def test_context_vector_fits_and_ignores_malformed_values() -> None:
    np.testing.assert_array_equal(context_vector([1, 2.5], 3), [1.0, 2.5, 0.0])
    np.testing.assert_array_equal(context_vector([1, 2, 3, 4], 2), [1.0, 2.0])
    for bad in (None, "1,2", [1, "x"], [float("nan")], [True], {"a": 1}):
        np.testing.assert_array_equal(context_vector(bad, 2), [0.0, 0.0])
    assert context_vector([1.0], 0).shape == (0,)
    cfg = ModelConfig(context_time=True, context_dim=2)
    got = context_matrix(cfg, [0, 0], [{"features": [5.0]}, None])
    assert got.shape == (2, context_width(cfg)) == (2, 6)
    assert got[:, 4:].tolist() == [[5.0, 0.0], [0.0, 0.0]]
    assert context_matrix(ModelConfig(context_time=False, context_dim=0), [1, 2], [None, None]).shape == (2, 0)
    assert TwoTower(ModelConfig(context_time=False, context_dim=0)).user.context is None


@pytest.mark.parametrize("tower", ["mean", "mind"])
def test_context_changes_the_user_vector(tower: str) -> None:
    cfg = ModelConfig(**SMALL, user_tower=tower, context_time=True, context_dim=2)
    torch.manual_seed(0)
    model = TwoTower(cfg)
    rows, prof = torch.randn(1, 4), torch.randn(1, 2)
    if tower == "mean":
        pooled = torch.nn.functional.normalize(torch.randn(1, 8 * history_pools(cfg)), dim=-1)

        def run(ts: int, ctx: dict | None) -> torch.Tensor:
            return model.user(rows, prof, pooled, None, context_matrix(cfg, [ts], [ctx]))
    else:
        hist = torch.nn.functional.normalize(torch.randn(1, 6, 8), dim=-1)
        mask = torch.tensor([[True] * 4 + [False] * 2])

        def run(ts: int, ctx: dict | None) -> torch.Tensor:
            return model.user(rows, prof, hist, mask, None, context_matrix(cfg, [ts], [ctx]))[0]

    morning, evening = _ms(2024, 1, 1, 8), _ms(2024, 1, 1, 20)
    with torch.no_grad():
        base = run(morning, None)
        assert not torch.allclose(base, run(evening, None), atol=1e-4)  # hour of day
        assert not torch.allclose(base, run(morning + 3 * 86_400_000, None), atol=1e-4)  # day of week
        assert not torch.allclose(base, run(morning, {"features": [1.0, -2.0]}), atol=1e-4)  # dense context
        torch.testing.assert_close(base, run(morning + 7 * 86_400_000, {"features": []}))  # a week later: same


def _toy(model: dict[str, Any] | None = None) -> tuple[TrainerState, Any]:
    """Users who click items of one category in the morning and of another in the evening."""
    cfg = ModelConfig(**{**SMALL, "context_time": True, "context_dim": 2, **(model or {})})
    state = TrainerState(cfg, TrainerConfig(stream_lr=0.05, nightly_lr=0.01))
    for i in range(24):
        state.apply_catalog(CatalogItem(f"i{i}", f"c{i % 4}", list(np.eye(4)[i % 4]), 0))
    rng = np.random.default_rng(0)

    def clicks(n: int, day: int) -> list[Interaction]:
        out = []
        for k in range(n):
            evening = k % 2 == 1
            item = 4 * int(rng.integers(6)) + (1 if evening else 0)
            ts = _ms(2024, 1, 1, 20 if evening else 8) + day * 86_400_000 + k
            ctx = {"features": [1.0 if evening else -1.0]}
            out.append(Interaction(f"e{day}-{k}", f"r{day}-{k}", f"u{k % 8}", f"i{item}", CLICK, 0, ts, ctx))
        return sorted(out, key=lambda c: c.ts_ms)

    return state, clicks


@pytest.mark.parametrize("tower", ["mean", "mind"])
def test_context_weights_learn_in_nightly_and_stay_frozen_in_streaming(tower: str) -> None:
    state, clicks = _toy({"user_tower": tower})
    weight = state.model.user.context.weight
    frozen = weight.detach().clone()
    state.learn(state.observe_clicks(clicks(32, 0)), dense=False)
    torch.testing.assert_close(state.model.user.context.weight, frozen, rtol=0, atol=0)

    grads: list[torch.Tensor] = []
    step = state.dense_optimizer.step

    def spy() -> None:  # the gradient the nightly's Adam step sees
        assert weight.grad is not None
        grads.append(weight.grad.clone())
        step()

    state.dense_optimizer.step = spy  # type: ignore[method-assign]
    state.learn(state.observe_clicks(clicks(32, 1)), dense=True)
    assert grads and grads[0].abs().sum() > 0
    assert grads[0][:, :4].abs().sum() > 0 and grads[0][:, 4].abs().sum() > 0  # time and dense columns
    assert grads[0][:, 5].abs().sum() == 0  # the padded column of the one-value vectors
    assert not torch.equal(state.model.user.context.weight, frozen)
    assert not state.model.user.context.weight.requires_grad


def test_trained_context_separates_morning_and_evening_at_serving() -> None:
    """Nightly-style dense training on a world whose taste depends on the hour: the served vector
    of the same user with the same history prefers the morning items in the morning."""
    torch.manual_seed(0)
    state, clicks = _toy()
    for day in range(40):
        state.learn(state.observe_clicks(clicks(48, day)), dense=True)
    serving = ServingState.from_full(VersionMeta(1, FULL, None, 1, 0, 0), full_snapshot(state.to_checkpoint({})))
    morning_items = [serving.item_pos[f"i{4 * j}"] for j in range(6)]
    evening_items = [serving.item_pos[f"i{4 * j + 1}"] for j in range(6)]
    wins = []
    for user in (f"u{k}" for k in range(8)):
        history = list(reversed(state.histories[user]))
        am = serving.user_vector(user, history, None, _ms(2024, 3, 4, 8), [-1.0])
        pm = serving.user_vector(user, history, None, _ms(2024, 3, 4, 20), [1.0])
        gap_am = serving.item_vectors[morning_items].mean(0) @ am - serving.item_vectors[evening_items].mean(0) @ am
        gap_pm = serving.item_vectors[morning_items].mean(0) @ pm - serving.item_vectors[evening_items].mean(0) @ pm
        wins.append(gap_am > gap_pm)
    assert np.mean(wins) >= 0.75


def _legacy(ckpt: checkpoint.Checkpoint) -> checkpoint.Checkpoint:
    """A checkpoint as written before context features and the recent view existed (no such config,
    no context weight)."""
    dropped = ("context_time", "context_dim", "recent_len")
    ckpt.model_config = {k: v for k, v in ckpt.model_config.items() if k not in dropped}
    ckpt.dense = {k: v for k, v in ckpt.dense.items() if k != CONTEXT_WEIGHT}
    return ckpt


def test_weights_from_before_context_load_with_zero_context_and_old_outputs(tmp_path) -> None:
    # a model without context has exactly the parameters of a model from before context existed
    old, clicks = _toy({"context_time": False, "context_dim": 0, "recent_len": 0})
    old.learn(old.observe_clicks(clicks(32, 0)), dense=True)
    old.seq += 1
    checkpoint.save(tmp_path, _legacy(old.to_checkpoint({})))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and CONTEXT_WEIGHT not in loaded.dense

    new = TrainerState.from_checkpoint(loaded, old.tcfg)
    assert not new.model_cfg.context_time and new.model_cfg.context_dim == 4  # the defaults
    assert new.model_cfg.recent_len == 0  # not the default: the weights were shaped without it
    assert torch.count_nonzero(new.model.user.context.weight) == 0
    rows, prof = torch.randn(3, 4), torch.randn(3, 2)
    pooled = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    ctx = context_matrix(new.model_cfg, [0, 10**12, 1], [None, {"features": [3.0]}, None])
    with torch.no_grad():
        torch.testing.assert_close(new.model.user(rows, prof, pooled, None, ctx), old.model.user(rows, prof, pooled))
    # Adam kept its moments for the old weights, fresh ones for the context weight
    old_state = old.dense_optimizer.state_dict()["state"]
    names = [n for n, _ in new.model.named_parameters()]
    kept = new.dense_optimizer.state_dict()["state"]
    assert len(kept) == len(old_state) and names.index(CONTEXT_WEIGHT) not in kept
    torch.testing.assert_close(
        kept[names.index("item.mlp.0.weight")]["exp_avg"], old_state[len(old_state) - 4]["exp_avg"]
    )
    new.learn(new.observe_clicks(clicks(32, 1)), dense=True)  # the next nightly learns the context
    assert torch.count_nonzero(new.model.user.context.weight) > 0

    # the publisher and the retriever load such weights the same way
    model = model_from_checkpoint(_legacy(old.to_checkpoint({})))
    assert torch.count_nonzero(model.user.context.weight) == 0
    served = TwoTower(stored_model_config(_legacy(old.to_checkpoint({})).model_config))  # as the snapshot says
    arrays = {k: v for k, v in dense_arrays(old.model).items() if k != CONTEXT_WEIGHT}
    assert load_dense_arrays(served, arrays) == [CONTEXT_WEIGHT]
    broken = {k: v for k, v in arrays.items() if k != "user.skip.weight"}
    with pytest.raises(RuntimeError, match=r"user\.skip\.weight"):
        load_dense_arrays(TwoTower(ModelConfig(**SMALL, recent_len=0)), broken)


def test_serving_takes_the_request_context() -> None:
    """The retriever's user vector: the request time (``now_ms``) and the POST body's ``context``."""
    from retriever.app import RecommendRequest

    state, clicks = _toy()
    state.learn(state.observe_clicks(clicks(16, 0)), dense=True)
    serving = ServingState.from_full(VersionMeta(1, FULL, None, 1, 0, 0), full_snapshot(state.to_checkpoint({})))
    history = [("i0", _ms(2024, 1, 1, 7))]
    am = serving.user_vector("u0", history, None, _ms(2024, 1, 1, 8))
    assert not np.allclose(am, serving.user_vector("u0", history, None, _ms(2024, 1, 1, 20)), atol=1e-5)
    assert not np.allclose(am, serving.user_vector("u0", history, None, _ms(2024, 1, 1, 8), [2.0]), atol=1e-5)
    np.testing.assert_array_equal(am, serving.user_vector("u0", history, None, _ms(2024, 1, 1, 8), [0.0, 0.0]))
    assert RecommendRequest.model_validate({"user_id": "u0", "context": [1.0, 2.0]}).context == [1.0, 2.0]
