"""The retriever's HTTP API: user tower online + Faiss top-K over the served snapshot.

Endpoints:

* ``GET /recommend?user_id=&k=&exclude=a,b&category=c1,c2&diversity=false`` and
  ``POST /recommend`` (JSON: ``user_id``, ``k``, ``history``, ``profile``, ``exclude``,
  ``category``, ``diversity``, ``context``) → ``{"user_id", "version", "items": [{"item_id", "score",
  "category", "title"}], "took_ms"}``. ``score`` is the cosine of the user and item vectors.
  In a GET, ``exclude`` and ``category`` may also be repeated (the values add up); ``user_id``,
  ``k`` and ``diversity`` given twice are a 400.
* ``GET /health``: the process is alive (200 even before the first snapshot; a worker starting
  while a version is published accepts connections only once it has loaded it, see
  ``retriever.startup_wait_s``).
* ``GET /ready``: 200 once a snapshot is loaded, else 503.
* ``GET /metrics``: Prometheus (multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set).

Per request (an ``async`` handler on the event loop, no thread-pool hop): one batch of Redis
commands (:mod:`retriever.resp`: a worker's requests share one connection) reads the user's
stored history (all of it: ``LRANGE 0..publisher.history_max_len-1``) and profile, unless the
worker read them before and Redis has not reported them changed since
(:mod:`retriever.tracked_cache`, ``retriever.redis_cache_mb``); the user
vector is pooled from the newest ``model.history_len`` of those items the snapshot knows (plus
any fresh history in a POST body); everything in the stored history and in ``exclude`` is left
out of the results. Item details (category, title) come from a per-process
:class:`ItemDetailsCache`, invalidated by the snapshot watcher for the items a delta touches and
wholly on a full version (plus a 60 s TTL as a backstop); only cache misses cost a second round
trip.
A category filter or the diversity cap reads categories through the same cache (that rarer
path runs on a worker thread, since it may need several lookups). The response is serialised
once with orjson (no pydantic response validation on the hot path).

Diversity (``diversity=true``) is a per-category cap: at most ``ceil(k / 3)`` items of one
category, walking the ranked list; items of unknown category are not capped, and when the
examined candidates cannot fill ``k`` under the cap the best capped-out items fill the rest.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import parse_qsl

import faiss
import msgpack
import numpy as np
import orjson
import redis
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
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

from retriever.gc_pauses import GcPauseTimer, freeze_what_is_loaded
from retriever.loop_lag import LoopLagMonitor
from retriever.parts import host_part_reader
from retriever.resp import RequestRedis, request_client
from retriever.state import ServingState
from retriever.thread_sched import shorten_thread_slice
from retriever.tracked_cache import EVENTS, TrackedCache
from retriever.watcher import SnapshotWatcher
from retriever.workers import MULTIPROC_ENV
from twotower.config import Config, load_config
from twotower.daemon import setup_logging
from twotower.events import MAX_FEATURE_ABS, MAX_ID_LEN, MAX_TS_MS
from twotower.snapshots import SnapshotLayout, SnapshotStore

log = logging.getLogger(__name__)

NO_SNAPSHOT = "no snapshot published yet"
_K_TEXT = re.compile(r"-?[0-9]{1,9}")
"""A ``k`` the GET fast path parses itself (anything else goes through FastAPI's validation)."""
DETAILS_TTL_S = 60.0
"""Backstop: how long a process trusts item details it read from Redis even without a new
version (the watcher invalidates them on every swap that may have changed them)."""
DETAILS_CACHE_MAX = 500_000
"""Entries of the item-details cache; the oldest are evicted beyond this."""
DETAIL_FIELDS = ("category", "title")
REQUEST_SOCKET_TIMEOUT_S = 2.0
"""Redis socket timeout on the request path (fail fast rather than hang a request)."""
MAX_LIST_LEN = 10_000
"""Longest history / exclude / category / profile list a request may send."""
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]
"""An id as the event schema bounds it."""
Feature = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_FEATURE_ABS, le=MAX_FEATURE_ABS)]
"""A profile or context value as the event schema bounds features: finite in the float32 tower."""

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
REDIS_CACHE = Counter(
    "twotower_retriever_redis_cache_total",
    "Cached reads of users' histories and profiles (retriever.redis_cache_mb) by event: hit, miss, "
    "invalidated (Redis said the key changed), evicted (room), flushed (all, a connection ended).",
    ["event"],
)


