"""The policy interface and the baseline policies.

A policy sees the replay through five calls, always in this order per post-warm-up event:
``end_of_day`` (only when the event starts a new UTC day), ``advance`` (the clock reached
the event; publish what is due), ``recommend`` (score), then the world observes the event
and ``learn`` is called. ``recommend`` must only use what the policy has *published* plus
the world's histories; it may return fewer items than asked (the core fills from trailing
popularity) or none (no usable state for the user).

Baselines:

* ``popularity_7d``: trailing 7-day interaction counts (the world's own ranking).
* ``als_nightly``: :mod:`implicit`'s ALS over every interaction so far, refitted from scratch
  at each day boundary; a user or item first seen since the last fit is unknown to it.
* ``itemknn_stream``: item-item cosine similarity of co-occurrence (binary user x item
  matrix), rebuilt at each day boundary; a user is scored against their last 20 items as
  they arrive (the history is visible at once).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from evaluation.protocol import Event, World

log = logging.getLogger(__name__)


class Policy(ABC):
    """A recommendation policy under replay. Subclasses set :attr:`name`."""

    name: str = "policy"
    nightly: bool = False
    """True when the policy retrains at day boundaries (reported in the JSON)."""

    def __init__(self) -> None:
        self.retrains = 0
        self.publishes = 0
        self.seconds: dict[str, float] = {}

    def _timed(self, phase: str, started: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

    def bootstrap(self, warmup: Sequence[Event], world: World) -> None:  # noqa: B027 - optional hook
        """Learn from the warm-up events (the world has observed them all)."""

    def end_of_day(self, day: int, events: Sequence[Event], world: World) -> None:  # noqa: B027
        """A UTC day ended; ``events`` are that day's (the world has observed them)."""

    def advance(self, now_ms: int, world: World) -> None:  # noqa: B027
        """The clock reached ``now_ms``: make visible what is due by then."""

    @abstractmethod
    def recommend(self, user: str, now_ms: int, world: World, n: int) -> list[str]:
        """Up to ``n`` items for ``user``, best first, none of them already seen by the user."""

    def learn(self, event: Event, world: World) -> None:  # noqa: B027
        """Learn from ``event`` (the world has just observed it)."""

    def describe(self) -> dict[str, Any]:
        """Settings and counters for the JSON report."""
        return {
            "nightly": self.nightly,
            "retrains": self.retrains,
            "publishes": self.publishes,
            "seconds": {k: round(v, 2) for k, v in sorted(self.seconds.items())},
        }


def top_unseen(scores: np.ndarray, item_ids: Sequence[str], seen: set[str] | frozenset[str], n: int) -> list[str]:
    """The ``n`` best-scoring items not in ``seen``, best first.

    Ties keep index order (items that appeared first win), so results never depend on hashing.
    Items with score ``-inf`` are never returned.
    """
    m = scores.shape[0]
    if m == 0 or n <= 0:
        return []
    fetch = min(m, n + len(seen))
    if fetch < m:
        cut = scores[np.argpartition(-scores, fetch - 1)[fetch - 1]]
        # every item scoring at least the cut: argpartition picks among items tied at the cut
        # arbitrarily, and the index order must decide between them
        part = np.flatnonzero(scores >= cut)
        part = part[np.lexsort((part, -scores[part]))]
    else:
        part = np.lexsort((np.arange(m), -scores))
    out: list[str] = []
    for idx in part.tolist():
        if not np.isfinite(scores[idx]):
            break
        item = item_ids[idx]
        if item in seen:
            continue
        out.append(item)
        if len(out) == n:
            break
    return out


def interaction_matrix(world: World) -> sp.csr_matrix:
    """Binary ``users x items`` CSR matrix of every interaction the world observed."""
    n_users, n_items = len(world.user_ids), world.n_items
    if not world.pairs_user:
        return sp.csr_matrix((n_users, n_items), dtype=np.float32)
    rows = np.asarray(world.pairs_user, dtype=np.int64)
    cols = np.asarray(world.pairs_item, dtype=np.int64)
    matrix = sp.csr_matrix((np.ones(rows.shape[0], dtype=np.float32), (rows, cols)), shape=(n_users, n_items))
    matrix.data[:] = 1.0  # repeated (user, item) pairs were summed: binarise
    return matrix


