"""The simulator daemon: a live stream of impressions and clicks from :class:`SimulatorWorld`.

Startup publishes the initial catalogue (one :class:`CatalogItem` per item, with its category
and content features) and every user's :class:`Profile`. Then, at ``rate_per_s`` requests per
second of wall-clock time (event time = wall-clock milliseconds, simulated time = seconds
since the main loop started):

1. the world drifts by the elapsed time; items that arrived meanwhile are published to the
   catalogue first;
2. a user is picked (activity-skewed);
3. the slate is the first ``slate_size`` items of the retriever's answer
   (``GET {retriever_url}/recommend?user_id=..&k=2*slate_size``) if a retriever is configured
   and answers in time, else a popularity-random slate (a failed call is counted, and the
   retriever is left alone for ``retriever_backoff_s`` so that an outage does not slow the
   stream down to one request per timeout);
4. one ``impression`` per slate slot and one ``click`` per slot the world says was clicked,
   all with the request's id, ``position`` = slot and ``context={"source": ...}``; for a
   retriever slate each impression's context also lists the items retrieved but not shown
   (``context["retrieved"]``): the trainer's hard negatives for that request's clicks;
5. one **organic** click with its own request id, ``position`` 0 and
   ``context={"source": "organic"}``: the item the user picks from the whole catalogue by
   their true preferences, excluding the ``exclude_recent`` items they clicked last before
   this request. (Excluding *every* past click would exhaust the favourite items of the most
   active users within minutes at the default rate and turn their organic clicks into noise.)

Ground-truth quality per request: ``served_hit`` = the organic item is in the retriever's
slate (counted only when the slate came from the retriever); ``random_hit`` = it is in a
uniformly random ``slate_size``-subset of the catalogue (always counted: the baseline).
The ratio ``served_hits / served_requests`` against ``random_hits / random_requests`` is how
much the served model beats chance at predicting what users want next.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
from kafka import KafkaProducer
from prometheus_client import Counter

from producers.world import SimulatorWorld, WorldItem
from twotower.config import Config
from twotower.daemon import Daemon
from twotower.events import CLICK, IMPRESSION, CatalogItem, Interaction, Profile, Record
from twotower.kafka_io import Topics, ensure_topics, make_producer, send_record

log = logging.getLogger(__name__)

REQUESTS = Counter("twotower_sim_requests_total", "Simulated recommendation requests by slate source", ["source"])
EVENTS = Counter("twotower_sim_events_total", "Records produced by the simulator by type", ["type"])
SERVED_HITS = Counter(
    "twotower_sim_served_hits_total", "Retriever-served requests whose slate held the user's organic pick"
)
SERVED_REQUESTS = Counter("twotower_sim_served_requests_total", "Requests whose slate came from the retriever")
RANDOM_HITS = Counter(
    "twotower_sim_random_hits_total", "Requests whose organic pick was in a uniformly random slate (baseline)"
)
RANDOM_REQUESTS = Counter("twotower_sim_random_requests_total", "Requests scored against the random baseline")
RETRIEVER_ERRORS = Counter(
    "twotower_sim_retriever_errors_total", "Retriever calls that failed (error, timeout, non-200, bad body)"
)
SEND_ERRORS = Counter("twotower_sim_send_errors_total", "Records the Kafka producer failed to deliver")

SOURCE_RETRIEVER = "retriever"
SOURCE_FALLBACK = "fallback"
SOURCE_ORGANIC = "organic"
RETRIEVE_FACTOR = 2
"""The simulator asks the retriever for this many times ``slate_size`` items and shows the first
``slate_size``; the rest go into each impression's ``context["retrieved"]``."""
RETRIEVED_KEY = "retrieved"
"""Impression context key: item ids the retriever returned for the request but were not shown."""
ERROR_LOG_INTERVAL_S = 10.0
"""At most one warning per this many seconds about retriever failures (the counter has them all)."""


class RetrieverError(RuntimeError):
    """The retriever gave no usable slate; the message says why."""


