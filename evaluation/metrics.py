"""Metrics of a replay: pure functions of ranks, and accumulators fed one scored step at a time.

With one held-out item per event:

* ``HR@K``: share of events whose item is in the top K;
* ``Recall@K``: the same with the longer list (one relevant item, so recall = hit rate);
* ``NDCG@K``: ``1 / log2(rank + 2)`` for a hit at 0-based ``rank < K``, else 0 (the ideal DCG
  of one relevant item is 1), averaged over events;
* catalogue coverage: distinct items that appeared in any top-K list, divided by the distinct
  items of the whole log seen by the end of the replay;
* ``HR@K`` restricted to events whose item is cold (first seen less than ``cold_days`` before
  the event, or never) and to events of new users (same rule for the user).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def rank_of(item: str, recs: Sequence[str]) -> int | None:
    """0-based position of ``item`` in ``recs``, or None."""
    try:
        return recs.index(item) if isinstance(recs, list) else list(recs).index(item)
    except ValueError:
        return None


def hit(rank: int | None, k: int) -> float:
    return 1.0 if rank is not None and rank < k else 0.0


def ndcg(rank: int | None, k: int) -> float:
    return 1.0 / math.log2(rank + 2) if rank is not None and rank < k else 0.0


def _ratio(num: float, den: int) -> float | None:
    return num / den if den else None


@dataclass
class PolicyMetrics:
    """Running sums of one policy's metrics."""

    k: int
    recall_k: int
    events: int = 0
    hits: float = 0.0
    recall_hits: float = 0.0
    ndcg_sum: float = 0.0
    cold_events: int = 0
    cold_hits: float = 0.0
    new_user_events: int = 0
    new_user_hits: float = 0.0
    fallback_events: int = 0
    """Events where the policy returned nothing (no usable state): the list is all fallback."""
    filled_events: int = 0
    """Events where the fallback completed a shorter list."""
    covered: set[str] = field(default_factory=set)

    def update(self, item: str, recs: Sequence[str], cold: bool, new_user: bool, fallback: int) -> int | None:
        """Add one scored event; returns the item's rank in ``recs`` (or None)."""
        rank = rank_of(item, recs)
        h = hit(rank, self.k)
        self.events += 1
        self.hits += h
        self.recall_hits += hit(rank, self.recall_k)
        self.ndcg_sum += ndcg(rank, self.k)
        if cold:
            self.cold_events += 1
            self.cold_hits += h
        if new_user:
            self.new_user_events += 1
            self.new_user_hits += h
        if fallback >= len(recs) and recs:
            self.fallback_events += 1
        elif fallback:
            self.filled_events += 1
        self.covered.update(recs[: self.k])
        return rank

    def summary(self, n_catalogue: int) -> dict[str, Any]:
        k, rk = self.k, self.recall_k
        return {
            f"HR@{k}": _ratio(self.hits, self.events),
            f"Recall@{rk}": _ratio(self.recall_hits, self.events),
            f"NDCG@{k}": _ratio(self.ndcg_sum, self.events),
            "coverage": _ratio(len(self.covered), n_catalogue),
            f"HR@{k}_cold_items": _ratio(self.cold_hits, self.cold_events),
            f"HR@{k}_new_users": _ratio(self.new_user_hits, self.new_user_events),
            "events_evaluated": self.events,
            "cold_item_events": self.cold_events,
            "new_user_events": self.new_user_events,
            "fallback_share": _ratio(self.fallback_events, self.events),
            "filled_share": _ratio(self.filled_events, self.events),
        }


@dataclass
class Series:
    """Per-UTC-day hit counts of every policy (for the plot)."""

    days: list[int] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    hits: dict[str, list[float]] = field(default_factory=dict)

    def add(self, day: int, policy_hits: dict[str, float]) -> None:
        if not self.days or self.days[-1] != day:
            self.days.append(day)
            self.events.append(0)
            for name in policy_hits:
                self.hits.setdefault(name, []).append(0.0)
        self.events[-1] += 1
        for name, h in policy_hits.items():
            self.hits[name][-1] += h

    def binned(self, n_bins: int) -> dict[str, Any]:
        """HR over about ``n_bins`` consecutive groups of days holding equal numbers of events."""
        total = sum(self.events)
        if total == 0:
            return {"bin_last_day": [], "events": [], "hr": {name: [] for name in self.hits}}
        target = total / max(n_bins, 1)
        last_day: list[int] = []
        counts: list[int] = []
        sums: dict[str, list[float]] = {name: [] for name in self.hits}
        acc = 0
        acc_hits = dict.fromkeys(self.hits, 0.0)
        for i, day in enumerate(self.days):
            acc += self.events[i]
            for name in self.hits:
                acc_hits[name] += self.hits[name][i]
            if acc >= target or i == len(self.days) - 1:
                last_day.append(day)
                counts.append(acc)
                for name in self.hits:
                    sums[name].append(acc_hits[name] / acc)
                acc = 0
                acc_hits = dict.fromkeys(self.hits, 0.0)
        return {"bin_last_day": last_day, "events": counts, "hr": sums}