class PopularityPolicy(Policy):
    """``popularity_7d``: the trailing-window ranking, minus the user's seen items."""

    name = "popularity_7d"

    def recommend(self, user: str, now_ms: int, world: World, n: int) -> list[str]:
        return world.popular(n, world.seen_by(user))


def fold_in_user(
    item_factors: np.ndarray, yty: np.ndarray, items: Sequence[int], confidence: float, regularization: float
) -> np.ndarray:
    """ALS user factors for a user who interacted with ``items`` (rows of ``item_factors``, each
    observed once, weighted ``confidence``), the item factors held fixed: the normal equations
    a fit solves for each user (Hu, Koren, Volinsky 2008), ``(YᵀY + λI + (c-1) YᵢᵀYᵢ) x = c Σ yᵢ``
    (``yty`` is ``YᵀY``). So a user's live history is scored without a refit."""
    y = item_factors[np.asarray(items, dtype=np.int64)].astype(np.float64)
    a = yty + regularization * np.eye(yty.shape[0]) + (confidence - 1.0) * (y.T @ y)
    return np.linalg.solve(a, confidence * y.sum(axis=0))


class ALSNightly(Policy):
    """``als_nightly``: implicit-feedback ALS (Hu, Koren, Volinsky 2008) refitted every day boundary.

    A user is scored on their live history, as every policy sees it: folded into the last fit's
    item factors (:func:`fold_in_user`, the fit's own equations for that user), so a user first
    seen since the last fit, or their clicks since, count at once. Scored on the fit's user
    factors alone, a user new that day got nothing but the popularity fill (72 % of the events
    scored on MovieLens-100K).

    Every fit covers every interaction so far (binary values scaled by ``alpha``). The first
    fit (on the warm-up) starts from random factors and runs ``iterations`` sweeps; each
    nightly refit is warm-started from the previous factors (users and items new since then
    start random, as in a cold fit) and runs ``warm_iterations`` sweeps, which is enough for a
    matrix that changed by one day.

    Args:
        factors: latent dimension.
        regularization: L2 weight.
        alpha: confidence scaling of observed interactions.
        iterations: ALS sweeps of the first fit.
        warm_iterations: ALS sweeps of each warm-started nightly refit.
        seed: initialisation seed.
    """

    name = "als_nightly"
    nightly = True

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 2.0,
        iterations: int = 15,
        warm_iterations: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.warm_iterations = warm_iterations
        self.seed = seed
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None
        self.yty: np.ndarray | None = None
        self.item_ids: list[str] = []
        self.item_pos: dict[str, int] = {}

    def _grown(self, old: np.ndarray | None, rows: int, rng: np.random.Generator) -> np.ndarray | None:
        """``old`` extended to ``rows`` rows, new rows initialised like implicit's cold start."""
        if old is None:
            return None
        out = np.empty((rows, self.factors), dtype=np.float32)
        out[: old.shape[0]] = old
        out[old.shape[0] :] = rng.random((rows - old.shape[0], self.factors), dtype=np.float32) * 0.01
        return out

    def _fit(self, world: World, day: int = 0) -> None:
        started = time.perf_counter()
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        matrix = interaction_matrix(world)
        warm = self.user_factors is not None
        rng = np.random.default_rng([self.seed, day])
        with threadpool_limits(1):
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.warm_iterations if warm else self.iterations,
                calculate_training_loss=False,
                num_threads=1,
                random_state=self.seed,
            )
            model.user_factors = self._grown(self.user_factors, matrix.shape[0], rng)
            model.item_factors = self._grown(self.item_factors, matrix.shape[1], rng)
            model.fit(matrix, show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)
        self.yty = self.item_factors.T.astype(np.float64) @ self.item_factors.astype(np.float64)
        self.item_ids = list(world.item_ids)
        self.item_pos = {item: i for i, item in enumerate(self.item_ids)}
        self.retrains += 1
        self._timed("fit", started)

    def bootstrap(self, warmup: Sequence[Event], world: World) -> None:
        self._fit(world)

    def end_of_day(self, day: int, events: Sequence[Event], world: World) -> None:
        self._fit(world, day)

    def recommend(self, user: str, now_ms: int, world: World, n: int) -> list[str]:
        if self.item_factors is None or self.yty is None:
            return []
        items = sorted({pos for item, _ in world.history(user) if (pos := self.item_pos.get(item)) is not None})
        if not items:
            return []
        x = fold_in_user(self.item_factors, self.yty, items, self.alpha, self.regularization)
        scores = self.item_factors @ x.astype(np.float32)
        return top_unseen(scores, self.item_ids, world.seen_by(user), n)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "factors": self.factors,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "iterations": self.iterations,
            "warm_iterations": self.warm_iterations,
            "refit": "every interaction so far, at each UTC day boundary, warm-started from the previous factors",
            "scoring": "the user's live history folded into the last fit's item factors",
        }


