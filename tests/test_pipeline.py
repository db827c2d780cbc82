"""The whole pipeline on the real broker and Redis: producer → Kafka → trainer → publisher → Redis → retriever.

The trainer and publisher run as daemons on threads of this process (their lifecycle is the
same as under ``run_daemon``, minus signal handling); the retriever is the real FastAPI app.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from publisher.daemon import PublisherDaemon
from retriever.app import create_app
from trainer.stream import StreamTrainer
from twotower.config import Config
from twotower.daemon import Daemon
from twotower.events import CatalogItem, Interaction
from twotower.kafka_io import ensure_topics, make_producer, send_record

pytestmark = pytest.mark.integration

N_CATS = 4
PER_CAT = 12


def _content(cat: int, rng: np.random.Generator) -> list[float]:
    vec = np.zeros(8)
    vec[cat] = 1.0
    return (vec + 0.05 * rng.standard_normal(8)).tolist()


class _Running:
    """A daemon on a thread; stopped through its shutdown flag."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.daemon.startup()
            self.daemon.main_loop()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self.daemon.shutdown()

    def stop(self) -> None:
        self.daemon.shutdown_flag.set()
        self.thread.join(60)
        if self.error is not None:
            raise self.error


def _wait_for(check: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture
def system(config: Config) -> Iterator[tuple[Config, Callable, TestClient]]:
    cfg = config.with_overrides(
        {
            "trainer": {"checkpoint_interval_s": 0.5, "batch_size": 32, "max_batch_wait_ms": 50},
            "publisher": {"poll_interval_s": 0.2},
        }
    )
    topics = ensure_topics(cfg.kafka)
    producer = make_producer(cfg.kafka)
    rng = np.random.default_rng(0)
    clock = [1_700_000_000_000]

    def send(records: list) -> None:
        for record in records:
            topic = topics.catalog if isinstance(record, CatalogItem) else topics.events
            send_record(producer, topic, record).get(timeout=30)

    catalog = [
        CatalogItem(f"c{c}-i{i}", f"cat{c}", _content(c, rng), clock[0]) for c in range(N_CATS) for i in range(PER_CAT)
    ]
    send(catalog)
    # warm-up traffic: each user sticks to one category
    warm = []
    for k in range(400):
        user, cat = k % 20, (k % 20) % N_CATS
        clock[0] += 1_000
        item = f"c{cat}-i{int(rng.integers(PER_CAT))}"
        warm.append(Interaction(f"w{k}", f"w{k}", f"u{user}", item, "click", 0, clock[0]))
    send(warm)

    trainer = _Running(StreamTrainer(cfg))
    publisher = _Running(PublisherDaemon(cfg))
    trainer.thread.start()
    publisher.thread.start()
    try:
        with TestClient(create_app(cfg, watcher_poll_interval_s=0.2)) as client:
            _wait_for(lambda: client.get("/ready").status_code == 200, 90, "the first snapshot")
            yield cfg, send, client
    finally:
        producer.close()
        trainer.stop()
        publisher.stop()


def _recommend(client: TestClient, user: str, k: int = 10) -> list[str]:
    response = client.get("/recommend", params={"user_id": user, "k": k})
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


def test_a_produced_click_changes_what_the_retriever_returns(system) -> None:
    _, send, client = system
    user = "fresh-user"
    before = _recommend(client, user)  # no history, no row: a fallback vector
    cat = 3
    t = int(time.time() * 1000)
    clicks = [Interaction(f"f{i}", f"f{i}", user, f"c{cat}-i{i}", "click", 0, t + i) for i in range(3)]
    send(clicks)

    clicked = {c.item_id for c in clicks}

    def reflects_all_clicks() -> list[str] | None:
        after = _recommend(client, user)
        # every click is in the user's history once no clicked item is served any more
        return after if after != before and not clicked & set(after) else None

    after = _wait_for(reflects_all_clicks, 30, "the clicks to reach the retriever")
    share = np.mean([item.startswith(f"c{cat}-") for item in after])
    assert share >= 0.6, after  # the user's new interest dominates


def test_a_new_catalog_item_becomes_retrievable_for_a_user_of_its_category(system) -> None:
    _, send, client = system
    cat = 1
    user = "u1"  # warm-up users u1, u5, u9, ... stick to category 1
    rng = np.random.default_rng(7)
    new_item = CatalogItem("brand-new", f"cat{cat}", _content(cat, rng), int(time.time() * 1000))
    send([new_item])

    def found() -> bool:
        return "brand-new" in _recommend(client, user, k=PER_CAT)

    _wait_for(found, 30, "the new item in the user's top-K")
