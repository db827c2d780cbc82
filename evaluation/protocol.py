"""The replay protocol's fixed settings and the world every policy sees at once.

The protocol (issue 4; improve the model, never the protocol):

* events are sorted by time (stable); the first :attr:`Protocol.warmup_fraction` of them are
  warm-up, learned from but never scored;
* every later event ``(u, i, t)`` is first **scored** (top-K for ``u`` from what each policy
  has *published*, excluding every item ``u`` interacted with before; a hit if ``i`` is in
  it) and **then** learned from;
* a UTC day boundary triggers each nightly policy's retrain on the previous day's events;
* streaming parameter updates become visible ``publish_every_s`` seconds of event time after
  the event they learned from;
* a user's interaction history is visible at once to every policy that uses it (the live
  system writes it to Redis within milliseconds);
* a policy without usable state for a user (or with fewer than the requested items) is
  filled from the trailing popularity ranking, the same for every policy.

:class:`World` holds what is shared and visible at once: histories, seen items, when each
user and item was first seen, and the trailing popularity counts that both the
``popularity_7d`` policy and the fallback use. Everything here is deterministic: ties are
broken by recency, then by first appearance, never by hash order.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

MS_PER_DAY = 86_400_000


class Event(NamedTuple):
    """One interaction: ``user`` interacted with ``item`` at ``ts_ms`` (epoch milliseconds)."""

    user: str
    item: str
    ts_ms: int


@dataclass(frozen=True)
class Protocol:
    """The protocol settings; written verbatim into the result JSON."""

    k: int = 10
    """List length of HR@K, NDCG@K and coverage."""
    recall_k: int = 50
    """List length of Recall@K (one held-out item per event: Recall@K = HR@K)."""
    warmup_fraction: float = 0.6
    """Share of the (time-sorted) events used for warm-up only."""
    publish_every_s: float = 5.0
    """Event-time delay before a streaming update is visible to scoring."""
    popularity_days: float = 7.0
    """Window of the trailing popularity counts (policy ``popularity_7d`` and the fallback)."""
    cold_days: float = 7.0
    """An item (user) is cold (new) while it was first seen less than this many days ago."""
    history_max_len: int = 100
    """Interactions per user kept in the shared history (the publisher's Redis list cap)."""
    history_delay_s: float = 0.0
    """Event-time delay before an interaction enters the history the policies pool (exclusion of
    seen items is unaffected). 0, the protocol: at once. A diagnostic: a live replay at thousands
    of times real time delays the retriever's history by minutes of event time."""
    seed: int = 0
    """Seed of every random choice of every policy."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.recall_k < self.k:
            raise ValueError(f"need 1 <= k <= recall_k, got k={self.k}, recall_k={self.recall_k}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.publish_every_s < 0 or self.popularity_days <= 0 or self.cold_days <= 0:
            raise ValueError("publish_every_s must be >= 0 and the day windows > 0")
        if self.history_max_len < 1:
            raise ValueError("history_max_len must be >= 1")
        if self.history_delay_s < 0:
            raise ValueError("history_delay_s must be >= 0")

    @property
    def publish_every_ms(self) -> int:
        return round(self.publish_every_s * 1000)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "order": "stable sort by timestamp; each post-warm-up event scored, then learned",
            "day_boundaries": "UTC",
            "exclude_seen": True,
            "fallback": "trailing popularity (popularity_days window) fills any list shorter than recall_k",
        }


def utc_day(ts_ms: int) -> int:
    """Days since 1970-01-01 (UTC) of an epoch-millisecond time."""
    return ts_ms // MS_PER_DAY


def day_start_ms(day: int) -> int:
    return day * MS_PER_DAY


def warmup_size(n_events: int, fraction: float) -> int:
    """How many of ``n_events`` are warm-up (``floor(n * fraction)``)."""
    return math.floor(n_events * fraction)


def check_sorted(events: Sequence[Event]) -> None:
    """Raises ValueError unless ``events`` are in non-decreasing time order."""
    for i in range(1, len(events)):
        if events[i].ts_ms < events[i - 1].ts_ms:
            raise ValueError(f"events are not sorted by time at position {i}")


class TrailingPopularity:
    """Interaction counts over a trailing event-time window, with a cached ranking.

    Ranking: count (descending), then the time of the latest interaction (newer first), then
    first appearance. Items are the integer indices of :class:`World`.
    """

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.count = np.zeros(1024, dtype=np.int64)
        self.last_ms = np.zeros(1024, dtype=np.int64)
        self.window: deque[tuple[int, int]] = deque()
        self._ranking: np.ndarray | None = None

    def _grow(self, idx: int) -> None:
        if idx >= self.count.shape[0]:
            size = max(idx + 1, 2 * self.count.shape[0])
            self.count = np.concatenate([self.count, np.zeros(size - self.count.shape[0], dtype=np.int64)])
            self.last_ms = np.concatenate([self.last_ms, np.zeros(size - self.last_ms.shape[0], dtype=np.int64)])

    def add(self, idx: int, ts_ms: int) -> None:
        self._grow(idx)
        self.count[idx] += 1
        self.last_ms[idx] = max(self.last_ms[idx], ts_ms)
        self.window.append((ts_ms, idx))
        self._ranking = None

    def advance(self, now_ms: int) -> None:
        """Drop interactions at or before ``now_ms - window``."""
        limit = now_ms - self.window_ms
        while self.window and self.window[0][0] <= limit:
            _, idx = self.window.popleft()
            self.count[idx] -= 1
            self._ranking = None

    def ranking(self) -> np.ndarray:
        """Indices of the items with a positive count, best first."""
        if self._ranking is None:
            live = np.flatnonzero(self.count > 0)
            order = np.lexsort((live, -self.last_ms[live], -self.count[live]))
            self._ranking = live[order]
        return self._ranking


class World:
    """What every policy may read at once: histories, seen items, first sightings, popularity.

    The replay core calls :meth:`observe` for every event right after it has been scored, so
    at scoring time the world holds exactly the events before the scored one.
    """

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.item_index: dict[str, int] = {}
        self.item_ids: list[str] = []
        self.item_first_ms: list[int] = []
        self.user_index: dict[str, int] = {}
        self.user_ids: list[str] = []
        self.user_first_ms: list[int] = []
        self.histories: dict[str, deque[tuple[str, int]]] = {}
        self.seen: dict[str, set[str]] = {}
        self.pairs_user: list[int] = []
        self.pairs_item: list[int] = []
        self.popularity = TrailingPopularity(round(protocol.popularity_days * MS_PER_DAY))
        self.now_ms = 0
        self._empty: frozenset[str] = frozenset()

    # --- updates ------------------------------------------------------------------------
    def observe(self, event: Event) -> None:
        """Record one event (after it was scored)."""
        user, item, ts = event
        idx = self.item_index.get(item)
        if idx is None:
            idx = self.item_index[item] = len(self.item_ids)
            self.item_ids.append(item)
            self.item_first_ms.append(ts)
        uidx = self.user_index.get(user)
        if uidx is None:
            uidx = self.user_index[user] = len(self.user_ids)
            self.user_ids.append(user)
            self.user_first_ms.append(ts)
            self.histories[user] = deque(maxlen=self.protocol.history_max_len)
            self.seen[user] = set()
        self.histories[user].append((item, ts))
        self.seen[user].add(item)
        self.pairs_user.append(uidx)
        self.pairs_item.append(idx)
        self.popularity.add(idx, ts)
        self.now_ms = max(self.now_ms, ts)

    def advance(self, now_ms: int) -> None:
        """Move the clock to ``now_ms`` (expires old popularity counts)."""
        self.now_ms = max(self.now_ms, now_ms)
        self.popularity.advance(now_ms)

    # --- reads --------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def seen_by(self, user: str) -> set[str] | frozenset[str]:
        """Items ``user`` interacted with so far (do not modify)."""
        return self.seen.get(user, self._empty)

    def history(self, user: str) -> Sequence[tuple[str, int]]:
        """``(item, ts_ms)`` of ``user``'s most recent interactions, oldest first (do not modify);
        with ``history_delay_s``, only those at least that old."""
        hist = self.histories.get(user, ())
        if self.protocol.history_delay_s <= 0 or not hist:
            return hist
        visible = self.now_ms - round(self.protocol.history_delay_s * 1000)
        return [entry for entry in hist if entry[1] <= visible]

    def history_newest_first(self, user: str) -> list[tuple[str, int]]:
        return list(reversed(self.history(user)))

    def is_cold_item(self, item: str, now_ms: int) -> bool:
        """First seen less than ``cold_days`` before ``now_ms`` (or never seen)."""
        idx = self.item_index.get(item)
        return idx is None or now_ms - self.item_first_ms[idx] < self.protocol.cold_days * MS_PER_DAY

    def is_new_user(self, user: str, now_ms: int) -> bool:
        """First seen less than ``cold_days`` before ``now_ms`` (or never seen)."""
        idx = self.user_index.get(user)
        return idx is None or now_ms - self.user_first_ms[idx] < self.protocol.cold_days * MS_PER_DAY

    def popular(self, n: int, exclude: Iterable[str] = (), also_exclude: Iterable[str] = ()) -> list[str]:
        """The ``n`` best items of the trailing popularity ranking not in either exclusion."""
        skip = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        more = also_exclude if isinstance(also_exclude, set | frozenset) else set(also_exclude)
        out: list[str] = []
        if n <= 0:
            return out
        for idx in self.popularity.ranking().tolist():
            item = self.item_ids[idx]
            if item in skip or item in more:
                continue
            out.append(item)
            if len(out) == n:
                break
        return out

    def fill(self, recs: Sequence[str], user: str, n: int) -> tuple[list[str], int]:
        """``recs`` (unseen, deduplicated, cut to ``n``) topped up from trailing popularity.

        Returns:
            The list and how many of its items came from the fallback.
        """
        seen = self.seen_by(user)
        out: list[str] = []
        taken: set[str] = set()
        for item in recs:
            if item not in seen and item not in taken:
                out.append(item)
                taken.add(item)
                if len(out) == n:
                    return out, 0
        extra = self.popular(n - len(out), seen, taken)
        return out + extra, len(extra)
