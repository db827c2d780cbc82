"""The retriever's HTTP API: user tower online + Faiss top-K over the served snapshot.

Endpoints:

* ``GET /recommend?user_id=&k=&exclude=a,b&category=c1,c2&diversity=false`` and
  ``POST /recommend`` (JSON: ``user_id``, ``k``, ``history``, ``profile``, ``exclude``,
  ``category``, ``diversity``, ``context``) → ``{"user_id", "version", "items": [{"item_id", "score",
  "category", "title"}], "took_ms"}``. ``score`` is the cosine of the user and item vectors.
* ``GET /health``: the process is alive (200 even before the first snapshot).
* ``GET /ready``: 200 once a snapshot is loaded, else 503.
* ``GET /metrics``: Prometheus (multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set).

Per request: one Redis pipeline reads the user's recent history (``LRANGE 0..history_len-1``)
and profile; the user vector is pooled from the history items the snapshot knows (plus any
fresh history in a POST body); everything in that history and in ``exclude`` is left out of
the results; a category filter or the diversity cap looks item categories up in Redis (cached
per process for :data:`CATEGORY_TTL_S`); one more pipeline fetches the details of the returned
items only.

Diversity (``diversity=true``) is a per-category cap: at most ``ceil(k / 3)`` items of one
category, walking the ranked list; items of unknown category are not capped, and when the
examined candidates cannot fill ``k`` under the cap the best capped-out items fill the rest.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import faiss
import msgpack
import redis
import torch
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel, ConfigDict, Field

from retriever.watcher import SnapshotWatcher
from twotower.config import Config, load_config
from twotower.daemon import setup_logging
from twotower.snapshots import SnapshotLayout, SnapshotStore

log = logging.getLogger(__name__)

NO_SNAPSHOT = "no snapshot published yet"
CATEGORY_TTL_S = 60.0
"""How long a process trusts an item category it read from Redis (for filtering and diversity)."""
CATEGORY_CACHE_MAX = 200_000
"""Entries of the category cache before it is cleared."""
REQUEST_SOCKET_TIMEOUT_S = 2.0
"""Redis socket timeout on the request path (fail fast rather than hang a request)."""
MAX_LIST_LEN = 10_000
"""Longest history / exclude / category / profile list a request may send."""
MAX_USER_ID_LEN = 256

REQUESTS = Counter("twotower_retriever_requests_total", "Recommendation requests by HTTP status.", ["status"])
LATENCY = Histogram(
    "twotower_retriever_latency_seconds",
    "Latency of recommendation requests (all statuses), seconds.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
MALFORMED = Counter(
    "twotower_retriever_malformed_values_total",
    "Redis values the retriever skipped because they did not decode (kind=history|profile).",
    ["kind"],
)


# --- request and response bodies ----------------------------------------------------------------
class HistoryEvent(BaseModel):
    """A fresh interaction the client knows of (Redis may not have it yet)."""

    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(min_length=1)
    ts_ms: int | None = None
    """Event time in ms; default: now."""


class RecommendRequest(BaseModel):
    """Body of ``POST /recommend``."""

    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=MAX_USER_ID_LEN)
    k: int | None = None
    """Items to return; default ``retriever.default_k``, at most ``retriever.max_k``."""
    history: list[str | HistoryEvent] = Field(default_factory=list, max_length=MAX_LIST_LEN)
    """Fresh interactions (item ids, or ``{item_id, ts_ms}``), merged with the stored history."""
    profile: list[float] | None = Field(default=None, max_length=MAX_LIST_LEN)
    """Profile features; overrides the stored profile."""
    context: list[float] | None = Field(default=None, max_length=MAX_LIST_LEN)
    """The request's dense context vector (``model.context_dim`` values); default zeros."""
    exclude: list[str] = Field(default_factory=list, max_length=MAX_LIST_LEN)
    category: list[str] | None = Field(default=None, max_length=MAX_LIST_LEN)
    """Only items of these categories."""
    diversity: bool = False


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    category: str | None
    title: str | None


class RecommendResponse(BaseModel):
    user_id: str
    version: int
    items: list[RecommendedItem]
    took_ms: float


# --- helpers ------------------------------------------------------------------------------------
def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", errors="replace") if value is not None else None


def decode_history(entries: Sequence[bytes]) -> list[tuple[str, int]]:
    """``[item_id, ts_ms]`` msgpack entries → pairs; undecodable entries are skipped and counted."""
    out: list[tuple[str, int]] = []
    for entry in entries:
        try:
            value = msgpack.unpackb(entry, raw=False)
        except (ValueError, msgpack.UnpackException):
            value = None
        if (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], str)
            and isinstance(value[1], int)
            and not isinstance(value[1], bool)
        ):
            out.append((value[0], value[1]))
        else:
            MALFORMED.labels(kind="history").inc()
    return out


