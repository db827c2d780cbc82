"""The numpy user tower (the retriever's single-request path) equals the torch tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twotower.config import ModelConfig
from twotower.model import NumpyUserTower, TwoTower, UserTower, context_matrix, context_width, history_pools

SMALL = {"dim": 8, "id_dim": 4, "hidden": 16, "n_categories": 4, "content_dim": 2, "profile_dim": 3}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"example_age": True},
        {"context_time": True, "context_dim": 2},
        {"context_dim": 0},
        {"recent_len": 0},
        {"profile_dim": 0},
    ],
)
def test_numpy_user_tower_equals_the_torch_tower(extra: dict) -> None:
    cfg = ModelConfig(**{**SMALL, **extra})
    torch.manual_seed(3)
    model = TwoTower(cfg).eval()
    assert isinstance(model.user, UserTower)
    with torch.no_grad():  # non-trivial context weights (a fresh model may have them at zero)
        if model.user.context is not None:
            model.user.context.weight.normal_()
    tower = NumpyUserTower(model.user)
    rng = np.random.default_rng(5)
    for trial in range(20):
        id_row = rng.standard_normal(cfg.id_dim).astype(np.float32)
        profile = rng.standard_normal(cfg.profile_dim).astype(np.float32)
        pooled = rng.standard_normal(history_pools(cfg) * cfg.dim).astype(np.float32)
        if trial == 0:  # a user with nothing: zero row, profile and history
            id_row, profile, pooled = np.zeros_like(id_row), np.zeros_like(profile), np.zeros_like(pooled)
        contexts = [{"features": rng.standard_normal(cfg.context_dim).tolist()} if trial % 2 else None]
        ctx = context_matrix(cfg, [1_700_000_000_000 + trial * 3_600_000], contexts)
        with torch.no_grad():
            rows = [torch.from_numpy(a)[None] for a in (id_row, profile, pooled)]
            want = model.user(*rows, None, ctx)[0].numpy()
        got = tower(id_row, profile, pooled, ctx.numpy()[0] if context_width(cfg) else None)
        assert got.dtype == np.float32 and got.shape == (cfg.dim,)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_numpy_user_tower_copies_the_weights() -> None:
    cfg = ModelConfig(**SMALL)
    model = TwoTower(cfg).eval()
    tower = NumpyUserTower(model.user)  # type: ignore[arg-type]
    args = (np.ones(cfg.id_dim, np.float32), np.ones(cfg.profile_dim, np.float32), np.ones(2 * cfg.dim, np.float32))
    before = tower(*args)
    with torch.no_grad():
        model.user.mlp[0].weight.add_(1.0)
    np.testing.assert_array_equal(tower(*args), before)