# --- request and response bodies ----------------------------------------------------------------
class HistoryEvent(BaseModel):
    """A fresh interaction the client knows of (Redis may not have it yet)."""

    model_config = ConfigDict(extra="forbid")
    item_id: Id
    ts_ms: int | None = Field(default=None, ge=0, le=MAX_TS_MS)
    """Event time in ms; default: now."""


class RecommendRequest(BaseModel):
    """Body of ``POST /recommend``."""

    model_config = ConfigDict(extra="forbid")
    user_id: Id
    k: int | None = Field(default=None, strict=True)
    """Items to return; default ``retriever.default_k``, at most ``retriever.max_k``. A JSON
    integer (``true``, ``5.0`` or ``"5"`` are refused)."""
    history: list[Id | HistoryEvent] = Field(default_factory=list, max_length=MAX_LIST_LEN)
    """Fresh interactions (item ids, or ``{item_id, ts_ms}``), merged with the stored history."""
    profile: list[Feature] | None = Field(default=None, max_length=MAX_LIST_LEN)
    """Profile features; overrides the stored profile."""
    context: list[Feature] | None = Field(default=None, max_length=MAX_LIST_LEN)
    """The request's dense context vector (``model.context_dim`` values); default zeros."""
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_LIST_LEN)
    category: list[Id] | None = Field(default=None, max_length=MAX_LIST_LEN)
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
            and 0 <= value[1] <= MAX_TS_MS
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
    if isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= MAX_FEATURE_ABS for v in value
    ):  # abs(nan) <= bound is False: NaN is refused with the rest
        return [float(v) for v in value]
    MALFORMED.labels(kind="profile").inc()
    return None


