"""Shared fixtures: one Kafka broker and one Redis server for the whole session.

The services start on first use (a run of unit tests alone starts nothing), on free ports,
with their state in a temporary directory, and stop when the session ends. With
``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` set, those services are used instead and nothing starts.

Tests of the real datasets read them in place under :data:`DATA_DIR` (fixture ``dataset``): a
test whose file is missing is skipped, or fails with ``REQUIRE_TEST_DATA=1`` (as in CI).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from twotower import infra
from twotower.config import Config

DATA_DIR = Path("/work/shared/data")
"""Where the real datasets are (MovieLens-100K, Ciao)."""
REQUIRE_DATA = "REQUIRE_TEST_DATA"
"""With this environment variable at ``1``, a missing dataset fails its test instead of skipping it."""


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """A SIGTERM (a CI timeout, a cancelled job) or SIGHUP (a closed terminal) ends the session
    as Ctrl-C does, through the fixtures' teardown: by default it ended pytest at once, and the
    session's Kafka and Redis, in sessions of their own, ran on."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of the session's Kafka broker."""
    state = tmp_path_factory.mktemp("kafka-infra")
    port, controller_port = infra.free_ports(2)
    try:
        yield infra.up(
            state, kafka_port=port, controller_port=controller_port, services=["kafka"], env=os.environ
        ).kafka_bootstrap
    finally:  # the broker runs in a session of its own: nothing else stops it
        infra.down(state)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's Redis server."""
    state = tmp_path_factory.mktemp("redis-infra")
    try:
        yield infra.up(state, redis_port=infra.free_ports(1)[0], services=["redis"], env=os.environ).redis_url
    finally:
        infra.down(state)


@pytest.fixture
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    """A configuration private to this test: own topic and key prefixes, own trainer state.

    Tests marked ``integration`` get the session's Kafka and Redis endpoints; other tests get
    the defaults and start no services.
    """
    tag = f"t{uuid.uuid4().hex[:12]}"
    kafka: dict[str, object] = {"topic_prefix": f"{tag}-"}
    redis: dict[str, object] = {"key_prefix": tag}
    if request.node.get_closest_marker("integration") is not None:
        kafka["bootstrap"] = request.getfixturevalue("kafka_bootstrap")
        redis["url"] = request.getfixturevalue("redis_url")
    return Config().with_overrides(
        {
            "kafka": kafka,
            "redis": redis,
            "trainer": {"state_dir": tmp_path / "trainer", "group_id": f"{tag}-trainer"},
            "publisher": {"group_id": f"{tag}-publisher"},
        }
    )


@pytest.fixture
def dataset() -> Callable[[str], Path]:
    """``dataset("ml-100k/u.data")``: the path of that file under :data:`DATA_DIR`. Missing, it
    skips the test, or fails it when ``REQUIRE_TEST_DATA=1``: a run that must cover the
    datasets does not pass by skipping them."""

    def path_of(relative: str) -> Path:
        path = DATA_DIR / relative
        if not path.exists():
            if os.environ.get(REQUIRE_DATA) == "1":
                pytest.fail(f"{path} is missing and {REQUIRE_DATA}=1")
            pytest.skip(f"{path} not available")
        return path

    return path_of