def decode_profile(raw: bytes | None) -> list[float] | None:
    """A msgpack list of numbers → floats; ``None`` when absent or undecodable (counted)."""
    if raw is None:
        return None
    try:
        value = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.UnpackException):
        value = None
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    MALFORMED.labels(kind="profile").inc()
    return None


def _split(csv: str | None) -> list[str]:
    return [part.strip() for part in (csv or "").split(",") if part.strip()]


class CategoryCache:
    """Item categories read from the item hashes, trusted for ``ttl_s`` (thread-safe enough:
    a race only costs a duplicate read)."""

    def __init__(self, client: redis.Redis, layout: SnapshotLayout, ttl_s: float = CATEGORY_TTL_S) -> None:
        self.client = client
        self.layout = layout
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[str | None, float]] = {}

    def lookup(self, item_ids: Sequence[str]) -> list[str | None]:
        """Categories of ``item_ids`` in order (``None``: no item hash or no category)."""
        now = time.monotonic()
        out: list[str | None] = [None] * len(item_ids)
        missing: list[int] = []
        for i, item_id in enumerate(item_ids):
            entry = self._cache.get(item_id)
            if entry is not None and entry[1] > now:
                out[i] = entry[0]
            else:
                missing.append(i)
        if missing:
            pipe = self.client.pipeline(transaction=False)
            for i in missing:
                pipe.hget(self.layout.item(item_ids[i]), "category")
            values = pipe.execute()
            if len(self._cache) + len(missing) > CATEGORY_CACHE_MAX:
                self._cache = {}
            expires = now + self.ttl_s
            for i, value in zip(missing, values, strict=True):
                category = _text(value) or None
                out[i] = category
                self._cache[item_ids[i]] = (category, expires)
        return out


_THREAD = threading.local()


def _single_threaded_here() -> None:
    """Limit OpenMP (faiss) and torch to one thread *in the calling thread*.

    OpenMP's thread count is a per-thread setting: calling ``faiss.omp_set_num_threads`` at
    startup only affects the main thread, while requests run on the server's thread pool, where
    each thread would otherwise start its own team of spinning OpenMP threads (measured: ~15 ms
    instead of ~1 ms per request on 2 cores).
    """
    if not getattr(_THREAD, "configured", False):
        faiss.omp_set_num_threads(1)
        torch.set_num_threads(1)
        _THREAD.configured = True


