"""The two towers: the dense part of the model, shared by the trainer, publisher and retriever.

ID-embedding rows are *inputs* here, not parameters: they live in growing tables owned by the
trainer and travel in snapshots, so that streaming can update rows while the dense weights
(this module's parameters) stay frozen, and the retriever can run the user tower with rows
it received.

* Item tower: ``[item ID row | category embedding | content features]`` → MLP → L2-normalised.
  An unknown or new item has an all-zero ID row, so its vector comes from content alone.
* User tower (``model.user_tower``):

  - ``mean``: ``[user ID row | profile features | time-decayed mean of history item vectors]``
    → MLP, plus a learned linear skip of the pooled history → L2-normalised. A user with no ID
    row yet still gets a vector from profile and history (YouTubeDNN-style pooling).
  - ``mind``: MIND (Li et al. 2019). Behaviour-to-interest dynamic routing over the history item
    vectors (newest first) gives up to ``interests`` capsules; each capsule, concatenated with the ID row and
    profile, goes through a shared MLP (+ linear skip of the capsule) → one unit vector per
    interest. Scores against an item are the max over the user's active interests at serving,
    and label-aware (or max) during training (:meth:`TwoTower.score_interests`).

* Example age (``model.example_age``, YouTubeDNN): one more user-tower input, the age of the
  training example, ``log1p`` of (trainer clock - event time) in days, while training; 0 at
  serving (:func:`example_age_days`).
* Context (``model.context_time``, ``model.context_dim``): the request's context, ``[sin, cos]``
  of the hour of day and of the day of week (UTC) of the event time (training: the click's time;
  serving: the request's time), then a dense vector the caller supplies (an event's
  ``context["features"]``, cut or zero-padded to ``context_dim``; :func:`context_matrix`). It
  enters both user towers through its own linear map into the first hidden layer
  (``user.context``), which is the same as widening the MLP's input, but keeps the older weights
  loadable: a checkpoint or snapshot without ``user.context.weight`` gets zeros there, i.e.
  exactly its old outputs, until a dense retrain learns them (:func:`load_dense_state`).

Scores are cosine similarity divided by the temperature.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from twotower.config import ModelConfig

log = logging.getLogger(__name__)

UNKNOWN_CATEGORY = 0
MS_PER_DAY = 86_400_000
TIME_FEATURES = 4
"""Context columns of ``model.context_time``: sin/cos of hour of day, sin/cos of day of week."""
CONTEXT_FEATURES_KEY = "features"
"""Key of an event's (or request's) ``context`` map that holds its dense context vector."""
_EPOCH_WEEKDAY = 3
"""1970-01-01 was a Thursday: days since Monday at the epoch."""


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def _identity_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
    return layer


def _age_column(age: torch.Tensor | None, batch: int, ref: torch.Tensor) -> torch.Tensor:
    """The example-age input ``[B, 1]`` (zeros, as at serving, when ``age`` is ``None``)."""
    if age is None:
        return torch.zeros(batch, 1, dtype=ref.dtype)
    return age.reshape(batch, 1).to(ref.dtype)


def context_width(cfg: ModelConfig) -> int:
    """Columns of the user tower's context input: time features (if on) + ``context_dim``."""
    return TIME_FEATURES * int(cfg.context_time) + cfg.context_dim


def context_vector(values: object, dim: int) -> np.ndarray:
    """A caller's dense context vector as ``dim`` float32 values (cut or zero-padded).

    Anything that is not a list of finite numbers (a missing key, a string, a NaN, a bool)
    gives zeros: event contexts are free-form maps, so a malformed vector must not stop training.
    """
    out = np.zeros(dim, dtype=np.float32)
    if dim == 0 or not isinstance(values, list | tuple):
        return out
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in values):
        return out
    n = min(dim, len(values))
    out[:n] = np.asarray(values[:n], dtype=np.float32)
    return out


