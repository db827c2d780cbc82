"""The retriever against a live Redis: HTTP API on a real uvicorn, the watcher, hot swaps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import httpx
import msgpack
import numpy as np
import pytest
import redis
import redis.asyncio
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from retriever import malloc
from retriever.app import NO_SNAPSHOT, RecommendFrontDoor, create_app
from retriever.resp import RespClient
from retriever.state import ServingState
from retriever.thread_sched import thread_slice_us
from retriever.watcher import SnapshotWatcher
from retriever.workers import bound_socket, reuse_port_available, run_workers, serving_already
from twotower.blobs import Rows
from twotower.config import Config, ModelConfig
from twotower.model import TwoTower, dense_arrays
from twotower.snapshot_parts import DeltaSnapshot, FullSnapshot, encode_delta, encode_full
from twotower.snapshots import DELTA, FULL, SnapshotLayout, SnapshotStore

pytestmark = pytest.mark.integration

# no time context: expected answers are computed here at another time than the server's request
MODEL = ModelConfig(
    dim=8, id_dim=4, hidden=16, n_categories=4, content_dim=2, profile_dim=3, history_len=6, context_time=False
)
N_ITEMS = 60
DEADLINE_S = 15.0


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def category(item_id: str) -> str:
    return f"c{sum(map(ord, item_id)) % 3}"


def full_snapshot(seed: int = 0, n_items: int = N_ITEMS) -> FullSnapshot:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    items = unit(rng.standard_normal((n_items, MODEL.dim)))
    index = faiss.index_factory(MODEL.dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(items, np.arange(n_items, dtype=np.int64))
    return FullSnapshot(
        model_config=MODEL,
        weights=dense_arrays(TwoTower(MODEL)),
        users=Rows([f"u{j}" for j in range(8)], rng.standard_normal((8, MODEL.id_dim)).astype(np.float32)),
        items=Rows([f"i{j}" for j in range(n_items)], items),
        index=faiss.serialize_index(index).tobytes(),
    )


def empty_delta(**kwargs: Any) -> DeltaSnapshot:
    base = {"users": Rows.empty(MODEL.id_dim), "items": Rows.empty(MODEL.dim), "removed_items": []}
    return DeltaSnapshot(**{**base, **kwargs})


@pytest.fixture
def cfg(redis_url: str) -> Iterator[Config]:
    """Redis only (no Kafka needed here): a private key prefix, removed afterwards."""
    prefix = f"rt{uuid.uuid4().hex[:12]}"
    yield Config().with_overrides(
        {"redis": {"url": redis_url, "key_prefix": prefix}, "retriever": {"default_k": 5, "max_k": 50}}
    )
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def store(cfg: Config) -> Iterator[SnapshotStore]:
    client = redis.Redis.from_url(cfg.redis.url)
    yield SnapshotStore(client, SnapshotLayout(cfg.redis.key_prefix))
    client.close()


def publish_full(store: SnapshotStore, snap: FullSnapshot) -> int:
    pipe = store.redis.pipeline(transaction=False)
    for item_id in snap.items.ids:
        pipe.hset(store.layout.item(item_id), mapping={"category": category(item_id), "title": f"Title {item_id}"})
    pipe.execute()
    return store.write(FULL, encode_full(snap), parent=None, trainer_seq=0)


def publish_delta(store: SnapshotStore, delta: DeltaSnapshot, parent: int) -> int:
    for item_id in delta.items.ids:
        store.redis.hset(store.layout.item(item_id), mapping={"category": category(item_id), "title": item_id})
    return store.write(DELTA, encode_delta(delta), parent=parent, trainer_seq=0)


@contextmanager
def serve(cfg: Config) -> Iterator[tuple[httpx.Client, RecommendFrontDoor]]:
    """The app on a real uvicorn server (own thread, free port) and a client for it."""
    app = create_app(cfg, watcher_poll_interval_s=0.2)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
            yield client, app
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_for(predicate: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_version(client: httpx.Client, version: int) -> None:
    def served() -> bool:
        response = client.get("/ready")
        return response.status_code == 200 and response.json()["version"] == version

    wait_for(served, f"version {version} to be served")


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


def ids_once_settled(
    client: httpx.Client, params: dict[str, Any], want: list[str], timeout_s: float = 5.0
) -> list[str]:
    """The ids served for ``params`` once they equal ``want``, or the last ones after ``timeout_s``.

    For a read right after a test wrote a user's keys in Redis itself: the worker's cached read
    is dropped when Redis's invalidation reaches it, pushed within about a round trip, which the
    next request may precede (retriever.tracked_cache)."""
    deadline = time.monotonic() + timeout_s
    got = ids(client.get("/recommend", params=params))
    while got != want and time.monotonic() < deadline:
        time.sleep(0.01)
        got = ids(client.get("/recommend", params=params))
    return got


def test_503_before_a_snapshot_then_recommendations(cfg: Config, store: SnapshotStore) -> None:
    with serve(cfg) as (client, _app):
        assert client.get("/health").json() == {"status": "ok", "version": None}
        assert client.get("/ready").status_code == 503
        response = client.get("/recommend", params={"user_id": "u0"})
        assert response.status_code == 503
        assert response.json() == {"detail": NO_SNAPSHOT}

        snap = full_snapshot()
        version = publish_full(store, snap)
        wait_version(client, version)
        assert client.get("/health").json() == {"status": "ok", "version": version}

        response = client.get("/recommend", params={"user_id": "u0", "k": 7})
        body = response.json()
        assert response.status_code == 200 and body["user_id"] == "u0" and body["version"] == version
        assert body["took_ms"] >= 0
        local = ServingState.load(store, version)
        want = local.search(local.user_vector("u0", [], None, 0), 7)
        assert [i["item_id"] for i in body["items"]] == [i for i, _ in want]
        np.testing.assert_allclose([i["score"] for i in body["items"]], [s for _, s in want], rtol=1e-5)
        for item in body["items"]:
            assert item["category"] == category(item["item_id"]) and item["title"] == f"Title {item['item_id']}"
        assert len(ids(client.get("/recommend", params={"user_id": "u0"}))) == cfg.retriever.default_k
        # unknown user: still served (zero ID row)
        assert len(ids(client.post("/recommend", json={"user_id": "nobody-yet", "k": 3}))) == 3


def test_a_worker_starting_while_a_version_is_published_accepts_requests_once_it_is_loaded(
    cfg: Config, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = publish_full(store, full_snapshot())
    build = SnapshotWatcher._build

    def slow_build(self: SnapshotWatcher, *args: Any) -> Any:  # a load that takes a while, as at 1M items
        time.sleep(1.0)
        return build(self, *args)

    monkeypatch.setattr(SnapshotWatcher, "_build", slow_build)
    with serve(cfg) as (client, _app):  # the first request right after the server started
        response = client.get("/recommend", params={"user_id": "u0", "k": 3})
        assert response.status_code == 200, response.text
        assert response.json()["version"] == version


def test_history_and_profile_in_redis_shape_the_result(cfg: Config, store: SnapshotStore) -> None:
    version = publish_full(store, full_snapshot())
    local = ServingState.load(store, version)
    lay = store.layout
    with serve(cfg) as (client, _app):
        wait_version(client, version)
        before = ids(client.get("/recommend", params={"user_id": "u1", "k": 8}))

        ts = int(time.time() * 1000) - 5_000  # one timestamp: pooling weights do not depend on "now"
        seen = before[:3]
        store.redis.lpush(lay.history("u1"), *[msgpack.packb([item_id, ts]) for item_id in reversed(seen)])
        store.redis.lpush(lay.history("u1"), b"\xc1not msgpack")  # skipped, counted
        history = [(item_id, ts) for item_id in seen]
        want = [i for i, _ in local.search(local.user_vector("u1", history, None, ts), 8, set(seen))]
        after = ids_once_settled(client, {"user_id": "u1", "k": 8}, want)
        assert not set(seen) & set(after)
        assert after == want

        profile = [1.5, -2.0, 0.5]
        store.redis.set(lay.profile("u1"), msgpack.packb(profile))
        want = [i for i, _ in local.search(local.user_vector("u1", history, profile, ts), 8, set(seen))]
        assert ids_once_settled(client, {"user_id": "u1", "k": 8}, want) == want

        # fresh history in a POST body counts and is excluded too; exclude= as well
        fresh = {"item_id": after[0], "ts_ms": ts}
        response = client.post("/recommend", json={"user_id": "u1", "k": 8, "history": [fresh], "exclude": [after[1]]})
        merged = [(after[0], ts), *history]
        want = local.search(local.user_vector("u1", merged, profile, ts), 8, {*seen, after[0], after[1]})
        assert ids(response) == [i for i, _ in want]
        assert not {*seen, after[0], after[1]} & set(ids(response))
        # GET exclude, category filter, diversity
        got = ids(client.get("/recommend", params={"user_id": "u1", "k": 5, "exclude": f"{after[0]}, {after[1]}"}))
        assert after[0] not in got and after[1] not in got and len(got) == 5
        got = client.get("/recommend", params={"user_id": "u1", "k": 6, "category": "c1,c2"}).json()["items"]
        assert len(got) == 6 and {i["category"] for i in got} <= {"c1", "c2"}
        got = client.get("/recommend", params={"user_id": "u1", "k": 6, "diversity": "true"}).json()["items"]
        counts = {c: [i["category"] for i in got].count(c) for c in ("c0", "c1", "c2")}
        assert len(got) == 6 and max(counts.values()) <= 2


def test_repeated_list_parameters_add_up_as_in_a_post(cfg: Config, store: SnapshotStore) -> None:
    """``exclude=a&exclude=b`` is ``exclude=a,b``, on the fast path and FastAPI's route alike
    (``diversity=yes`` takes the route); it once served ``a``: only the last value counted."""
    version = publish_full(store, full_snapshot())
    with serve(cfg) as (client, _app):
        wait_version(client, version)
        top = ids(client.get("/recommend", params={"user_id": "u3", "k": 4}))
        for extra in ([], [("diversity", "yes")]):
            base = [("user_id", "u3"), ("k", "4"), *extra]
            posted = {"user_id": "u3", "k": 4, "diversity": bool(extra)}
            repeated = ids(client.get("/recommend", params=[*base, ("exclude", top[0]), ("exclude", top[1])]))
            want = ids(client.post("/recommend", json={**posted, "exclude": top[:2]}))
            assert repeated == want and not set(top[:2]) & set(repeated)
            mixed = [*base, ("category", "c1"), ("category", "c0,c2")]
            want = ids(client.post("/recommend", json={**posted, "category": ["c1", "c0", "c2"]}))
            assert "c1" in {category(item_id) for item_id in want}  # the first value counts too
            assert ids(client.get("/recommend", params=mixed)) == want


def test_the_whole_stored_history_is_excluded_the_newest_pooled(cfg: Config, store: SnapshotStore) -> None:
    version = publish_full(store, full_snapshot())
    local = ServingState.load(store, version)
    history_len = local.model_config.history_len  # the snapshot's model
    with serve(cfg) as (client, _app):
        wait_version(client, version)
        ranked = ids(client.get("/recommend", params={"user_id": "u2", "k": 3 * history_len}))
        ts = int(time.time() * 1000) - 5_000
        seen = ranked[: 2 * history_len]  # more than the tower pools, fewer than the list keeps
        assert cfg.publisher.history_max_len >= len(seen)
        # LPUSH oldest first: the list reads newest first, so the retriever's top items are the oldest
        store.redis.lpush(store.layout.history("u2"), *[msgpack.packb([item_id, ts]) for item_id in seen])
        newest = [(item_id, ts) for item_id in reversed(seen)]
        want = [i for i, _ in local.search(local.user_vector("u2", newest[:history_len], None, ts), 8, set(seen))]
        got = ids_once_settled(client, {"user_id": "u2", "k": 8}, want)
        assert not set(seen) & set(got)  # beyond history_len too
        assert got == want


@pytest.mark.parametrize(
    ("method", "params", "status", "detail"),
    [
        ("GET", {"user_id": "u0", "k": 0}, 400, "k must be between 1 and 50"),
        ("GET", {"user_id": "u0", "k": 51}, 400, "k must be between 1 and 50"),
        ("GET", {"user_id": "u0", "k": "many"}, 422, "integer"),
        ("GET", {}, 422, "user_id"),
        ("GET", {"user_id": ""}, 422, "user_id"),
        ("GET", {"user_id": "   "}, 400, "user_id must not be empty"),
        ("GET", {"user_id": "u0", "diversity": "perhaps"}, 422, "diversity"),
        ("POST", {"user_id": "u0", "k": -1}, 400, "k must be between 1 and 50"),
        ("POST", {"k": 3}, 422, "user_id"),
        ("POST", {"user_id": "u0", "kk": 3}, 422, "kk"),
        ("POST", {"user_id": "u0", "history": [{"ts_ms": 1}]}, 422, "item_id"),
        ("POST", {"user_id": "u0", "profile": ["x"]}, 422, "profile"),
        ("POST", b"{not json", 422, "JSON"),
        ("GET", {"user_id": "u0", "k": "--5"}, 422, "integer"),  # the fast path once took it for a number
        ("GET", {"user_id": "u0", "k": "9" * 5000}, 422, "integer"),  # beyond int()'s digit limit
        ("POST", {"user_id": "u0", "history": [{"item_id": "i1", "ts_ms": 10**20}]}, 422, "ts_ms"),
        ("POST", {"user_id": "u0", "profile": [1e39]}, 422, "profile"),  # infinite in float32
        ("POST", b'{"user_id": "u0", "context": [NaN]}', 422, "context"),
        ("POST", {"user_id": "u0", "exclude": ["x" * 257]}, 422, "exclude"),
        ("POST", {"user_id": "u0", "k": True}, 422, "valid integer"),  # not k=1
        # what was refused cannot always be written back as it came: once a 500
        ("POST", b'{"user_id": "\\ud800"}', 422, "\\\\ud800"),  # a lone surrogate, escaped in JSON
        ("POST", b'{"user_id": "u0", "\\udfff": 1}', 422, "\\\\udfff"),  # ... as a key: it is in the loc
        ("POST text", b"\xff\xfe{", 422, "\ufffd"),  # not UTF-8, not declared JSON
        ("GET", [("user_id", "u0"), ("k", "2"), ("k", "3")], 400, "k was given more than once"),
        ("GET", [("user_id", "u0"), ("user_id", "u1")], 400, "user_id was given more than once"),
        ("GET", [("user_id", "u0"), ("diversity", "1"), ("diversity", "0")], 400, "diversity was given"),
    ],
)
def test_bad_requests_get_clear_4xx(
    cfg: Config, store: SnapshotStore, method: str, params: Any, status: int, detail: str
) -> None:
    version = publish_full(store, full_snapshot())
    with serve(cfg) as (client, _app):
        wait_version(client, version)
        if method == "GET":
            response = client.get("/recommend", params=params)
        elif isinstance(params, bytes):
            kind = "text/plain" if method == "POST text" else "application/json"
            response = client.post("/recommend", content=params, headers={"content-type": kind})
        else:
            response = client.post("/recommend", json=params)
        assert response.status_code == status, response.text
        assert detail in response.text


def test_a_published_delta_becomes_visible(cfg: Config, store: SnapshotStore) -> None:
    snap = full_snapshot()
    v1 = publish_full(store, snap)
    local = ServingState.load(store, v1)
    vec = local.user_vector("u2", [], None, 0)
    with serve(cfg) as (client, _app):
        wait_version(client, v1)
        assert "fresh" not in ids(client.get("/recommend", params={"user_id": "u2", "k": 50}))

        v2 = publish_delta(store, empty_delta(items=Rows(["fresh"], vec[None].copy())), parent=v1)
        wait_version(client, v2)
        body = client.get("/recommend", params={"user_id": "u2", "k": 3}).json()
        assert body["version"] == v2 and body["items"][0]["item_id"] == "fresh"
        assert body["items"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert body["items"][0]["category"] == category("fresh")

        v3 = publish_delta(store, empty_delta(removed_items=["fresh", "i0"]), parent=v2)
        wait_version(client, v3)
        got = ids(client.get("/recommend", params={"user_id": "u2", "k": 50}))
        assert "fresh" not in got and "i0" not in got and len(got) == 50


def test_cached_item_details_follow_deltas_and_full_versions(cfg: Config, store: SnapshotStore) -> None:
    snap = full_snapshot()
    v1 = publish_full(store, snap)
    local = ServingState.load(store, v1)
    top = local.search(local.user_vector("u3", [], None, 0), 2)
    first, second = (item_id for item_id, _ in top)

    def titles() -> dict[str, str]:
        body = client.get("/recommend", params={"user_id": "u3", "k": 2}).json()
        return {item["item_id"]: item["title"] for item in body["items"]}

    with serve(cfg) as (client, _app):
        wait_version(client, v1)
        assert titles() == {first: f"Title {first}", second: f"Title {second}"}
        # details are cached: an edit in Redis alone is not seen ...
        store.redis.hset(store.layout.item(first), "title", "renamed")
        store.redis.hset(store.layout.item(second), "title", "renamed too")
        assert titles()[first] == f"Title {first}"
        # ... a delta that carries the item drops it from the cache, other items stay cached
        vectors = dict(zip(snap.items.ids, snap.items.matrix, strict=True))
        v2 = store.write(
            DELTA, encode_delta(empty_delta(items=Rows([first], vectors[first][None].copy()))), parent=v1, trainer_seq=0
        )
        wait_version(client, v2)
        assert titles() == {first: "renamed", second: f"Title {second}"}
        # a full version drops everything
        v3 = store.write(FULL, encode_full(snap), parent=None, trainer_seq=0)
        wait_version(client, v3)
        assert titles() == {first: "renamed", second: "renamed too"}


def test_swaps_under_concurrent_requests_drop_nothing(cfg: Config, store: SnapshotStore) -> None:
    v = publish_full(store, full_snapshot())
    stop = threading.Event()
    results: list[list[tuple[int, int | None]]] = [[] for _ in range(4)]

    def hammer(slot: int, base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=10.0) as http:
            n = 0
            while not stop.is_set():
                n += 1
                if n % 2:
                    response = http.get("/recommend", params={"user_id": f"u{slot}", "k": 10, "diversity": n % 3 == 0})
                else:
                    response = http.post("/recommend", json={"user_id": f"u{slot}", "k": 10, "history": ["i1", "i2"]})
                version = response.json().get("version") if response.status_code == 200 else None
                results[slot].append((response.status_code, version))

    rng = np.random.default_rng(1)
    with serve(cfg) as (client, app):
        wait_version(client, v)
        base_url = str(client.base_url)
        threads = [threading.Thread(target=hammer, args=(slot, base_url)) for slot in range(4)]
        for thread in threads:
            thread.start()
        try:
            for step in range(40):
                if step % 10 == 9:
                    v = publish_full(store, full_snapshot(seed=step))
                else:
                    changed = [f"i{j}" for j in rng.choice(N_ITEMS, 5, replace=False)] + [f"new{step}"]
                    delta = empty_delta(
                        users=Rows([f"u{step % 8}"], rng.standard_normal((1, MODEL.id_dim)).astype(np.float32)),
                        items=Rows(changed, unit(rng.standard_normal((len(changed), MODEL.dim)))),
                        removed_items=[f"new{step - 1}"],
                    )
                    v = publish_delta(store, delta, parent=v)
                time.sleep(0.03)
            wait_version(client, v)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        watcher = app.state.service.watcher
        assert watcher.errors == 0
    statuses = [status for slot in results for status, _ in slot]
    assert len(statuses) > 100
    assert set(statuses) == {200}
    for slot in results:  # one process: the served version only moves forward
        versions = [version for _, version in slot]
        assert versions == sorted(versions)
    assert len({version for slot in results for _, version in slot}) > 5


def test_watcher_frees_swapped_out_states_itself(store: SnapshotStore) -> None:
    """A swapped-out state is freed by the watcher once no request holds it, never by the
    request that drops it last (freeing a big index would hold up the worker's requests)."""
    watcher = SnapshotWatcher(store, poll_interval_s=0.1)
    publish_full(store, full_snapshot())
    assert watcher.refresh() is True
    held = watcher.state  # a request in flight across the swap holds the old state
    old = weakref.ref(held)
    v2 = publish_full(store, full_snapshot(seed=2))
    assert watcher.refresh() is True and watcher.state.version == v2
    del held  # the request ends: the watcher still holds the old state, nothing is freed here
    assert old() is not None
    assert watcher.refresh() is False  # the watcher's next check frees it, on its own thread
    assert old() is None
    # a state replaced by a delta (the new one shares most of its parts, not the state itself)
    # goes the same way: kept through the swap, freed by the next check
    replaced = weakref.ref(watcher.state)
    publish_delta(store, empty_delta(items=Rows(["n1"], unit(np.ones((1, MODEL.dim))))), parent=v2)
    assert watcher.refresh() is True
    assert watcher.refresh() is False and replaced() is None


def test_the_watcher_thread_outlives_an_unexpected_failure(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception of a refresh is logged and counted, and the thread goes on watching: a dead
    watcher would leave its worker on a stale version (or none) for good."""
    watcher = SnapshotWatcher(store, poll_interval_s=0.05, retry_failed_s=0.0)
    build = watcher._build
    monkeypatch.setattr(watcher, "_build", lambda *args: (_ for _ in ()).throw(KeyError("surprise")))
    version = publish_full(store, full_snapshot())
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        while watcher.errors < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.errors >= 2 and watcher.state is None  # failed, and tried again
        monkeypatch.setattr(watcher, "_build", build)
        while (watcher.state is None or watcher.state.version != version) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.state is not None and watcher.state.version == version
    finally:
        watcher.stop()


def test_an_unexpected_failure_waits_as_long_as_an_expected_one(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not read again at every poll (a version too big for memory re-read hundreds of MB each
    second), and its traceback logged once."""
    watcher = SnapshotWatcher(store, poll_interval_s=0.05, retry_failed_s=60.0)
    calls: list[int] = []

    def short(target: int, _state: object) -> None:
        calls.append(target)
        raise MemoryError("injected: no room")

    monkeypatch.setattr(watcher, "_build", short)
    publish_full(store, full_snapshot())
    with caplog.at_level("WARNING", logger="retriever.watcher"):
        assert [watcher.refresh() for _ in range(4)] == [False] * 4
    assert len(calls) == 1 and watcher.errors == 1 and watcher.state is None
    assert caplog.text.count("Traceback") == 1 and "MemoryError('injected: no room')" in caplog.text


def test_watcher_keeps_serving_through_bad_versions(cfg: Config, store: SnapshotStore) -> None:
    watcher = SnapshotWatcher(store, poll_interval_s=0.1, retry_failed_s=60.0)
    assert watcher.refresh() is False and watcher.state is None  # nothing published: waits quietly
    assert watcher.errors == 0

    v1 = publish_full(store, full_snapshot())
    assert watcher.refresh() is True and watcher.state.version == v1

    garbage = {"users": b"\x01", "items": b"\x02", "removed_items": b"\x03"}  # checksums fine, content not
    bad = store.write(DELTA, garbage, parent=v1, trainer_seq=0)
    assert watcher.refresh() is False and watcher.state.version == v1 and watcher.errors == 1
    assert watcher.refresh() is False and watcher.errors == 1  # not retried within retry_failed_s

    v3 = publish_delta(store, empty_delta(items=Rows(["n1"], unit(np.ones((1, MODEL.dim))))), parent=v1)
    assert watcher.refresh() is True and watcher.state.version == v3 and "n1" in watcher.state.item_pos
    assert bad not in (watcher.state.version, watcher.state.base)

    v4 = publish_delta(store, empty_delta(removed_items=["n1"]), parent=v3)
    store.redis.set(store.layout.chunk(v4, "items", 0), b"tampered")
    assert watcher.refresh() is False and watcher.state.version == v3 and watcher.errors == 2

    store.redis.set(store.layout.current, 999_999)
    assert watcher.refresh() is False and watcher.state.version == v3 and watcher.errors == 3

    store.rollback(v1)  # the pointer moves back: followed with a full load
    assert watcher.refresh() is True and watcher.state.version == v1 and "n1" not in watcher.state.item_pos

    watcher.start()  # the thread follows pub/sub notices (and polls)
    try:
        v5 = publish_full(store, full_snapshot(seed=5))
        wait_for(lambda: watcher.state.version == v5, "the watcher thread to follow a new full version")
        v6 = publish_delta(store, empty_delta(items=Rows(["n2"], unit(np.ones((1, MODEL.dim))))), parent=v5)
        wait_for(lambda: watcher.state.version == v6, "the watcher thread to apply a delta")
    finally:
        watcher.stop()


def test_versions_numbered_again_after_redis_lost_its_data_are_loaded_whole(store: SnapshotStore) -> None:
    """A version number written again after Redis lost its data (a restart without it, a restore
    of an older save) names another version: it once kept serving the old one, and the old
    state took the new chain's deltas."""
    watcher = SnapshotWatcher(store, poll_interval_s=0.1, retry_failed_s=60.0)
    v1 = publish_full(store, full_snapshot(seed=0))
    assert watcher.refresh() is True and watcher.state is not None and watcher.state.version == v1
    old_base = watcher.state.base_vectors
    for key in store.redis.scan_iter(match=f"{store.layout.prefix}:*", count=1000):
        store.redis.unlink(key)  # the server is shared: only this test's keys
    assert watcher.refresh() is False and watcher.errors == 1  # no pointer: said, and still serving
    time.sleep(0.002)  # created_ms tells the two versions 1 apart
    again = publish_full(store, full_snapshot(seed=1))
    assert again == v1 and watcher.refresh() is True
    fresh = ServingState.load(store, again)
    assert watcher.state.created_ms == fresh.created_ms
    np.testing.assert_array_equal(watcher.state.base_vectors, fresh.base_vectors)
    assert not np.array_equal(old_base, fresh.base_vectors)

    for key in store.redis.scan_iter(match=f"{store.layout.prefix}:*", count=1000):
        store.redis.unlink(key)
    time.sleep(0.002)
    v1 = publish_full(store, full_snapshot(seed=2))
    v2 = publish_delta(store, empty_delta(items=Rows(["n1"], unit(np.ones((1, MODEL.dim))))), parent=v1)
    assert watcher.refresh() is True and watcher.state.version == v2
    np.testing.assert_array_equal(watcher.state.base_vectors, ServingState.load(store, v2).base_vectors)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_the_watcher_thread_alone_runs_at_a_lower_priority(store: SnapshotStore) -> None:
    """Reloads run on the time requests leave: the watcher's thread is niced, not the worker."""
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    watcher = SnapshotWatcher(store, poll_interval_s=0.1, nice=5)
    watcher.start()
    try:
        assert watcher._thread is not None
        tid = watcher._thread.native_id
        assert tid is not None
        wait_for(lambda: os.getpriority(os.PRIO_PROCESS, tid) == min(19, before + 5), "the watcher's nice value")
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    finally:
        watcher.stop()


def test_whole_reloads_take_turns_between_the_workers_of_a_host(cfg: Config, store: SnapshotStore) -> None:
    v1 = publish_full(store, full_snapshot())
    watcher = SnapshotWatcher(store, poll_interval_s=0.1)
    store.redis.set(watcher._turn_key, "another worker", px=60_000)
    assert watcher.refresh() is True and watcher.state.version == v1  # the first load never waits
    v2 = publish_full(store, full_snapshot(seed=2))
    done = threading.Event()
    thread = threading.Thread(target=lambda: (watcher.refresh(), done.set()))
    thread.start()
    time.sleep(0.5)
    assert not done.is_set() and watcher.state.version == v1  # waits for its turn, serving v1
    store.redis.delete(watcher._turn_key)  # the other worker is done
    thread.join(15)
    assert done.is_set() and watcher.state.version == v2
    assert store.redis.get(watcher._turn_key) is None  # released after the reload
    v3 = publish_delta(store, empty_delta(items=Rows(["n9"], unit(np.ones((1, MODEL.dim))))), parent=v2)
    store.redis.set(watcher._turn_key, "another worker", px=60_000)
    assert watcher.refresh() is True and watcher.state.version == v3  # deltas never wait


def test_metrics_endpoint(cfg: Config, store: SnapshotStore) -> None:
    version = publish_full(store, full_snapshot())
    with serve(cfg) as (client, _app):
        wait_version(client, version)
        assert client.get("/recommend", params={"user_id": "u0"}).status_code == 200
        assert client.get("/recommend", params={"user_id": "u0", "k": 0}).status_code == 400
        text = client.get("/metrics").text
        # the worker's event loop is checked every retriever.loop_lag_check_ms (50 ms by default)
        wait_for(
            lambda: _metric(client.get("/metrics").text, "twotower_retriever_event_loop_lag_seconds_count")[0] >= 2,
            "two event-loop lag checks",
        )
        # garbage collections are timed while the app runs (at least the one before it froze)
        wait_for(
            lambda: sum(_metric(client.get("/metrics").text, "twotower_retriever_gc_pause_seconds_count")) >= 1,
            "a timed garbage collection",
        )
    assert 'twotower_retriever_requests_total{status="200"}' in text
    assert 'twotower_retriever_requests_total{status="400"}' in text
    assert "twotower_retriever_latency_seconds_bucket" in text
    assert "twotower_retriever_snapshot_version" in text
    assert 'twotower_retriever_swaps_total{kind="full"}' in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_process(
    cfg: Config, port: int, workers: int, *, output: int = subprocess.PIPE, **env_vars: str
) -> subprocess.Popen[bytes]:
    """``serve_command`` in a process of its own, on ``cfg``'s Redis and key prefix."""
    env = {
        **os.environ,
        "REDIS_URL": cfg.redis.url,
        "TWOTOWER_REDIS__KEY_PREFIX": cfg.redis.key_prefix,
        "TWOTOWER_OBSERVABILITY__LOG_FORMAT": "json",
        **env_vars,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("TWOTOWER_CONFIG", None)
    code = f"from retriever.cli import serve_command; serve_command(host='127.0.0.1', port={port}, workers={workers})"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=output, stderr=subprocess.STDOUT)


def _metric(text: str, name: str) -> list[float]:
    families = text_string_to_metric_families(text)
    return [sample.value for family in families for sample in family.samples if sample.name == name]


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word), ``None`` if it has none."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


@pytest.mark.parametrize(("huge_pages", "retain"), [(True, True), (False, False)])
def test_serve_runs_with_the_configured_malloc_tunables(
    cfg: Config, store: SnapshotStore, huge_pages: bool, retain: bool
) -> None:
    if not malloc.supported() or _thp_mode() not in ("madvise", "always"):
        pytest.skip("needs Linux, glibc and transparent huge pages")
    if not huge_pages and _thp_mode() == "always":
        pytest.skip("with THP always on, memory gets huge pages whatever the retriever asks")
    # an index of a few MB: with the huge-page tunable glibc asks 2 MiB pages for it
    version = publish_full(store, full_snapshot(n_items=20_000))
    port = _free_port()
    proc = _serve_process(
        cfg,
        port,
        1,
        TWOTOWER_RETRIEVER__INDEX_HUGE_PAGES=str(huge_pages).lower(),
        TWOTOWER_RETRIEVER__RETAIN_FREED_MEMORY=str(retain).lower(),
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            wait_for(lambda: _answers(port), "the retriever to answer", deadline_s=90.0)
            wait_version(client, version)
            assert client.get("/recommend", params={"user_id": "u0"}).status_code == 200
            (huge,) = _metric(client.get("/metrics").text, "twotower_retriever_huge_page_bytes")
            assert (huge > 0) is huge_pages, huge
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    # uvicorn re-raises the SIGTERM it handled once it has shut down
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
    # the same process (exec keeps the pid) started again with the tunables, and logged them
    (line,) = [json.loads(line) for line in output.splitlines() if '"glibc_tunables"' in line]
    tunables = {"GLIBC_TUNABLES": line["glibc_tunables"]}
    assert malloc.active(malloc.HUGE_PAGES, tunables) is huge_pages, line
    assert malloc.active(malloc.RETAIN_FREED, tunables) is retain, line


def test_serve_gives_the_request_and_watcher_threads_the_configured_time_slice(
    cfg: Config, store: SnapshotStore
) -> None:
    if thread_slice_us() is None:
        pytest.skip("the kernel sets no per-thread time slice (Linux 6.12 and later)")
    version = publish_full(store, full_snapshot())
    port = _free_port()
    # one worker: uvicorn runs the event loop on the main thread of the serving process
    proc = _serve_process(cfg, port, 1, TWOTOWER_RETRIEVER__REQUEST_SLICE_US="300")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            wait_for(lambda: _answers(port), "the retriever to answer", deadline_s=90.0)
            wait_version(client, version)
            others = {int(tid): thread_slice_us(int(tid)) for tid in os.listdir(f"/proc/{proc.pid}/task")}
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert others.pop(proc.pid) == 300, output  # the request thread
    assert 300 in others.values(), others  # the threads it starts afterwards: the snapshot watcher
    assert "request thread's time slice: 300" in output, output


def test_serve_command_with_two_workers(cfg: Config, store: SnapshotStore) -> None:
    version = publish_full(store, full_snapshot())
    port = _free_port()
    proc = _serve_process(cfg, port, 2)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:

            def ready() -> bool:
                try:
                    response = client.get("/ready")
                except httpx.TransportError:
                    return False
                return response.status_code == 200 and response.json()["version"] == version

            def served_by_pid() -> dict[str, float]:
                text = client.get("/metrics").text
                return {
                    sample.labels["pid"]: sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "twotower_retriever_snapshot_version"
                }

            def both_workers_ready() -> bool:
                served = served_by_pid()
                return len(served) == 2 and all(v == version for v in served.values())

            wait_for(ready, "the served retriever to be ready", deadline_s=90.0)
            # /ready is answered by whichever worker takes the connection: each worker loads the
            # snapshot on its own, so wait until both serve it (their per-pid gauges) before
            # asking fresh connections, which may land on either
            wait_for(both_workers_ready, "both workers to serve the version", deadline_s=90.0)
            for _ in range(10):  # several connections: both workers answer
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as fresh:
                    response = fresh.get("/recommend", params={"user_id": "u0"})
                    assert response.status_code == 200, response.text
            wait_for(lambda: "twotower_retriever_requests_total" in client.get("/metrics").text, "metrics")
            text = client.get("/metrics").text
            assert 'twotower_retriever_requests_total{status="200"}' in text
            assert "twotower_retriever_snapshot_version{pid=" in text  # multiprocess mode

            # a worker that dies is replaced (connections it held are lost with it), and its
            # gauges leave the metrics (it never ran its own shutdown)
            killed = next(iter(served_by_pid()))
            os.kill(int(killed), signal.SIGKILL)

            def replaced() -> bool:
                try:
                    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as fresh:
                        text = fresh.get("/metrics").text
                except httpx.TransportError:
                    return False
                served = {
                    sample.labels["pid"]: sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "twotower_retriever_snapshot_version"
                }
                return len(served) == 2 and killed not in served and all(v == version for v in served.values())

            wait_for(replaced, "a replacement worker serving the version", deadline_s=90.0)
            for _ in range(10):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as fresh:
                    response = fresh.get("/recommend", params={"user_id": "u0"})
                    assert response.status_code == 200, response.text
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0, output
        assert '"level": "info"' in output or '"level": "warning"' in output  # JSON logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_redis_failure_on_the_request_path_is_a_503(cfg: Config, store: SnapshotStore) -> None:
    version = publish_full(store, full_snapshot())
    with serve(cfg) as (client, app):
        wait_version(client, version)
        service = app.state.service
        working = service.redis
        # nobody listens there
        service.redis = RespClient(port=_free_port(), timeout_s=0.5)
        try:
            response = client.get("/recommend", params={"user_id": "u0"})
            assert response.status_code == 503 and "redis unavailable" in response.json()["detail"]
        finally:
            service.redis = working
        assert client.get("/recommend", params={"user_id": "u0"}).status_code == 200


def test_worker_sockets_share_a_port_only_with_reuse_port() -> None:
    if not reuse_port_available():
        pytest.skip("SO_REUSEPORT balancing is Linux-only")
    port = _free_port()
    first, second = bound_socket("127.0.0.1", port), bound_socket("127.0.0.1", port)
    try:
        assert first.getsockname()[1] == second.getsockname()[1] == port
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # a socket without SO_REUSEPORT cannot join them
    finally:
        first.close()
        second.close()


def test_a_second_retriever_on_a_served_port_refuses_to_start() -> None:
    """With SO_REUSEPORT a second retriever of the same user could bind beside a running one
    and take a share of its connections."""
    if not reuse_port_available():
        pytest.skip("SO_REUSEPORT balancing is Linux-only")
    port = _free_port()
    running = bound_socket("127.0.0.1", port)
    running.listen()
    try:
        assert serving_already("127.0.0.1", port) and serving_already("0.0.0.0", port)
        with pytest.raises(OSError, match="already served"):
            run_workers("0.0.0.0", port, 1, {}, port_wait_s=0.5)
    finally:
        running.close()
    assert not serving_already("127.0.0.1", port)


def test_workers_stop_when_their_supervisor_is_killed(cfg: Config) -> None:
    if not reuse_port_available():
        pytest.skip("the per-worker sockets are Linux-only")
    port = _free_port()
    proc = _serve_process(cfg, port, 2, output=subprocess.DEVNULL)  # nobody reads its output

    def workers() -> list[int]:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        found = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        return [pid for pid in found if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]

    try:
        pids = wait_for(lambda: len(w := workers()) == 2 and w, "two worker processes", deadline_s=60.0)
        wait_for(lambda: _answers(port), "the workers to answer", deadline_s=60.0)
    finally:
        proc.kill()  # no chance to stop them
        proc.wait()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), "the orphaned workers to stop", 30.0)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False
