"""``evaluate simulate``: the replay policies on a simulated log whose true preferences are known.

A log from the simulator's world (:class:`producers.world.SimulatorWorld`: Zipf popularity,
users whose interests drift, new items arriving) is generated offline and replayed through
:func:`evaluation.replay.prequential`, so every policy runs exactly as in ``evaluate replay``.
What a real log cannot give is measured beside the usual metrics: at every ``truth_every``-th
event the generator records the user's **true** top-K unseen items at that moment (by the
world's preference logits), and each policy's list is scored against them:

* ``true_recall@K``: share of the true top-K in the policy's top-K;
* ``true_recall@K_cold_items``: the same, counting only true-top items that arrived during
  the simulation (they start with no interactions: content and streaming must find them);
* ``true_recall@K_drifting_users``: over the events whose user's interests moved most over the
  last simulated day (top quarter by angle), where yesterday's model is most out of date.

Generation is pure and deterministic for a seed; the clicks are organic draws from the true
preferences (no closed loop), so every policy faces the same log.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from evaluation.protocol import MS_PER_DAY, Event
from evaluation.replay import Step, Warmed
from producers.world import SimulatorWorld
from twotower.config import SimulatorConfig

START_MS = 1_700_006_400_000
"""The simulated log's first instant: a UTC midnight (2023-11-15), so days align with the protocol's."""


@dataclass(frozen=True)
class SimulationSpec:
    """The simulated log's shape; written verbatim into the result JSON."""

    days: float = 8.0
    """Simulated days of traffic."""
    events_per_day: int = 4_000
    """Clicks per simulated day (evenly spaced)."""
    drift_per_day: float = 0.6
    """Radians a user's interest vector moves per day towards its (re-drawn) target."""
    new_items_per_day: float = 60.0
    """Items arriving per day."""
    truth_every: int = 4
    """Record the true top-K at every N-th event (the ranking costs one pass over the catalogue)."""
    k: int = 10
    """Length of the true top-K lists."""
    drifting_quantile: float = 0.75
    """Events whose user moved more than this quantile of the day's drift count as drifting."""

    def __post_init__(self) -> None:
        if self.days <= 0 or self.events_per_day < 1 or self.truth_every < 1 or self.k < 1:
            raise ValueError("days, events_per_day, truth_every and k must be positive")
        if self.drift_per_day < 0 or self.new_items_per_day <= 0:
            raise ValueError("drift_per_day must be >= 0 and new_items_per_day > 0")
        if not 0.0 < self.drifting_quantile < 1.0:
            raise ValueError(f"drifting_quantile must be in (0, 1), got {self.drifting_quantile}")


@dataclass(frozen=True)
class Truth:
    """The ground truth recorded at one event."""

    top: tuple[str, ...]
    """The user's true top-K unseen items at that moment, best first."""
    cold: frozenset[str]
    """Those of ``top`` that arrived during the simulation."""
    drift: float
    """Angle (radians) the user's interests moved over the last simulated day."""


@dataclass
class SimulatedLog:
    events: list[Event]
    truth: dict[int, Truth]
    """Event index → ground truth (every ``truth_every``-th event)."""
    n_initial_items: int
    n_items: int


