"""The simulator's ground truth: a seeded, pure model of users, items and their preferences.

Nothing here does I/O; the same world drives the live simulator (:mod:`producers.simulate`)
and can be rebuilt bit-for-bit by an offline evaluation from the same configuration.

The model, in the simulator's own ``latent_dim``-dimensional space (all vectors unit length):

* **Categories** ``c0..`` have random centroid directions.
* **Items** ``i0..`` belong to one category (uniformly drawn); their latent vector is the
  category centroid plus noise. Their **content features** are a fixed random linear
  projection of the latent vector plus a little noise, so content is informative: a new item
  of category ``c`` gets content close to the other items of ``c``. Each item has a
  Zipf-distributed **popularity** (weight ``1 / rank**zipf_a`` for a random rank).
* **Users** ``u0..`` have an interest vector mixing one to three categories. Interests
  **drift**: each user moves along the great circle towards a private target mix at
  ``drift_per_s`` radians (arc length on the unit sphere) per simulated second and picks a
  new target on arrival, so the speed does not depend on how often :meth:`advance` is called.
  **Profile features** are a fixed random projection of the user's *initial* interests plus
  noise (they go stale as the user drifts, as real profiles do). **Activity** is skewed:
  users are picked with log-normal weights, so a few users are much more active.
* **Preferences**: ``true_scores`` = ``cos(user, item) / temperature + popularity_weight *
  log(popularity)``. An organic click is a draw from the softmax of these scores over the
  whole current catalogue. A slate click at slot ``p`` happens with probability
  ``position_bias(p) * sigmoid(click_slope * (cos - click_midpoint))``.
* **New items** arrive every ``new_item_every_s`` of simulated time.

Indices are the world's handles: user ``u`` has id ``f"u{u}"``, item ``j`` has id
``f"i{j}"`` and category ``item_category[j]`` has id ``f"c{...}"``. Three independent random
streams are derived from ``seed``: construction, evolution (drift targets and new items) and
draws (users, clicks, slates), so the world's evolution does not depend on how many draws
the caller made.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from twotower.config import SimulatorConfig


@dataclass(frozen=True)
class WorldParams:
    """Shape constants of the ground truth that are not worth a config field."""

    item_noise: float = 0.5
    """Norm of the noise added to the category centroid of an item's latent vector (before normalising)."""
    user_noise: float = 0.3
    """Norm of the noise added to the category mix of a user's interests."""
    max_user_categories: int = 3
    """A user mixes between one and this many categories."""
    content_noise: float = 0.05
    """Standard deviation of the noise added to each content feature."""
    profile_noise: float = 0.3
    """Standard deviation of the noise added to each profile feature."""
    activity_sigma: float = 1.0
    """Sigma of the log-normal user activity weights (0: all users equally active)."""
    temperature: float = 0.1
    """Softmax temperature of the cosine affinity in :meth:`SimulatorWorld.true_scores`."""
    popularity_weight: float = 0.5
    """Weight of log-popularity in :meth:`SimulatorWorld.true_scores`."""
    click_slope: float = 8.0
    """Steepness of the slate click probability in the cosine affinity."""
    click_midpoint: float = 0.7
    """Cosine affinity at which an item in the top slot is clicked with probability one half."""


@dataclass(frozen=True)
class WorldItem:
    """An item as the catalogue sees it."""

    index: int
    item_id: str
    category: str
    content: np.ndarray
    """Content features (``content_dim`` float32 values)."""


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], norm: float) -> np.ndarray:
    """Gaussian noise whose rows have expected norm about ``norm``."""
    return rng.standard_normal(shape) * (norm / np.sqrt(shape[-1]))


def position_bias(position: int | np.ndarray) -> float | np.ndarray:
    """Examination probability of a slate slot: ``1 / log2(position + 2)`` (1 for the top slot)."""
    return 1.0 / np.log2(np.asarray(position, dtype=np.float64) + 2.0)