class ItemKNNStream(Policy):
    """``itemknn_stream``: cosine item-item co-occurrence, rebuilt daily, scored on the live history.

    The similarity of items ``h`` and ``j`` is ``c(h, j) / sqrt(n_h n_j)`` over the binary user x
    item matrix ``X`` of the last rebuild (``c`` co-occurrence counts, ``n`` item counts). A
    user's score of ``j`` sums the similarities to their last ``history_items`` distinct known
    items. It is computed without materialising the item x item matrix, as
    ``score = (X^T (X[:, H] / n_H^(1/2))) / n^(1/2)``, which is the same sum.

    Args:
        history_items: how many of the user's most recent (distinct) items are summed over.
    """

    name = "itemknn_stream"
    nightly = True

    def __init__(self, history_items: int = 20) -> None:
        super().__init__()
        self.history_items = history_items
        self.by_user = sp.csr_matrix((0, 0), dtype=np.float32)
        self.by_item = sp.csc_matrix((0, 0), dtype=np.float32)
        self.inv_norm = np.zeros(0, dtype=np.float64)
        self.item_ids: list[str] = []
        self.item_pos: dict[str, int] = {}

    def _build(self, world: World) -> None:
        started = time.perf_counter()
        x = interaction_matrix(world).astype(np.float64)
        counts = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
        inv = np.zeros_like(counts)
        inv[counts > 0] = 1.0 / np.sqrt(counts[counts > 0])
        self.by_user = x.T.tocsr()  # items x users: X^T as CSR for the product below
        self.by_item = x.tocsc()
        self.inv_norm = inv
        self.item_ids = list(world.item_ids)
        self.item_pos = dict(world.item_index)
        self.retrains += 1
        self._timed("build", started)

    def bootstrap(self, warmup: Sequence[Event], world: World) -> None:
        self._build(world)

    def end_of_day(self, day: int, events: Sequence[Event], world: World) -> None:
        self._build(world)

    def recent_known(self, user: str, world: World) -> list[int]:
        """Positions (in the last rebuild) of the user's last distinct known items, newest first."""
        out: list[int] = []
        taken: set[int] = set()
        for item, _ in reversed(world.history(user)):
            pos = self.item_pos.get(item)
            if pos is not None and pos not in taken:
                out.append(pos)
                taken.add(pos)
                if len(out) == self.history_items:
                    break
        return out

    def scores(self, rows: Sequence[int]) -> np.ndarray:
        """Summed cosine similarity of every item to the items at ``rows``."""
        weights = self.by_item[:, list(rows)] @ self.inv_norm[list(rows)]  # per user: sum_h X[u, h] / sqrt(n_h)
        return (self.by_user @ weights) * self.inv_norm

    def recommend(self, user: str, now_ms: int, world: World, n: int) -> list[str]:
        rows = self.recent_known(user, world)
        if not rows:
            return []
        scores = self.scores(rows)
        scores[rows] = -np.inf  # an item's similarity to itself is not evidence (and it is seen)
        scores[scores <= 1e-12] = -np.inf  # no co-occurrence: no evidence (the fallback fills)
        return top_unseen(scores, self.item_ids, world.seen_by(user), n)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "history_items": self.history_items,
            "similarity": "cosine of binary co-occurrence, all interactions so far, rebuilt at each UTC day boundary",
        }