def _json_safe(value: Any) -> Any:
    """``value`` as plain JSON in UTF-8 can always carry it, for a validation error's detail:
    what a client sent that the schema refused may not be (a NaN or infinity becomes its
    ``repr``; a lone surrogate escaped in JSON text, ``\\ud800``, its backslash escape; bytes
    that are not UTF-8, their decoding with U+FFFD; any other object, its ``str``)."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_json_safe(str(key)): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return _json_safe(str(value))


def _split(csv: str | None) -> list[str]:
    return [part.strip() for part in (csv or "").split(",") if part.strip()]


class ItemDetailsCache:
    """Item details (category, title) read from the item hashes, kept per process.

    Details change only with catalogue events, and the publisher writes an item's hash before
    it publishes the version carrying the item, so the snapshot watcher invalidates the items
    a delta touches (and everything on a full version) when it swaps; ``ttl_s`` is a backstop
    for edits that reach Redis without a new version. An item without a hash is cached as
    ``(None, None)`` too (until invalidated or expired).

    Thread-safety: lookups run on the event loop (and on a worker thread for filtered
    requests), invalidation on the watcher thread. A fill carries the :attr:`generation` it
    started under and is dropped if an invalidation happened meanwhile, so a read that raced a
    swap never re-inserts stale details.
    """

    def __init__(self, ttl_s: float = DETAILS_TTL_S, max_entries: int = DETAILS_CACHE_MAX) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.generation = 0
        self._entries: dict[str, tuple[str | None, str | None, float]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, item_ids: Sequence[str], now: float) -> tuple[list[tuple[str | None, str | None] | None], list[int]]:
        """Cached details of ``item_ids`` in order (``None`` where missing or expired), and the
        indexes of those missing."""
        entries = self._entries
        out: list[tuple[str | None, str | None] | None] = []
        missing: list[int] = []
        for i, item_id in enumerate(item_ids):
            entry = entries.get(item_id)
            if entry is not None and entry[2] > now:
                out.append((entry[0], entry[1]))
            else:
                out.append(None)
                missing.append(i)
        return out, missing

    def put(self, pairs: Sequence[tuple[str, tuple[str | None, str | None]]], generation: int, now: float) -> None:
        """Remember details read from Redis under ``generation`` (dropped if it is stale)."""
        expires = now + self.ttl_s
        with self._lock:
            if generation != self.generation:
                return
            entries = self._entries
            overflow = len(entries) + len(pairs) - self.max_entries
            if overflow > 0:  # oldest first (dicts keep insertion order)
                for key in list(itertools.islice(entries, overflow)):
                    entries.pop(key, None)
            for item_id, (category, title) in pairs:
                entries[item_id] = (category, title, expires)

    def invalidate(self, item_ids: Iterable[str] | None = None) -> None:
        """Forget ``item_ids`` (``None``: everything)."""
        with self._lock:
            self.generation += 1
            if item_ids is None:
                self._entries = {}
            else:
                for item_id in item_ids:
                    self._entries.pop(item_id, None)

    def on_swap(self, old: ServingState | None, new: ServingState) -> None:
        """Watcher hook: drop what the new version may have changed (everything, unless the new
        state was derived from ``old`` by deltas)."""
        if old is None or new.base != old.base or new.changed_items is None:
            self.invalidate()
        elif new.changed_items:
            self.invalidate(new.changed_items)


def _decode_details(values: Sequence[bytes | None]) -> tuple[str | None, str | None]:
    category, title = values
    return (_text(category) or None, _text(title))


_THREAD = threading.local()


def _tracked_cache(cfg: Config) -> TrackedCache | None:
    """The request path's cache of users' reads (``retriever.redis_cache_mb``; ``None``: off)."""
    if cfg.retriever.redis_cache_mb <= 0:
        return None
    counters = {event: REDIS_CACHE.labels(event) for event in EVENTS}
    return TrackedCache(
        int(cfg.retriever.redis_cache_mb * 2**20),
        cfg.retriever.redis_cache_max_age_s,
        note=lambda event: counters[event].inc(),
    )


def _single_threaded_here() -> None:
    """Limit OpenMP (faiss) and torch to one thread *in the calling thread*.

    OpenMP's thread count is a per-thread setting: calling ``faiss.omp_set_num_threads`` at
    startup only affects the main thread, while requests run on the event loop's thread (and
    filtered ones on worker threads), where each thread would otherwise start its own team of
    spinning OpenMP threads (measured: ~15 ms instead of ~1 ms per request on 2 cores).
    """
    if not getattr(_THREAD, "configured", False):
        faiss.omp_set_num_threads(1)
        torch.set_num_threads(1)
        _THREAD.configured = True


def _json(body: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


class RetrieverService:
    """Everything a worker process needs to answer requests; the HTTP layer stays thin."""

    def __init__(self, cfg: Config, watcher_poll_interval_s: float = 1.0) -> None:
        self.cfg = cfg
        self.layout = SnapshotLayout(cfg.redis.key_prefix)
        # request path: one multiplexed connection per worker, used on the event loop only; users'
        # histories and profiles cached until Redis reports them changed
        self.redis: RequestRedis = request_client(cfg.redis.url, REQUEST_SOCKET_TIMEOUT_S, _tracked_cache(cfg))
        # category lookups of filtered requests run on a worker thread: a blocking client
        self.sync_redis = redis.Redis.from_url(
            cfg.redis.url, socket_timeout=REQUEST_SOCKET_TIMEOUT_S, socket_connect_timeout=REQUEST_SOCKET_TIMEOUT_S
        )
        # the watcher reads big parts and holds a pub/sub connection: its own client
        self._watcher_redis = redis.Redis.from_url(cfg.redis.url, socket_timeout=30.0, socket_connect_timeout=5.0)
        self.details = ItemDetailsCache()
        # the first worker of the host to load a full version leaves its big parts in a shared
        # directory, the others map them (retriever.parts)
        self.parts = host_part_reader(cfg.redis.url, cfg.redis.key_prefix, cfg.retriever)
        self.watcher = SnapshotWatcher(
            SnapshotStore(self._watcher_redis, self.layout),
            watcher_poll_interval_s,
            on_swap=self.details.on_swap,
            parts=self.parts,
            nice=cfg.retriever.reload_nice,
        )
        self._quiet_until = 0.0
        check_ms = cfg.retriever.loop_lag_check_ms
        self.loop_lag = (
            LoopLagMonitor(check_ms / 1000.0, cfg.retriever.loop_lag_warn_ms / 1000.0) if check_ms > 0 else None
        )

    def start(self) -> None:
        """Start following snapshots and, on the running event loop, checking its lag."""
        self.watcher.start()
        if self.loop_lag is not None:
            self.loop_lag.start()

    async def first_load(self, timeout_s: float) -> None:
        """Wait until the watcher has loaded its first version, if one is published (at most
        ``timeout_s``; see ``retriever.startup_wait_s``)."""
        if timeout_s <= 0:
            return
        try:
            published = await asyncio.to_thread(self.watcher.store.current_version)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot read the current snapshot pointer at start (%s): accepting requests", exc)
            return
        if published is None:
            return
        deadline = time.monotonic() + timeout_s
        while self.watcher.state is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.watcher.state is None:
            log.warning("no snapshot loaded within %.0f s of start: accepting requests (503 until one is)", timeout_s)

    async def stop(self) -> None:
        if self.loop_lag is not None:
            await self.loop_lag.stop()
        self.watcher.stop()
        self.parts.keep_only([])
        await self.redis.aclose()
        self.sync_redis.close()
        self._watcher_redis.close()

    def _redis_failed(self, exc: Exception) -> HTTPException:
        if time.monotonic() >= self._quiet_until:  # an outage fails every request: log every 10 s
            log.warning("redis failed during a request: %s", exc)
            self._quiet_until = time.monotonic() + 10.0
        return HTTPException(503, f"redis unavailable: {exc}")

    def categories_sync(self, item_ids: Sequence[str]) -> list[str | None]:
        """Categories of ``item_ids`` in order, through the cache (blocking; worker threads only)."""
        now = time.monotonic()
        generation = self.details.generation
        cached, missing = self.details.get(item_ids, now)
        if missing:
            pipe = self._details_pipeline(self.sync_redis, item_ids, missing)
            self._fill_details(cached, item_ids, missing, pipe.execute(), generation, now)
        return [d[0] if d is not None else None for d in cached]

    async def _details(self, item_ids: Sequence[str]) -> list[tuple[str | None, str | None]]:
        now = time.monotonic()
        generation = self.details.generation
        cached, missing = self.details.get(item_ids, now)
        if missing:
            commands = [("HMGET", self.layout.item(item_ids[i]), *DETAIL_FIELDS) for i in missing]
            replies = await self.redis.execute(commands)
            self._fill_details(cached, item_ids, missing, replies, generation, now)
        return cached  # type: ignore[return-value]  (every slot is filled now)

    def _details_pipeline(self, client: redis.Redis, item_ids: Sequence[str], missing: Sequence[int]) -> Any:
        """One pipeline reading the details of the missing items (blocking client)."""
        pipe = client.pipeline(transaction=False)
        for i in missing:
            pipe.hmget(self.layout.item(item_ids[i]), DETAIL_FIELDS)
        return pipe

    def _fill_details(
        self,
        cached: list[Any],
        item_ids: Sequence[str],
        missing: Sequence[int],
        replies: Sequence[Any],
        generation: int,
        now: float,
    ) -> None:
        """Put the fetched details into their slots of ``cached`` and into the cache."""
        fetched = [_decode_details(values) for values in replies]
        for i, details in zip(missing, fetched, strict=True):
            cached[i] = details
        self.details.put([(item_ids[i], d) for i, d in zip(missing, fetched, strict=True)], generation, now)

    def _search_filtered(
        self,
        state: ServingState,
        vec: np.ndarray,
        k: int,
        excluded: set[str],
        categories: Sequence[str] | None,
        diversity: bool,
    ) -> list[tuple[str, float]]:
        _single_threaded_here()
        return state.search(
            vec,
            k,
            excluded,
            category_filter=set(categories) if categories else None,
            item_category=self.categories_sync,
            max_per_category=math.ceil(k / 3) if diversity else None,
        )

    async def recommend(
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
            # the whole stored history: the newest history_len are pooled, all of it is excluded
            raw_history, raw_profile = await self.redis.execute(
                (
                    ("LRANGE", self.layout.history(user_id), 0, self.cfg.publisher.history_max_len - 1),
                    ("GET", self.layout.profile(user_id)),
                ),
                cached=True,
            )
        except (redis.RedisError, OSError) as exc:
            raise self._redis_failed(exc) from None
        history = _merge_history(fresh_history, decode_history(raw_history), now_ms)
        if profile is None:
            profile = decode_profile(raw_profile)
        # decay towards the newest event if event time runs ahead of the wall clock
        now_ms = max(now_ms, max(ts for _, ts in history)) if history else now_ms
        vec = state.user_vector(user_id, history, profile, now_ms, context)
        excluded = {item_id for item_id, _ in history}
        excluded.update(exclude)
        try:
            if categories or diversity:
                hits = await asyncio.to_thread(self._search_filtered, state, vec, k, excluded, categories, diversity)
            else:
                hits = state.search(vec, k, excluded)
            details = await self._details([item_id for item_id, _ in hits]) if hits else []
        except (redis.RedisError, OSError) as exc:
            raise self._redis_failed(exc) from None
        items = [
            {"item_id": item_id, "score": score, "category": category, "title": title}
            for (item_id, score), (category, title) in zip(hits, details, strict=True)
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
    """Fresh (request) and stored (Redis) interactions, newest first by event time (ties in
    the order given), exact duplicates once. Redis holds a history in arrival order, which a
    late or replayed event breaks; the trainer's is in event time."""
    if not fresh:
        return stored if _newest_first(stored) else sorted(stored, key=lambda pair: -pair[1])
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