@dataclass
class SimStats:
    """What this simulator instance has done (the Prometheus counters are process-wide)."""

    requests: dict[str, int] = field(default_factory=lambda: {SOURCE_RETRIEVER: 0, SOURCE_FALLBACK: 0})
    events: dict[str, int] = field(default_factory=lambda: {IMPRESSION: 0, CLICK: 0, "catalog": 0, "profile": 0})
    served_hits: int = 0
    served_requests: int = 0
    random_hits: int = 0
    random_requests: int = 0
    retriever_errors: int = 0
    send_errors: int = 0
    skipped_requests: int = 0
    """Requests dropped because the loop fell more than a second behind its schedule."""

    @property
    def interactions(self) -> int:
        """Impressions plus clicks produced."""
        return self.events[IMPRESSION] + self.events[CLICK]


class _RecentClicks:
    """The last ``capacity`` distinct items a user clicked, with O(1) membership."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: set[int] = set()
        self._order: deque[int] = deque()

    def add(self, item: int) -> None:
        if self.capacity == 0:
            return
        if item in self.items:
            self._order.remove(item)  # at most `capacity` long
        else:
            self.items.add(item)
        self._order.append(item)
        if len(self._order) > self.capacity:
            self.items.discard(self._order.popleft())


def fetch_slate(client: httpx.Client, base_url: str, user_id: str, k: int) -> tuple[list[str], Any]:
    """Ask the retriever for a user's top-``k`` items.

    Returns:
        The item ids, best first, and the snapshot version the retriever reported.

    Raises:
        RetrieverError: transport error, timeout, a status other than 200, or a body that is not
            ``{"items": [{"item_id": ...}, ...]}``.
    """
    try:
        response = client.get(f"{base_url.rstrip('/')}/recommend", params={"user_id": user_id, "k": k})
    except httpx.HTTPError as exc:
        raise RetrieverError(f"{type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise RetrieverError(f"HTTP {response.status_code}")
    try:
        body = response.json()
        items = [str(entry["item_id"]) for entry in body["items"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise RetrieverError(f"unexpected response body: {exc!r}") from exc
    return items, body.get("version")


def _now_ms() -> int:
    return int(time.time() * 1000)


class SimulatorDaemon(Daemon):
    """Publishes a simulated world's catalogue and profiles, then streams its interactions.

    Args:
        cfg: the whole configuration (kafka, model content/profile dims, simulator section).
        duration_s: stop after this many seconds of main loop; 0 runs until shut down.
        max_events: stop once at least this many interactions (impressions + clicks) were
            produced; ``None`` for no limit. The request in progress is completed.
        http: HTTP client for the retriever (default: one with a 0.3 s timeout).
        retriever_backoff_s: after a failed retriever call, serve fallback slates for this long
            before trying the retriever again.
        exclude_recent: an organic click never picks one of the user's last this many clicked items.
    """

    name = "simulator"

    def __init__(
        self,
        cfg: Config,
        *,
        duration_s: float = 0.0,
        max_events: int | None = None,
        http: httpx.Client | None = None,
        retriever_backoff_s: float = 1.0,
        exclude_recent: int = 50,
    ) -> None:
        super().__init__()
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        if exclude_recent < 0:
            raise ValueError(f"exclude_recent must be >= 0, got {exclude_recent}")
        self.cfg = cfg
        self.sim = cfg.simulator
        self.duration_s = duration_s
        self.max_events = max_events
        self.retriever_backoff_s = retriever_backoff_s
        self.world = SimulatorWorld(cfg.simulator, cfg.model.content_dim, cfg.model.profile_dim)
        self.stats = SimStats()
        self.run_id = uuid.uuid4().hex[:8]
        """Prefix of this run's request ids, so that ids stay unique across restarts."""
        self._own_http = http is None and bool(self.sim.retriever_url)
        self._http = http if http is not None else (httpx.Client(timeout=0.3) if self.sim.retriever_url else None)
        self._producer: KafkaProducer | None = None
        self._topics: Topics | None = None
        self.exclude_recent = exclude_recent
        self._recent: dict[int, _RecentClicks] = {}
        self._n_requests = 0
        self._retriever_paused_until = 0.0
        self._last_error_log = float("-inf")
        self._errors_since_log = 0

    # ------------------------------------------------------------------ lifecycle

    def startup(self) -> None:
        """Create the topics and publish the initial catalogue and profiles (waits for the acks)."""
        self._topics = ensure_topics(self.cfg.kafka)
        self._producer = make_producer(self.cfg.kafka, client_id="twotower-simulator")
        ts = _now_ms()
        for item in self.world.items():
            self._publish_item(item, ts)
        for user in range(self.world.n_users):
            profile = Profile(self.world.user_id(user), self.world.user_profile[user].tolist(), ts)
            self._send(self.topics.profiles, profile, "profile")
        self._producer.flush(timeout=60)
        log.info(
            "published %d catalogue items and %d profiles",
            self.world.n_items,
            self.world.n_users,
            extra={"run_id": self.run_id},
        )

    def main_loop(self) -> None:
        """Simulate requests at ``rate_per_s`` until shut down, ``duration_s`` or ``max_events``."""
        rate = self.sim.rate_per_s
        max_backlog = max(1, int(rate))
        start = last = time.monotonic()
        done = 0
        while not self.shutdown_flag.is_set():
            now = time.monotonic()
            elapsed = now - start
            if self.duration_s and elapsed >= self.duration_s:
                log.info("duration of %.1f s reached", self.duration_s)
                return
            self._advance(now - last)
            last = now
            due = int(elapsed * rate) - done
            if due > max_backlog:
                skipped = due - max_backlog
                self.stats.skipped_requests += skipped
                done += skipped
                due = max_backlog
                log.warning("fell behind schedule; skipped %d requests", skipped)
            for _ in range(due):
                if self.shutdown_flag.is_set() or (self.duration_s and time.monotonic() - start >= self.duration_s):
                    break
                self._request()
                done += 1
                if self.max_events is not None and self.stats.interactions >= self.max_events:
                    log.info("max_events=%d reached", self.max_events)
                    return
            next_due = start + (done + 1) / rate
            self.shutdown_flag.wait(min(max(next_due - time.monotonic(), 0.0), 0.1))

    def shutdown(self) -> None:
        """Flush and close the producer and the HTTP client."""
        if self._producer is not None:
            try:
                self._producer.flush(timeout=30)
            finally:
                self._producer.close(timeout=10)
                self._producer = None
        if self._own_http and self._http is not None:
            self._http.close()
        log.info("simulator totals", extra={"stats": self.stats.__dict__})

    def health(self) -> dict[str, Any]:
        out = super().health()
        if self._producer is None:
            out["status"] = "starting"
        out.update(
            requests=self._n_requests,
            interactions=self.stats.interactions,
            retriever_errors=self.stats.retriever_errors,
            items=self.world.n_items,
        )
        return out

    # ------------------------------------------------------------------ steps

    def _send(self, topic: str, record: Record, kind: str) -> None:
        if self._producer is None:
            raise RuntimeError("the simulator producer is not started")
        future = send_record(self._producer, topic, record)
        future.add_errback(self._on_send_error, topic)
        self.stats.events[kind] += 1
        EVENTS.labels(kind).inc()

    def _on_send_error(self, exc: BaseException, topic: str) -> None:
        self.stats.send_errors += 1
        SEND_ERRORS.inc()
        log.error("failed to deliver a record to %s: %s", topic, exc)

    @property
    def topics(self) -> Topics:
        """The topic names (known once :meth:`startup` ran)."""
        if self._topics is None:
            raise RuntimeError("the simulator is not started")
        return self._topics

    def _publish_item(self, item: WorldItem, ts_ms: int) -> None:
        record = CatalogItem(item.item_id, item.category, item.content.tolist(), ts_ms)
        self._send(self.topics.catalog, record, "catalog")

    def _advance(self, dt_s: float) -> None:
        """Drift the world by ``dt_s`` and publish the items that arrived meanwhile."""
        self.world.advance(dt_s)
        new_items = self.world.maybe_new_items()
        if new_items:
            ts = _now_ms()
            for item in new_items:
                self._publish_item(item, ts)
            log.debug("published %d new items (catalogue now %d)", len(new_items), self.world.n_items)

    def _slate(self, user_id: str) -> tuple[list[str], list[str], str, Any]:
        """The slate of this request.

        Asks the retriever for ``RETRIEVE_FACTOR x slate_size`` items and shows the first
        ``slate_size``.

        Returns:
            The shown item ids, the retrieved-but-not-shown item ids (the trainer's hard
            negatives; empty for a fallback slate), the source (retriever or fallback) and the
            snapshot version.
        """
        k = self.sim.slate_size
        if self._http is not None and time.monotonic() >= self._retriever_paused_until:
            try:
                items, version = fetch_slate(self._http, self.sim.retriever_url, user_id, RETRIEVE_FACTOR * k)
            except RetrieverError as exc:
                self._retriever_failed(str(exc))
            else:
                if items:
                    return items[:k], items[k : RETRIEVE_FACTOR * k], SOURCE_RETRIEVER, version
                log.debug("retriever returned no items for %s", user_id)
        return [self.world.item_id(j) for j in self.world.popular_slate(k)], [], SOURCE_FALLBACK, None

    def _retriever_failed(self, reason: str) -> None:
        self.stats.retriever_errors += 1
        RETRIEVER_ERRORS.inc()
        self._errors_since_log += 1
        now = time.monotonic()
        self._retriever_paused_until = now + self.retriever_backoff_s
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            log.warning(
                "retriever unavailable (%s); %d failure(s) since the last warning; serving fallback slates",
                reason,
                self._errors_since_log,
            )
            self._last_error_log = now
            self._errors_since_log = 0

    def _request(self) -> None:
        """Simulate one request: slate, impressions, slate clicks, organic click, hit metrics."""
        world, events = self.world, self.topics.events
        user = world.pick_user()
        user_id = world.user_id(user)
        request_id = f"sim-{self.run_id}-{self._n_requests}"
        self._n_requests += 1
        ts = _now_ms()

        slate_ids, not_shown, source, version = self._slate(user_id)
        REQUESTS.labels(source).inc()
        self.stats.requests[source] += 1
        context: dict[str, Any] = {"source": source}
        if version is not None:
            context["version"] = version
        # every impression carries the request's retrieved-but-not-shown items, so any one of them
        # suffices for the trainer's hard negatives; the impressions themselves are not negatives
        impression_context = {**context, RETRIEVED_KEY: not_shown} if not_shown else context
        for pos, item_id in enumerate(slate_ids):
            event = Interaction(
                f"{request_id}:{pos}:i", request_id, user_id, item_id, IMPRESSION, pos, ts, impression_context
            )
            self._send(events, event, IMPRESSION)

        recent = self._recent.get(user)
        if recent is None:
            recent = self._recent[user] = _RecentClicks(self.exclude_recent)
        organic = world.organic_click(user, exclude=recent.items)  # chosen before this slate's clicks count
        slate_idx = [self._known_index(item_id) for item_id in slate_ids]
        for pos in world.slate_clicks(user, slate_idx):
            event = Interaction(f"{request_id}:{pos}:c", request_id, user_id, slate_ids[pos], CLICK, pos, ts, context)
            self._send(events, event, CLICK)
            recent.add(slate_idx[pos])
        organic_id = world.item_id(organic)
        organic_request = f"{request_id}-o"
        event = Interaction(
            f"{organic_request}:0:c", organic_request, user_id, organic_id, CLICK, 0, ts, {"source": SOURCE_ORGANIC}
        )
        self._send(events, event, CLICK)
        recent.add(organic)

        if source == SOURCE_RETRIEVER:
            hit = organic_id in slate_ids
            self.stats.served_requests += 1
            self.stats.served_hits += hit
            SERVED_REQUESTS.inc()
            if hit:
                SERVED_HITS.inc()
        random_hit = organic in world.random_slate(self.sim.slate_size)
        self.stats.random_requests += 1
        self.stats.random_hits += random_hit
        RANDOM_REQUESTS.inc()
        if random_hit:
            RANDOM_HITS.inc()

    def _known_index(self, item_id: str) -> int:
        """The world index of a served item id, or -1 for an id this world does not know."""
        index = self.world.item_index(item_id)
        return index if index is not None and index < self.world.n_items else -1
