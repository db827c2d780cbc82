"""Differentiable history pooling for the ``mean`` user tower (``trainer.history_gradient``).

The user tower pools the time-decayed mean of the item vectors of a user's recent history.
Without a gradient through that mean, the item tower learns only from the items' role as
*targets*; with it, every click also pulls the vectors of the items that preceded it towards
the clicked item (as YouTubeDNN, whose watch-history embeddings are trained with the rest),
which is where co-occurrence (item-to-item) signal enters the item vectors.

The helpers here lay the histories out against one shared list of item columns, so one item
tower forward pass over ``candidates + history items`` serves both the candidate scores and the
pooled histories, and the ID-row gradients of history items land in the same row update.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from twotower.config import ModelConfig
from twotower.model import history_pools, pooling_weights


def history_columns(cand_ids: Sequence[str], histories: Sequence[Sequence[tuple[str, int]]]) -> list[str]:
    """``cand_ids`` followed by the history items that are not candidates (first-seen order)."""
    out = list(cand_ids)
    seen = set(out)
    for hist in histories:
        for item, _ in hist:
            if item not in seen:
                seen.add(item)
                out.append(item)
    return out


def pooling_matrix(
    columns: Sequence[str],
    histories: Sequence[Sequence[tuple[str, int]]],
    now_ms: Sequence[int],
    cfg: ModelConfig,
) -> torch.Tensor:
    """``[history_pools, B, len(columns)]`` weights: ``out[s, b]`` @ item vectors = view ``s`` of user
    ``b``'s pooled history (histories oldest first).

    Each row sums to 1 (0 for an empty history), as :func:`twotower.model.pool_history` weighs;
    an item repeated in a history gets the sum of its weights.
    """
    col = {item: i for i, item in enumerate(columns)}
    out = np.zeros((history_pools(cfg), len(histories), len(columns)), dtype=np.float32)
    for b, hist in enumerate(histories):
        if not hist:
            continue
        ts = np.fromiter((t for _, t in hist), dtype=np.int64, count=len(hist))
        w = pooling_weights(ts, now_ms[b], cfg)
        cols = [col[item] for item, _ in hist]
        for s in range(w.shape[0]):
            np.add.at(out[s, b], cols, w[s])
    return torch.from_numpy(out)


def pool_views(weights: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``[B, history_pools · dim]``: the views of :func:`pooling_matrix` applied to ``vectors``, concatenated."""
    return torch.cat([w @ vectors for w in weights], dim=-1)