class RetrieverService:
    """Everything a worker process needs to answer requests; the HTTP layer stays thin."""

    def __init__(self, cfg: Config, watcher_poll_interval_s: float = 1.0) -> None:
        self.cfg = cfg
        self.layout = SnapshotLayout(cfg.redis.key_prefix)
        self.redis = redis.Redis.from_url(
            cfg.redis.url, socket_timeout=REQUEST_SOCKET_TIMEOUT_S, socket_connect_timeout=REQUEST_SOCKET_TIMEOUT_S
        )
        # the watcher reads big parts and holds a pub/sub connection: its own client
        self._watcher_redis = redis.Redis.from_url(cfg.redis.url, socket_timeout=30.0, socket_connect_timeout=5.0)
        self.watcher = SnapshotWatcher(SnapshotStore(self._watcher_redis, self.layout), watcher_poll_interval_s)
        self.categories = CategoryCache(self.redis, self.layout)
        self._quiet_until = 0.0

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.redis.close()
        self._watcher_redis.close()

    def recommend(
        self,
        user_id: str,
        k: int | None,
        fresh_history: Sequence[str | HistoryEvent] = (),
        profile: Sequence[float] | None = None,
        exclude: Sequence[str] = (),
        categories: Sequence[str] | None = None,
        diversity: bool = False,
        context: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Answer one request.

        Raises:
            HTTPException: 400 for a blank user id or k out of range, 503 without a snapshot
                or when Redis fails.
        """
        started = time.perf_counter()
        _single_threaded_here()
        if not user_id.strip():
            raise HTTPException(400, "user_id must not be empty")
        k = self.cfg.retriever.default_k if k is None else k
        if not 1 <= k <= self.cfg.retriever.max_k:
            raise HTTPException(400, f"k must be between 1 and {self.cfg.retriever.max_k} (got {k})")
        state = self.watcher.state  # one read: this request uses this state throughout
        if state is None:
            raise HTTPException(503, NO_SNAPSHOT)
        now_ms = int(time.time() * 1000)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.lrange(self.layout.history(user_id), 0, state.model_config.history_len - 1)
            pipe.get(self.layout.profile(user_id))
            raw_history, raw_profile = pipe.execute()
            history = _merge_history(fresh_history, decode_history(raw_history), now_ms)
            if profile is None:
                profile = decode_profile(raw_profile)
            # decay towards the newest event if event time runs ahead of the wall clock
            now_ms = max(now_ms, max(ts for _, ts in history)) if history else now_ms
            vec = state.user_vector(user_id, history, profile, now_ms, context)
            excluded = {item_id for item_id, _ in history}
            excluded.update(exclude)
            hits = state.search(
                vec,
                k,
                excluded,
                category_filter=set(categories) if categories else None,
                item_category=self.categories.lookup,
                max_per_category=math.ceil(k / 3) if diversity else None,
            )
            pipe = self.redis.pipeline(transaction=False)
            for item_id, _ in hits:
                pipe.hgetall(self.layout.item(item_id))
            details = pipe.execute() if hits else []
        except redis.RedisError as exc:
            if time.monotonic() >= self._quiet_until:  # an outage fails every request: log every 10 s
                log.warning("redis failed during a request: %s", exc)
                self._quiet_until = time.monotonic() + 10.0
            raise HTTPException(503, f"redis unavailable: {exc}") from None
        items = [
            {
                "item_id": item_id,
                "score": score,
                "category": _text(detail.get(b"category")) or None,
                "title": _text(detail.get(b"title")),
            }
            for (item_id, score), detail in zip(hits, details, strict=True)
        ]
        return {
            "user_id": user_id,
            "version": state.version,
            "items": items,
            "took_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }


def _merge_history(
    fresh: Sequence[str | HistoryEvent], stored: list[tuple[str, int]], now_ms: int
) -> list[tuple[str, int]]:
    """Fresh (request) and stored (Redis) interactions, newest first, exact duplicates once."""
    if not fresh:
        return stored
    merged: list[tuple[str, int]] = []
    for event in fresh:
        if isinstance(event, str):
            merged.append((event, now_ms))
        else:
            merged.append((event.item_id, now_ms if event.ts_ms is None else event.ts_ms))
    seen = set(merged)
    merged.extend(pair for pair in stored if pair not in seen)
    merged.sort(key=lambda pair: -pair[1])
    return merged


class _RequestMetrics:
    """Pure ASGI middleware: counts ``/recommend`` requests by status and times them
    (validation errors included, which never reach the endpoint)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/recommend":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            REQUESTS.labels(status=str(status)).inc()
            LATENCY.observe(time.perf_counter() - started)


# --- the app ------------------------------------------------------------------------------------
def create_app(cfg: Config, watcher_poll_interval_s: float = 1.0) -> FastAPI:
    """The retriever's FastAPI app; the snapshot watcher runs while the app's lifespan does.

    Args:
        cfg: the configuration (redis and retriever sections are used).
        watcher_poll_interval_s: how often the snapshot pointer is polled besides pub/sub.
    """
    torch.set_num_threads(1)  # one request = one thread; parallelism comes from workers
    faiss.omp_set_num_threads(1)
    service = RetrieverService(cfg, watcher_poll_interval_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        log.info("retriever worker %d started; waiting for snapshots on %s", os.getpid(), service.layout.channel)
        try:
            yield
        finally:
            service.stop()
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                multiprocess.mark_process_dead(os.getpid())

    app = FastAPI(
        title="twotower retriever",
        description="Two-tower candidate retrieval: user tower online, Faiss top-K, hot-swapped snapshots.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_RequestMetrics)

    @app.get("/recommend", response_model=RecommendResponse)
    def recommend_get(
        user_id: str = Query(min_length=1, max_length=MAX_USER_ID_LEN, description="The user."),
        k: int | None = Query(None, description="Items to return."),
        exclude: str = Query("", description="Comma-separated item ids to leave out."),
        category: str = Query("", description="Comma-separated categories to keep (default: all)."),
        diversity: bool = Query(False, description="Cap each category at ceil(k/3) items."),
    ) -> dict[str, Any]:
        """Top-k items for a user (history and profile from Redis)."""
        return service.recommend(user_id, k, (), None, _split(exclude), _split(category) or None, diversity)

    @app.post("/recommend", response_model=RecommendResponse)
    def recommend_post(body: RecommendRequest) -> dict[str, Any]:
        """Top-k items for a user, with optional fresh history and profile in the body."""
        return service.recommend(
            body.user_id, body.k, body.history, body.profile, body.exclude, body.category, body.diversity, body.context
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        """The process is alive (also before the first snapshot)."""
        state = service.watcher.state
        return {"status": "ok", "version": state.version if state else None}

    @app.get("/ready")
    def ready() -> JSONResponse:
        """200 once a snapshot is loaded, 503 before."""
        state = service.watcher.state
        if state is None:
            return JSONResponse({"detail": NO_SNAPSHOT}, status_code=503)
        return JSONResponse({"status": "ready", "version": state.version, "items": state.n_items})

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus exposition (all workers' metrics in multiprocess mode)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_env() -> FastAPI:
    """Zero-argument factory for ``uvicorn --factory``: configuration from file/environment,
    JSON logs set up in this (worker) process."""
    cfg = load_config()
    setup_logging(cfg.observability, "retriever")
    return create_app(cfg)