def _time_row(ts_ms: int) -> list[float]:
    day_ms = ts_ms % MS_PER_DAY  # integer arithmetic: exact for any epoch-ms time
    day = day_ms / MS_PER_DAY
    week = ((ts_ms // MS_PER_DAY + _EPOCH_WEEKDAY) % 7 + day) / 7.0
    return [
        math.sin(2.0 * math.pi * day),
        math.cos(2.0 * math.pi * day),
        math.sin(2.0 * math.pi * week),
        math.cos(2.0 * math.pi * week),
    ]


def time_features(ts_ms: Sequence[int] | np.ndarray) -> np.ndarray:
    """``[B, 4]`` cyclical time of ``ts_ms`` (epoch ms, UTC): sin/cos of the hour of day and of
    the day of week (both continuous, so 23:59 is next to 00:00 and Sunday night to Monday)."""
    return np.array([_time_row(int(t)) for t in ts_ms], dtype=np.float32).reshape(-1, TIME_FEATURES)


def context_array(
    cfg: ModelConfig, ts_ms: Sequence[int] | np.ndarray, contexts: Sequence[Mapping[str, object] | None]
) -> np.ndarray:
    """:func:`context_matrix` as a float32 numpy array (the retriever's numpy tower takes it)."""
    width = context_width(cfg)
    out = np.zeros((len(contexts), width), dtype=np.float32)
    if cfg.context_time:
        out[:, :TIME_FEATURES] = time_features(ts_ms)
    if cfg.context_dim:
        for row, ctx in enumerate(contexts):
            if ctx:
                out[row, width - cfg.context_dim :] = context_vector(ctx.get(CONTEXT_FEATURES_KEY), cfg.context_dim)
    return out


def context_matrix(
    cfg: ModelConfig, ts_ms: Sequence[int] | np.ndarray, contexts: Sequence[Mapping[str, object] | None]
) -> torch.Tensor:
    """``[B, context_width(cfg)]`` context input of the user tower.

    Args:
        cfg: the model's config (which context parts it has).
        ts_ms: per row, the event (training) or request (serving) time, epoch ms.
        contexts: per row, the event's or request's ``context`` map (``None``: no dense context);
            its ``features`` entry is the dense context vector (:func:`context_vector`).
    """
    return torch.from_numpy(context_array(cfg, ts_ms, contexts))


def _context_layer(cfg: ModelConfig) -> nn.Linear | None:
    width = context_width(cfg)
    return nn.Linear(width, cfg.hidden, bias=False) if width else None


def _mlp_with_context(
    mlp: nn.Sequential, x: torch.Tensor, layer: nn.Linear | None, context: torch.Tensor | None
) -> torch.Tensor:
    """``mlp(x)`` with ``layer(context)`` added to the first layer's pre-activation (= ``mlp`` over
    ``[x | context]``); ``context`` ``[..., width]`` broadcasts over ``x``'s middle axes, ``None`` = 0."""
    h = mlp[0](x)
    if layer is not None and context is not None:
        c = layer(context.to(h.dtype))
        h = h + (c.unsqueeze(1) if h.dim() == 3 else c)
    for module in list(mlp)[1:]:  # the rest of the MLP (no new Sequential per call)
        h = module(h)
    return h


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
    """User ID row + profile + pooled history vectors (+ example age, + context) → unit vector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.profile_dim = cfg.profile_dim
        self.example_age = cfg.example_age
        self.dim = cfg.dim
        pooled = history_pools(cfg) * cfg.dim
        self.mlp = _mlp(cfg.id_dim + cfg.profile_dim + pooled + int(cfg.example_age), cfg.hidden, cfg.dim)
        self.skip = _identity_linear(cfg.dim)
        self.context = _context_layer(cfg)

    def forward(
        self,
        id_rows: torch.Tensor,
        profile: torch.Tensor,
        pooled: torch.Tensor,
        age: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args: id_rows ``[B, id_dim]``, profile ``[B, profile_dim]``, pooled history
        ``[B, history_pools · dim]`` (:func:`pool_history`; the skip takes the time-decayed view),
        age ``[B]`` example-age input of :func:`example_age_days` (used only with ``example_age``;
        ``None`` = 0, as at serving), context ``[B, context_width]`` of :func:`context_matrix`
        (``None`` = 0)."""
        parts = [id_rows, profile, pooled]
        if self.example_age:
            parts.append(_age_column(age, id_rows.shape[0], id_rows))
        x = torch.cat(parts, dim=-1)
        return nn.functional.normalize(
            _mlp_with_context(self.mlp, x, self.context, context) + self.skip(pooled[:, : self.dim]), dim=-1
        )


class NumpyUserTower:
    """:class:`UserTower`'s forward pass for one user in numpy, for serving.

    Same weights and arithmetic as the module in eval mode (float32; outputs equal within float
    rounding), without torch's per-operator dispatch, which for these few small matrices costs
    far more than the arithmetic (measured on one request: ~0.4 ms in torch against ~0.03 ms
    here). The weights are copied once, transposed, when it is built; the module is not kept.
    """

    def __init__(self, tower: UserTower) -> None:
        def weight(layer: nn.Linear) -> np.ndarray:
            return np.ascontiguousarray(layer.weight.detach().cpu().numpy().T, dtype=np.float32)

        def bias(layer: nn.Linear) -> np.ndarray:
            if layer.bias is None:
                return np.zeros(layer.out_features, dtype=np.float32)
            return layer.bias.detach().cpu().numpy().astype(np.float32)

        first, relu, second = tower.mlp
        if not (isinstance(first, nn.Linear) and isinstance(relu, nn.ReLU) and isinstance(second, nn.Linear)):
            raise TypeError("expected the user tower's MLP to be Linear, ReLU, Linear")
        self.dim = tower.dim
        self.example_age = tower.example_age
        self.w1 = weight(first)
        """``[inputs, hidden]``: the first layer, transposed."""
        self.b1 = bias(first)
        self.w2 = weight(second)
        self.b2 = bias(second)
        self.skip = weight(tower.skip)
        self.context = weight(tower.context) if tower.context is not None else None

    def __call__(
        self, id_row: np.ndarray, profile: np.ndarray, pooled: np.ndarray, context: np.ndarray | None = None
    ) -> np.ndarray:
        """The unit user vector ``[dim]`` (float32).

        Args: one user's id row ``[id_dim]``, profile ``[profile_dim]``, pooled history
        ``[history_pools · dim]`` (:func:`pool_history`), context ``[context_width]`` of
        :func:`context_matrix` (``None`` = 0); the example age, if the model has one, is 0 (serving).
        """
        parts = [id_row, profile, pooled]
        if self.example_age:
            parts.append(np.zeros(1, dtype=np.float32))
        x = np.concatenate(parts).astype(np.float32, copy=False)
        h = x @ self.w1
        h += self.b1
        if self.context is not None and context is not None:
            h += context.astype(np.float32, copy=False) @ self.context
        np.maximum(h, 0.0, out=h)
        out = h @ self.w2
        out += self.b2
        out += pooled[: self.dim].astype(np.float32, copy=False) @ self.skip
        return out / max(float(np.sqrt(np.dot(out, out))), 1e-12)


def squash(z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Capsule squashing along the last axis: ``|z|² / (1 + |z|²) · z / |z|`` (zeros stay zero)."""
    sq = z.pow(2).sum(dim=-1, keepdim=True)
    return z * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


def active_interests(n_history: torch.Tensor, max_interests: int) -> torch.Tensor:
    """MIND's dynamic interest number ``max(1, min(K, floor(log2 n)))`` per user, as ``[B]`` int64."""
    n = n_history.to(torch.float64).clamp(min=1.0)
    return torch.floor(torch.log2(n)).to(torch.int64).clamp(min=1, max=max_interests)


def farthest_point_seeds(vectors: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` positions of ``k`` mutually distant history items per user (greedy k-means++-style:
    the newest valid item first, then each time the item least similar to the seeds chosen so far).

    Args:
        vectors: ``[B, H, dim]`` history vectors, newest first.
        mask: ``[B, H]`` bool, True for real items (a user needs at least one for a meaningful seed).
    """
    with torch.no_grad():
        b = vectors.shape[0]
        sims = torch.einsum("bhd,bgd->bhg", vectors, vectors)  # [B, H, H]
        first = torch.where(mask.any(dim=1), mask.to(torch.int64).argmax(dim=1), torch.zeros(b, dtype=torch.int64))
        seeds = [first]
        closest = sims[torch.arange(b), :, first]  # [B, H]: similarity to the nearest seed so far
        for _ in range(1, k):
            nxt = closest.masked_fill(~mask, math.inf).argmin(dim=1)
            seeds.append(nxt)
            closest = torch.maximum(closest, sims[torch.arange(b), :, nxt])
        return torch.stack(seeds, dim=1)


class MindUserTower(nn.Module):
    """MIND multi-interest user tower: history vectors → routing → K interest unit vectors.

    Behaviour-to-interest (B2I) dynamic routing: one bilinear map ``S`` shared by every
    (behaviour, interest) pair, initialised to the identity so the capsules start as soft
    clusters of the history, then ``routing_iterations`` rounds of ``w = softmax_K(b)``,
    ``u = squash(sum_i w_i S e_i)``, ``b += u . S e_i``.

    One deviation from the paper, measured: the paper starts the routing logits ``b`` at random
    (to break the symmetry between capsules). Here they start as ``ROUTING_SHARPNESS`` times the
    similarity of each behaviour to ``K`` mutually distant behaviours of the same history
    (:func:`farthest_point_seeds`), which is deterministic (serving and training route alike,
    no random state) and separates distinct interests reliably: on a history of two orthogonal
    topics random starting logits gave two distinct capsules (margin > 0.5) in 20 % of draws.
    """

    ROUTING_SHARPNESS = 5.0
    """Scale of the starting routing logits (cosine similarities to the seed behaviours)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.profile_dim = cfg.profile_dim
        self.example_age = cfg.example_age
        self.n_interests = cfg.interests
        self.iterations = cfg.routing_iterations
        self.bilinear = _identity_linear(cfg.dim)
        self.mlp = _mlp(cfg.dim + cfg.id_dim + cfg.profile_dim + int(cfg.example_age), cfg.hidden, cfg.dim)
        self.skip = _identity_linear(cfg.dim)
        self.context = _context_layer(cfg)

    def capsules(self, history: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic routing.

        Args:
            history: ``[B, H, dim]`` history item vectors, newest first (padding masked).
            mask: ``[B, H]`` bool, True for real history items.

        Returns:
            Capsules ``[B, K, dim]`` (zeros where inactive) and the active mask ``[B, K]``.
        """
        b = history.shape[0]
        k = self.n_interests
        n_active = active_interests(mask.sum(dim=1), k)
        active = torch.arange(k).unsqueeze(0) < n_active.unsqueeze(1)  # [B, K]
        weight_mask = mask.unsqueeze(-1).to(history.dtype)
        mapped = self.bilinear(history) * weight_mask  # [B, H, dim]
        seeds = farthest_point_seeds(history, mask, k)  # [B, K]
        seed_vecs = mapped[torch.arange(b).unsqueeze(1), seeds]  # [B, K, dim]
        logits = self.ROUTING_SHARPNESS * torch.einsum(
            "bhd,bkd->bhk", nn.functional.normalize(mapped, dim=-1), nn.functional.normalize(seed_vecs, dim=-1)
        )
        blocked = ~active.unsqueeze(1)  # [B, 1, K]
        caps = torch.zeros(b, k, history.shape[-1], dtype=history.dtype)
        for it in range(self.iterations):
            w = torch.softmax(logits.masked_fill(blocked, float("-inf")), dim=-1) * weight_mask  # [B, H, K]
            caps = squash(torch.einsum("bhk,bhd->bkd", w, mapped))
            if it + 1 < self.iterations:
                logits = logits + torch.einsum("bkd,bhd->bhk", caps, mapped)
        return caps * active.unsqueeze(-1).to(caps.dtype), active

    def forward(
        self,
        id_rows: torch.Tensor,
        profile: torch.Tensor,
        history: torch.Tensor,
        mask: torch.Tensor,
        age: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Interest vectors.

        Args:
            id_rows: ``[B, id_dim]`` user ID rows (zeros for unknown users).
            profile: ``[B, profile_dim]``.
            history: ``[B, H, dim]`` history item vectors, newest first.
            mask: ``[B, H]`` bool, True for real history items.
            age: ``[B]`` example-age input of :func:`example_age_days` (only with ``example_age``;
                ``None`` = 0).
            context: ``[B, context_width]`` of :func:`context_matrix` (``None`` = 0), shared by
                every interest of a user.

        Returns:
            ``[B, K, dim]`` unit interest vectors and ``[B, K]`` bool, True for the user's active
            interests (at least one: a user without history gets one from ID row and profile).
        """
        caps, active = self.capsules(history, mask)
        b, k, _ = caps.shape
        side = [id_rows, profile]
        if self.example_age:
            side.append(_age_column(age, b, id_rows))
        side_x = torch.cat(side, dim=-1).unsqueeze(1).expand(b, k, -1)
        x = torch.cat([caps, side_x], dim=-1)
        out = _mlp_with_context(self.mlp, x, self.context, context) + self.skip(caps)
        return nn.functional.normalize(out, dim=-1), active


class TwoTower(nn.Module):
    """Both towers; its ``state_dict`` is the model's dense weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.user: UserTower | MindUserTower = MindUserTower(cfg) if cfg.user_tower == "mind" else UserTower(cfg)
        self.item = ItemTower(cfg)

    @property
    def multi_interest(self) -> bool:
        """True when the user tower gives several interest vectors (MIND)."""
        return self.cfg.user_tower == "mind"

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` logits: cosine / temperature (inputs are unit vectors)."""
        return users @ items.T / self.cfg.temperature

    def score_interests(
        self,
        interests: torch.Tensor,
        active: torch.Tensor,
        items: torch.Tensor,
        positive_cols: torch.Tensor | None = None,
        mode: str | None = None,
    ) -> torch.Tensor:
        """``[B, N]`` training logits of multi-interest users against candidate items.

        Args:
            interests: ``[B, K, dim]`` unit interest vectors.
            active: ``[B, K]`` bool, the interests that exist.
            items: ``[N, dim]`` unit candidate vectors.
            positive_cols: ``[B]`` column of each row's clicked item (needed by ``label_aware``).
            mode: ``label_aware`` (hard label-aware attention: the interest nearest the clicked
                item scores every candidate) or ``max`` (each candidate by its nearest interest,
                as serving merges); default ``model.mind_scoring``.
        """
        mode = mode or self.cfg.mind_scoring
        sims = torch.einsum("bkd,nd->bkn", interests, items).masked_fill(~active.unsqueeze(-1), -math.inf)
        if mode == "max":
            best = sims.max(dim=1).values
        elif mode == "label_aware":
            if positive_cols is None:
                raise ValueError("label_aware scoring needs positive_cols")
            rows = torch.arange(interests.shape[0])
            chosen = sims[rows, :, positive_cols].argmax(dim=1)  # [B]
            best = sims[rows, chosen]
        else:
            raise ValueError(f"unknown multi-interest scoring mode {mode!r}")
        return best / self.cfg.temperature


def example_age_days(event_ms: Sequence[int] | np.ndarray, now_ms: int) -> torch.Tensor:
    """``[B]`` example-age input: ``log1p`` of ``(now - event time)`` in days, clipped at 0.

    The log keeps the input in a range an MLP with standard initialisation handles (a raw age
    of months in days swamps the other inputs: measured on MovieLens-100K, recall@20 fell from
    0.129 to 0.102 with raw days); serving feeds 0, i.e. age 0.
    """
    ages = (now_ms - np.asarray(event_ms, dtype=np.float64)) / MS_PER_DAY
    return torch.from_numpy(np.log1p(np.maximum(ages, 0.0)).astype(np.float32))


def decay_weights(ts_ms: np.ndarray, now_ms: int, half_life_s: float) -> np.ndarray:
    """Normalised time-decay weights of history events (newer weigh more; future clipped to now).

    Normalising cancels the common factor of the ages, so the weights depend only on the events'
    ages relative to the youngest of them: they are computed that way, which never underflows (a
    history years older than ``now`` — a replayed log served at today's clock — keeps its decay
    instead of collapsing to zeros).

    Returns an all-zero vector for an empty history.
    """
    if ts_ms.size == 0:
        return np.zeros(0, dtype=np.float32)
    age_s = np.maximum(now_ms - ts_ms.astype(np.float64), 0.0) / 1000.0
    w = np.power(0.5, (age_s - age_s.min()) / half_life_s)  # the youngest weighs 1 before normalising
    return (w / w.sum()).astype(np.float32)


def history_pools(cfg: ModelConfig) -> int:
    """How many pooled views of the history the ``mean`` user tower takes (1, +1 with ``recent_len``)."""
    return 1 + int(cfg.recent_len > 0)


def pooling_weights(ts_ms: np.ndarray, now_ms: int, cfg: ModelConfig) -> np.ndarray:
    """``[history_pools(cfg), H]`` weights of a history given **oldest first**, each row summing to 1
    (0 for an empty history): row 0 the time decay of :func:`decay_weights`; with ``recent_len``,
    row 1 the plain mean of the newest ``recent_len`` entries (their order, not their times)."""
    h = ts_ms.size
    out = np.zeros((history_pools(cfg), h), dtype=np.float32)
    if h == 0:
        return out
    out[0] = decay_weights(ts_ms, now_ms, cfg.history_half_life_s)
    if cfg.recent_len > 0:
        n = min(cfg.recent_len, h)
        out[1, h - n :] = 1.0 / n
    return out


def pool_history(vectors: np.ndarray, ts_ms: np.ndarray, now_ms: int, cfg: ModelConfig) -> np.ndarray:
    """The ``mean`` tower's pooled input, ``[history_pools(cfg) * dim]``, of ``vectors`` ``[H, dim]``
    given oldest first (zeros for no history): the views of :func:`pooling_weights`, concatenated."""
    if vectors.shape[0] == 0:
        return np.zeros(history_pools(cfg) * vectors.shape[1], dtype=np.float32)
    return (pooling_weights(ts_ms, now_ms, cfg) @ vectors.astype(np.float32, copy=False)).reshape(-1)


def history_tensor(
    vectors: np.ndarray, positions: Sequence[Sequence[int]], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded history vectors for the MIND tower.

    Args:
        vectors: ``[N, dim]`` item vectors.
        positions: per user, row numbers into ``vectors``, newest first (cut to ``length``).
        length: padded history length ``H``.

    Returns:
        ``[B, H, dim]`` float32 vectors (zeros as padding) and the ``[B, H]`` bool mask.
    """
    out = np.zeros((len(positions), length, vectors.shape[1]), dtype=np.float32)
    mask = np.zeros((len(positions), length), dtype=bool)
    for b, pos in enumerate(positions):
        pos = list(pos)[:length]
        if pos:
            out[b, : len(pos)] = vectors[pos]
            mask[b, : len(pos)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


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


CONTEXT_WEIGHT = "user.context.weight"
"""The one dense weight older checkpoints and snapshots (before context features) lack."""


def load_dense_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load dense weights; names and shapes must match, except that weights saved before the
    context features existed (no :data:`CONTEXT_WEIGHT`) load with that weight zeroed, which
    reproduces their old outputs exactly (the context then has no effect until a dense retrain).

    Returns:
        The names that were missing and zero-filled (empty for a current state).

    Raises:
        RuntimeError: any other missing, unexpected or misshapen weight (as ``load_state_dict``).
    """
    own = model.state_dict()
    filled = [CONTEXT_WEIGHT] if CONTEXT_WEIGHT in own and CONTEXT_WEIGHT not in state else []
    full = dict(state)
    for name in filled:
        full[name] = torch.zeros_like(own[name])
        log.info("weights predate context features: %s starts at zero (the old outputs exactly)", name)
    model.load_state_dict(full, strict=True)
    return filled


def load_dense_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Load weights produced by :func:`dense_arrays` (as :func:`load_dense_state`)."""
    return load_dense_state(model, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