def _newest_first(history: Sequence[tuple[str, int]]) -> bool:
    return all(a[1] >= b[1] for a, b in itertools.pairwise(history))


_FAST_KEYS = frozenset({"user_id", "k", "diversity"})
_LIST_KEYS = ("exclude", "category")
"""GET parameters that are lists: each value is comma-separated, and repeats add to the list
(``exclude=a&exclude=b`` is ``exclude=a,b``). The others may be given once."""
_FAST_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_JSON_HEADERS = [(b"content-type", b"application/json")]


def fast_query(query_string: bytes) -> tuple[str, int | None, list[str], list[str] | None, bool] | None:
    """The arguments of a plain ``GET /recommend`` query, or ``None`` when anything about it
    is unusual (missing or over-long user id, a k that is not a plain integer, a diversity that
    is not true/false/1/0, a repeated ``user_id``, ``k`` or ``diversity``, undecodable bytes):
    such queries take FastAPI's route, which validates them and answers 4xx with its usual detail."""
    try:
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    args: dict[str, str] = {}
    lists: dict[str, list[str]] = {key: [] for key in _LIST_KEYS}
    for key, value in pairs:
        if key in _FAST_KEYS:
            if key in args:
                return None
            args[key] = value
        elif key in lists:
            lists[key].extend(_split(value))
    user_id = args.get("user_id")
    if user_id is None or not 1 <= len(user_id) <= MAX_ID_LEN:
        return None
    k_text = args.get("k")
    if k_text is not None and not _K_TEXT.fullmatch(k_text):
        return None  # FastAPI's route answers it (422, or 400 for a number out of range)
    diversity = _FAST_BOOLS.get(args.get("diversity", "false"))
    if diversity is None:
        return None
    return (
        user_id,
        None if k_text is None else int(k_text),
        lists["exclude"],
        lists["category"] or None,
        diversity,
    )


