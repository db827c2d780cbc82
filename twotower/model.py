"""The two towers: the dense part of the model, shared by the trainer, publisher and retriever.

ID-embedding rows are *inputs* here, not parameters: they live in growing tables owned by the
trainer and travel in snapshots, so that streaming can update rows while the dense weights
(this module's parameters) stay frozen, and the retriever can run the user tower with rows
it received.

* Item tower: ``[item ID row | category embedding | content features]`` → MLP → L2-normalised.
  An unknown or new item has an all-zero ID row, so its vector comes from content alone.
* User tower: ``[user ID row | profile features | time-decayed mean of history item vectors]``
  → MLP, plus a learned linear skip of the pooled history → L2-normalised. A user with no ID
  row yet still gets a vector from profile and history (YouTubeDNN-style pooling).

Scores are cosine similarity divided by the temperature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from twotower.config import ModelConfig

UNKNOWN_CATEGORY = 0


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class ItemTower(nn.Module):
    """Item ID row + category + content → unit vector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.content_dim = cfg.content_dim
        self.category = nn.Embedding(cfg.n_categories + 1, cfg.id_dim)  # row 0: unknown category
        nn.init.normal_(self.category.weight, std=0.1)
        self.mlp = _mlp(2 * cfg.id_dim + cfg.content_dim, cfg.hidden, cfg.dim)

    def forward(self, id_rows: torch.Tensor, category: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """Args: id_rows ``[B, id_dim]``, category ``[B]`` (long), content ``[B, content_dim]``."""
        x = torch.cat([id_rows, self.category(category), content], dim=-1)
        return nn.functional.normalize(self.mlp(x), dim=-1)


class UserTower(nn.Module):
    """User ID row + profile + pooled history vectors → unit vector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.profile_dim = cfg.profile_dim
        self.mlp = _mlp(cfg.id_dim + cfg.profile_dim + cfg.dim, cfg.hidden, cfg.dim)
        self.skip = nn.Linear(cfg.dim, cfg.dim, bias=False)
        with torch.no_grad():
            self.skip.weight.copy_(torch.eye(cfg.dim))

    def forward(self, id_rows: torch.Tensor, profile: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Args: id_rows ``[B, id_dim]``, profile ``[B, profile_dim]``, pooled history ``[B, dim]``."""
        x = torch.cat([id_rows, profile, pooled], dim=-1)
        return nn.functional.normalize(self.mlp(x) + self.skip(pooled), dim=-1)


class TwoTower(nn.Module):
    """Both towers; its ``state_dict`` is the model's dense weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.user = UserTower(cfg)
        self.item = ItemTower(cfg)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` logits: cosine / temperature (inputs are unit vectors)."""
        return users @ items.T / self.cfg.temperature


def decay_weights(ts_ms: np.ndarray, now_ms: int, half_life_s: float) -> np.ndarray:
    """Normalised time-decay weights of history events (newer weigh more; future clipped to now).

    Returns an all-zero vector for an empty history.
    """
    if ts_ms.size == 0:
        return np.zeros(0, dtype=np.float32)
    age_s = np.maximum(now_ms - ts_ms.astype(np.float64), 0.0) / 1000.0
    w = np.power(0.5, age_s / half_life_s)
    total = w.sum()
    if total <= 0:  # every event is astronomically old: fall back to a plain mean
        w = np.ones_like(w)
        total = w.sum()
    return (w / total).astype(np.float32)


def pool_history(vectors: np.ndarray, ts_ms: np.ndarray, now_ms: int, half_life_s: float) -> np.ndarray:
    """Time-decayed weighted mean of ``vectors`` ``[H, dim]``; zeros for no history."""
    if vectors.shape[0] == 0:
        return np.zeros(vectors.shape[1], dtype=np.float32)
    return decay_weights(ts_ms, now_ms, half_life_s) @ vectors.astype(np.float32, copy=False)


def fit_features(values: Sequence[float] | None, dim: int) -> np.ndarray:
    """A feature list cut or zero-padded to ``dim`` float32 values."""
    out = np.zeros(dim, dtype=np.float32)
    if values:
        n = min(dim, len(values))
        out[:n] = np.asarray(values[:n], dtype=np.float32)
    return out


def dense_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The dense weights as named float32 numpy arrays (for snapshots)."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def load_dense_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load weights produced by :func:`dense_arrays`; shapes and names must match exactly."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)