def generate(world_cfg: SimulatorConfig, spec: SimulationSpec) -> SimulatedLog:
    """Generate the log: each event a user drawn by activity clicking an organic pick.

    The world's drift and arrival rates are set from ``spec`` (per day), everything else
    (sizes, categories, Zipf exponent, seed) from ``world_cfg``.
    """
    cfg = world_cfg.model_copy(
        update={"drift_per_s": spec.drift_per_day / 86_400, "new_item_every_s": 86_400 / spec.new_items_per_day}
    )
    world = SimulatorWorld(cfg, content_dim=0, profile_dim=0)
    n_initial = world.n_items
    n_events = round(spec.days * spec.events_per_day)
    dt_s = 86_400 / spec.events_per_day
    clicked: list[set[int]] = [set() for _ in range(world.n_users)]
    # the users' interests a day earlier: hourly snapshots, the oldest kept no younger than 24 h
    snapshots: deque[tuple[float, np.ndarray]] = deque([(0.0, world.user_latent.copy())])
    events: list[Event] = []
    truth: dict[int, Truth] = {}
    for index in range(n_events):
        if index:
            world.advance(dt_s)
            world.maybe_new_items()
        if world.now_s - snapshots[-1][0] >= 3_600:
            snapshots.append((world.now_s, world.user_latent.copy()))
        while len(snapshots) > 1 and snapshots[1][0] <= world.now_s - 86_400:
            snapshots.popleft()
        day_ago = snapshots[0][1]  # 24-25 h ago (since the start, on the first day)
        user = world.pick_user()
        seen = clicked[user]
        if index % spec.truth_every == 0:
            scores = world.true_scores(user)
            if seen:
                scores[np.fromiter(seen, dtype=np.int64, count=len(seen))] = -np.inf
            k = min(spec.k, scores.size - len(seen))
            if k > 0:
                top = np.argpartition(-scores, k - 1)[:k]
                top = top[np.argsort(-scores[top], kind="stable")]
                cos = float(np.clip(world.user_latent[user] @ day_ago[user], -1.0, 1.0))
                truth[index] = Truth(
                    top=tuple(world.item_id(int(j)) for j in top),
                    cold=frozenset(world.item_id(int(j)) for j in top if j >= n_initial),
                    drift=math.acos(cos),
                )
        item = world.organic_click(user, exclude=seen)
        seen.add(item)
        events.append(Event(world.user_id(user), world.item_id(item), START_MS + round(world.now_s * 1000)))
    return SimulatedLog(events, truth, n_initial, world.n_items)


@dataclass
class TruthMetrics:
    """Recall of one policy against the recorded true top-K lists."""

    k: int
    recalls: list[tuple[float, float]] = field(default_factory=list)
    """(recall, the user's drift) per scored truth event."""
    cold_found: int = 0
    cold_total: int = 0

    def update(self, recs: Sequence[str], truth: Truth) -> None:
        got = set(recs[: self.k])
        self.recalls.append((len(got.intersection(truth.top)) / len(truth.top), truth.drift))
        self.cold_total += len(truth.cold)
        self.cold_found += len(got & truth.cold)

    def summary(self, drifting_quantile: float) -> dict[str, Any]:
        k = self.k
        if not self.recalls:
            return {
                f"true_recall@{k}": None,
                f"true_recall@{k}_cold_items": None,
                f"true_recall@{k}_drifting_users": None,
            }
        recall = np.array([r for r, _ in self.recalls])
        drift = np.array([d for _, d in self.recalls])
        drifting = drift >= np.quantile(drift, drifting_quantile)
        return {
            f"true_recall@{k}": float(recall.mean()),
            f"true_recall@{k}_cold_items": self.cold_found / self.cold_total if self.cold_total else None,
            f"true_recall@{k}_drifting_users": float(recall[drifting].mean()),
            "truth_events": len(self.recalls),
            "cold_truth_items": self.cold_total,
        }


class TruthScorer:
    """An ``on_step`` callback for :func:`evaluation.replay.run` that scores against the truth."""

    def __init__(self, log: SimulatedLog, spec: SimulationSpec) -> None:
        self.log = log
        self.spec = spec
        self.metrics: dict[str, TruthMetrics] = {}

    def __call__(self, step: Warmed | Step) -> None:
        if isinstance(step, Warmed):
            return
        truth = self.log.truth.get(step.index)
        if truth is None:
            return
        for name, recs in step.recs.items():
            self.metrics.setdefault(name, TruthMetrics(self.spec.k)).update(recs, truth)

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: m.summary(self.spec.drifting_quantile) for name, m in self.metrics.items()}


def describe(spec: SimulationSpec, world_cfg: SimulatorConfig, log: SimulatedLog) -> dict[str, Any]:
    """The simulation's settings and sizes, for the result JSON."""
    return {
        "spec": asdict(spec),
        "world": world_cfg.model_dump(exclude={"retriever_url", "rate_per_s", "slate_size"}),
        "events": len(log.events),
        "days": (log.events[-1].ts_ms - log.events[0].ts_ms) / MS_PER_DAY if log.events else 0.0,
        "initial_items": log.n_initial_items,
        "items_at_end": log.n_items,
        "truth_events": len(log.truth),
    }