class RecommendFrontDoor:
    """The retriever's ASGI application: a thin front door around the FastAPI app.

    It is the outermost layer (uvicorn calls it directly), not a FastAPI middleware: inside
    FastAPI a request would first pass FastAPI's and Starlette's own middleware stack (error
    handling, body limits, telemetry), which a plain ``GET /recommend`` does not need.

    * Answers a plain ``GET /recommend`` (see :func:`fast_query`) itself: same service call,
      same body and statuses (``{"detail": ...}`` for 400/503), without FastAPI's routing,
      dependency solving and response handling, which cost more CPU than the user tower and
      the search together. Anything else goes on to FastAPI unchanged.
    * Counts every ``/recommend`` request by status and times it (validation errors
      included, which never reach an endpoint).
    """

    def __init__(self, app: FastAPI, service: RetrieverService) -> None:
        self.app = app
        self.service = service
        self.state = app.state
        """The FastAPI app's state (``state.service`` is the :class:`RetrieverService`)."""
        self._requests_by_status: dict[int, Any] = {}
        """``REQUESTS`` children by status (``labels()`` takes a lock and builds a key per call)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/recommend":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        try:
            args = fast_query(scope["query_string"]) if scope["method"] == "GET" else None
            if args is not None:
                try:
                    user_id, k, exclude, categories, diversity = args
                    body = orjson.dumps(
                        await self.service.recommend(
                            user_id, k, exclude=exclude, categories=categories, diversity=diversity
                        )
                    )
                    status = 200
                except HTTPException as exc:
                    body = orjson.dumps({"detail": exc.detail})
                    status = exc.status_code
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return

            async def send_and_note(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            await self.app(scope, receive, send_and_note)
        finally:
            counter = self._requests_by_status.get(status)
            if counter is None:
                counter = self._requests_by_status[status] = REQUESTS.labels(status=str(status))
            counter.inc()
            LATENCY.observe(time.perf_counter() - started)


# --- the app ------------------------------------------------------------------------------------
def create_app(cfg: Config, watcher_poll_interval_s: float = 1.0) -> RecommendFrontDoor:
    """The retriever's ASGI app (the FastAPI routes behind :class:`RecommendFrontDoor`); the
    snapshot watcher runs while the app's lifespan does.

    Args:
        cfg: the configuration (redis and retriever sections are used).
        watcher_poll_interval_s: how often the snapshot pointer is polled besides pub/sub.
    """
    torch.set_num_threads(1)  # one request = one thread; parallelism comes from workers
    faiss.omp_set_num_threads(1)
    sys.setswitchinterval(cfg.retriever.gil_switch_interval_ms / 1000.0)
    service = RetrieverService(cfg, watcher_poll_interval_s)
    gc_timer = GcPauseTimer()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # the lifespan runs on the event loop's thread; the watcher, started below, inherits it
        if cfg.retriever.request_slice_us:
            shorten_thread_slice(cfg.retriever.request_slice_us)
        gc_timer.install()
        if cfg.retriever.gc_freeze:
            frozen = freeze_what_is_loaded()
            log.info("%d objects exempted from garbage collection (retriever.gc_freeze)", frozen)
        service.start()
        # accept connections only once the published version is loaded (uvicorn listens after
        # this returns; the other workers take the connections meanwhile)
        await service.first_load(cfg.retriever.startup_wait_s)
        log.info("retriever worker %d started; following snapshots on %s", os.getpid(), service.layout.channel)
        try:
            yield
        finally:
            await service.stop()
            gc_timer.uninstall()
            if cfg.retriever.gc_freeze:
                gc.unfreeze()  # an app served in-process (tests) leaves the collector as it was
            if os.environ.get(MULTIPROC_ENV):
                multiprocess.mark_process_dead(os.getpid())

    app = FastAPI(
        title="twotower retriever",
        description="Two-tower candidate retrieval: user tower online, Faiss top-K, hot-swapped snapshots.",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: object, exc: RequestValidationError) -> Response:
        """422 with FastAPI's usual detail, made safe to write whatever was refused (a NaN, a lone
        surrogate, bytes that are not UTF-8: see :func:`_json_safe`) rather than failing the
        answer with a 500."""
        return JSONResponse({"detail": _json_safe(exc.errors())}, status_code=422)

    # response_model documents the body; the handlers return pre-serialised JSON, which
    # FastAPI passes through without validating or re-encoding it
    @app.get("/recommend", response_model=RecommendResponse)
    async def recommend_get(
        request: Request,
        user_id: str = Query(min_length=1, max_length=MAX_ID_LEN, description="The user."),
        k: int | None = Query(None, description="Items to return."),
        exclude: list[str] = Query([], description="Item ids to leave out: comma-separated, or repeated."),
        category: list[str] = Query([], description="Categories to keep (default: all): comma-separated, or repeated."),
        diversity: bool = Query(False, description="Cap each category at ceil(k/3) items."),
    ) -> Response:
        """Top-k items for a user (history and profile from Redis)."""
        for name in _FAST_KEYS:
            if len(request.query_params.getlist(name)) > 1:
                raise HTTPException(400, f"{name} was given more than once")
        excluded = [part for value in exclude for part in _split(value)]
        categories = [part for value in category for part in _split(value)] or None
        return _json(await service.recommend(user_id, k, (), None, excluded, categories, diversity))

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend_post(body: RecommendRequest) -> Response:
        """Top-k items for a user, with optional fresh history and profile in the body."""
        return _json(
            await service.recommend(
                body.user_id,
                body.k,
                body.history,
                body.profile,
                body.exclude,
                body.category,
                body.diversity,
                body.context,
            )
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
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return RecommendFrontDoor(app, service)


def app_from_env() -> RecommendFrontDoor:
    """Zero-argument factory for ``uvicorn --factory``: configuration from file/environment,
    JSON logs set up in this (worker) process."""
    cfg = load_config()
    setup_logging(cfg.observability, "retriever")
    return create_app(cfg)