class SimulatorWorld:
    """Users, items and their true preferences; deterministic for a given config and call sequence.

    Args:
        cfg: the simulator section (sizes, Zipf exponent, drift speed, new-item period, seed).
        content_dim: number of content features per item (0 for none).
        profile_dim: number of profile features per user (0 for none).
        params: shape constants; the defaults are what the live simulator uses.
    """

    def __init__(
        self, cfg: SimulatorConfig, content_dim: int, profile_dim: int, params: WorldParams | None = None
    ) -> None:
        if content_dim < 0 or profile_dim < 0:
            raise ValueError(f"content_dim and profile_dim must be >= 0, got {content_dim} and {profile_dim}")
        self.cfg = cfg
        self.params = params or WorldParams()
        self.content_dim = content_dim
        self.profile_dim = profile_dim
        build, evolve, draw = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(3))
        self._evolve = evolve
        self.rng = draw
        """The default random stream of the draw methods."""
        d = cfg.latent_dim
        p = self.params

        self.category_centroids = _unit(build.standard_normal((cfg.n_categories, d)))
        self.content_projection = build.standard_normal((content_dim, d)) / np.sqrt(d)
        self.profile_projection = build.standard_normal((profile_dim, d)) / np.sqrt(d)

        categories = build.integers(0, cfg.n_categories, size=cfg.n_items)
        self.item_category = categories.astype(np.int64)
        """Category index of each item."""
        self.item_latent = _unit(self.category_centroids[categories] + _noise(build, (cfg.n_items, d), p.item_noise))
        """Ground-truth latent vector of each item (unit rows)."""
        self.item_content = self._content(build, self.item_latent)
        """Content features of each item (float32)."""
        ranks = build.permutation(cfg.n_items) + 1
        self.item_popularity = self._zipf(ranks)
        """Relative popularity of each item (1 for the most popular)."""

        self.user_latent = self._user_mix(build, cfg.n_users)
        """Current interest vector of each user (unit rows); changes with :meth:`advance`."""
        self.user_profile = self._profile(build, self.user_latent)
        """Profile features of each user, from the initial interests (float32)."""
        activity = build.lognormal(0.0, p.activity_sigma, size=cfg.n_users)
        self.user_activity = activity / activity.sum()
        """Probability of each user being the next one to make a request."""
        self._user_target = self._user_mix(evolve, cfg.n_users)

        self.now_s = 0.0
        """Simulated time in seconds since the world was created."""
        self._next_item_s = cfg.new_item_every_s
        self._log_popularity = np.log(self.item_popularity)

    # ------------------------------------------------------------------ construction helpers

    def _zipf(self, ranks: np.ndarray) -> np.ndarray:
        return np.asarray(ranks, dtype=np.float64) ** -self.cfg.zipf_a

    def _content(self, rng: np.random.Generator, latent: np.ndarray) -> np.ndarray:
        clean = latent @ self.content_projection.T
        return (clean + rng.standard_normal(clean.shape) * self.params.content_noise).astype(np.float32)

    def _profile(self, rng: np.random.Generator, latent: np.ndarray) -> np.ndarray:
        clean = latent @ self.profile_projection.T
        return (clean + rng.standard_normal(clean.shape) * self.params.profile_noise).astype(np.float32)

    def _user_mix(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Interest vectors mixing one to ``max_user_categories`` random categories each."""
        cfg, p = self.cfg, self.params
        out = np.empty((n, cfg.latent_dim))
        for u in range(n):
            k = int(rng.integers(1, min(p.max_user_categories, cfg.n_categories) + 1))
            cats = rng.choice(cfg.n_categories, size=k, replace=False)
            weights = rng.dirichlet(np.ones(k))
            out[u] = weights @ self.category_centroids[cats]
        return _unit(out + _noise(rng, out.shape, p.user_noise))

    # ------------------------------------------------------------------ ids

    @property
    def n_users(self) -> int:
        return self.user_latent.shape[0]

    @property
    def n_items(self) -> int:
        """Items in the current catalogue (grows as new items arrive)."""
        return self.item_latent.shape[0]

    @staticmethod
    def user_id(user: int) -> str:
        return f"u{user}"

    @staticmethod
    def item_id(item: int) -> str:
        return f"i{item}"

    def category_id(self, item: int) -> str:
        """The category id of an item."""
        return f"c{self.item_category[item]}"

    @staticmethod
    def item_index(item_id: str) -> int | None:
        """The index of an item id of this world's form (``"i123"``), else ``None``.

        The caller must still check the index against :attr:`n_items`.
        """
        if len(item_id) > 1 and item_id[0] == "i" and item_id[1:].isdigit():
            return int(item_id[1:])
        return None

    def item(self, index: int) -> WorldItem:
        """The catalogue view of one item."""
        return WorldItem(index, self.item_id(index), self.category_id(index), self.item_content[index])

    def items(self) -> list[WorldItem]:
        """The catalogue view of every current item."""
        return [self.item(j) for j in range(self.n_items)]

    # ------------------------------------------------------------------ evolution

    def advance(self, dt_s: float) -> None:
        """Move simulated time forward by ``dt_s`` seconds, drifting every user's interests.

        Each user moves along the great circle towards its target at ``drift_per_s`` radians
        per second; a user that reaches its target draws a new one.
        """
        if dt_s < 0:
            raise ValueError(f"time cannot go backwards (dt_s={dt_s})")
        self.now_s += dt_s
        step = self.cfg.drift_per_s * dt_s
        if step <= 0:
            return
        u, t = self.user_latent, self._user_target
        cos = np.clip(np.einsum("ij,ij->i", u, t), -1.0, 1.0)
        angle = np.arccos(cos)
        arrived = angle <= step
        moving = ~arrived
        if moving.any():
            # Slerp by `step` radians: the component of t orthogonal to u gives the direction.
            ortho = _unit(t[moving] - cos[moving, None] * u[moving])
            s = np.full(int(moving.sum()), step)
            u[moving] = _unit(np.cos(s)[:, None] * u[moving] + np.sin(s)[:, None] * ortho)
        if arrived.any():
            idx = np.flatnonzero(arrived)
            u[idx] = t[idx]
            self._user_target[idx] = self._user_mix(self._evolve, idx.size)

    def maybe_new_items(self, now_s: float | None = None) -> list[WorldItem]:
        """Add the items due by ``now_s`` (default: the world's clock); one per ``new_item_every_s``.

        A new item gets a random category, a latent vector near that category's centroid, its
        content projection, and a Zipf popularity for a uniformly random rank among the
        current items.

        Returns:
            The new items, oldest first (empty if none is due).
        """
        now_s = self.now_s if now_s is None else now_s
        due = 0
        while self._next_item_s <= now_s:
            due += 1
            self._next_item_s += self.cfg.new_item_every_s
        if due == 0:
            return []
        rng, d = self._evolve, self.cfg.latent_dim
        categories = rng.integers(0, self.cfg.n_categories, size=due)
        latent = _unit(self.category_centroids[categories] + _noise(rng, (due, d), self.params.item_noise))
        content = self._content(rng, latent)
        popularity = self._zipf(rng.integers(1, self.n_items + 1, size=due))
        first = self.n_items
        self.item_category = np.concatenate([self.item_category, categories])
        self.item_latent = np.vstack([self.item_latent, latent])
        self.item_content = np.vstack([self.item_content, content])
        self.item_popularity = np.concatenate([self.item_popularity, popularity])
        self._log_popularity = np.log(self.item_popularity)
        return [self.item(j) for j in range(first, self.n_items)]

    # ------------------------------------------------------------------ preferences

    def affinity(self, user: int) -> np.ndarray:
        """Cosine between the user's current interests and every current item."""
        return self.item_latent @ self.user_latent[user]

    def true_scores(self, user: int) -> np.ndarray:
        """The user's true preference logits over every current item (affinity and popularity)."""
        p = self.params
        return self.affinity(user) / p.temperature + p.popularity_weight * self._log_popularity

    def click_probability(self, user: int, slate: Sequence[int]) -> np.ndarray:
        """Probability that the user clicks each slot of ``slate`` (item indices; ``-1`` = unknown item)."""
        slate_arr = np.asarray(slate, dtype=np.int64)
        known = (slate_arr >= 0) & (slate_arr < self.n_items)
        cos = np.zeros(slate_arr.size)
        cos[known] = self.item_latent[slate_arr[known]] @ self.user_latent[user]
        p = self.params
        prob = position_bias(np.arange(slate_arr.size)) / (1.0 + np.exp(-p.click_slope * (cos - p.click_midpoint)))
        return np.where(known, prob, 0.0)

    # ------------------------------------------------------------------ draws

    def pick_user(self, rng: np.random.Generator | None = None) -> int:
        """A user drawn by activity (some users are much more active than others)."""
        rng = rng or self.rng
        return int(rng.choice(self.n_users, p=self.user_activity))

    def organic_click(self, user: int, exclude: Collection[int] = (), rng: np.random.Generator | None = None) -> int:
        """An item the user picks on their own: a draw from softmax(:meth:`true_scores`).

        Args:
            user: user index.
            exclude: item indices not to pick (items the user already clicked); ignored if it
                covers the whole catalogue.
            rng: random stream; default :attr:`rng`.
        """
        rng = rng or self.rng
        scores = self.true_scores(user)
        if exclude and len(exclude) < scores.size:
            scores[np.fromiter(exclude, dtype=np.int64, count=len(exclude))] = -np.inf
        # Gumbel-max trick: argmax(logits + Gumbel noise) is a softmax draw.
        return int(np.argmax(scores + rng.gumbel(size=scores.size)))

    def slate_clicks(self, user: int, slate: Sequence[int], rng: np.random.Generator | None = None) -> list[int]:
        """Positions of ``slate`` (item indices, ``-1`` = unknown) that the user clicks, each independently."""
        rng = rng or self.rng
        prob = self.click_probability(user, slate)
        return [int(i) for i in np.flatnonzero(rng.random(prob.size) < prob)]

    def random_slate(self, k: int, rng: np.random.Generator | None = None) -> list[int]:
        """``k`` distinct items drawn uniformly (all items if the catalogue is smaller)."""
        rng = rng or self.rng
        return [int(j) for j in rng.choice(self.n_items, size=min(k, self.n_items), replace=False)]

    def popular_slate(self, k: int, rng: np.random.Generator | None = None) -> list[int]:
        """``k`` distinct items drawn with probability proportional to popularity, most popular first.

        Sampling without replacement via Gumbel-top-k over log-popularity.
        """
        rng = rng or self.rng
        k = min(k, self.n_items)
        keys = self._log_popularity + rng.gumbel(size=self.n_items)
        top = np.argpartition(-keys, k - 1)[:k] if k < self.n_items else np.arange(self.n_items)
        order = top[np.argsort(-self.item_popularity[top], kind="stable")]
        return [int(j) for j in order]
