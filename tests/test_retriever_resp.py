"""The request path's multiplexed Redis client (retriever.resp) against a real Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator

import hiredis
import msgpack
import pytest
import redis

from retriever.resp import RedisPyExecutor, RespClient, _Connection, request_client
from retriever.tracked_cache import MISSING, TrackedCache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keys(redis_url: str) -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(redis_url)
    prefix = f"resp-test-{uuid.uuid4().hex[:8]}:"
    yield client, prefix
    client.delete(
        *[f"{prefix}{kind}{i}" for kind in "hp" for i in range(50)], *[f"{prefix}{k}" for k in ("item", "s", "k")]
    )
    client.close()


def test_replies_equal_redis_py_and_come_back_to_their_request(redis_url: str, keys) -> None:
    sync, prefix = keys
    for i in range(50):
        sync.rpush(f"{prefix}h{i}", *[msgpack.packb([f"i{j}", j]) for j in range(1 + i % 7)])
        sync.set(f"{prefix}p{i}", msgpack.packb([float(i)]))
    sync.hset(f"{prefix}item", mapping={"category": "c1", "title": "t"})

    def commands(i: int) -> list[tuple]:
        return [("LRANGE", f"{prefix}h{i}", 0, 99), ("GET", f"{prefix}p{i}"), ("GET", f"{prefix}missing")]

    async def main() -> list[list]:
        client = RespClient.from_url(redis_url)
        try:
            details = await client.execute([("HMGET", f"{prefix}item", "category", "title"), ("HMGET", "none", "a")])
            assert details == [[b"c1", b"t"], [None]]
            # many requests in flight on the one connection at once
            return await asyncio.gather(*(client.execute(commands(i)) for i in range(50)))
        finally:
            await client.aclose()

    got = asyncio.run(main())
    for i, replies in enumerate(got):
        pipe = sync.pipeline(transaction=False)
        for command in commands(i):
            pipe.execute_command(*command)
        assert replies == pipe.execute()


def test_an_error_reply_raises_and_the_connection_stays_usable(redis_url: str, keys) -> None:
    sync, prefix = keys
    sync.set(f"{prefix}s", b"x")

    async def main() -> None:
        client = RespClient.from_url(redis_url)
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await client.execute([("LRANGE", f"{prefix}s", 0, 1), ("GET", f"{prefix}s")])
        assert await client.execute([("GET", f"{prefix}s")]) == [b"x"]
        await client.aclose()

    asyncio.run(main())


def test_unreachable_redis_is_a_connection_error_and_a_lost_connection_reconnects(redis_url: str, keys) -> None:
    sync, prefix = keys
    sync.set(f"{prefix}k", b"v")

    async def main() -> None:
        nobody = RespClient(port=_free_port(), timeout_s=0.5)
        with pytest.raises(redis.ConnectionError):
            await nobody.execute([("GET", "x")])
        client = RespClient.from_url(redis_url)
        name = f"resp-test-{uuid.uuid4().hex[:6]}"
        assert await client.execute([("CLIENT", "SETNAME", name)]) == [b"OK"]
        killed = [c for c in sync.client_list() if c.get("name") == name]
        assert len(killed) == 1
        sync.execute_command("CLIENT", "KILL", "ID", killed[0]["id"])
        await asyncio.sleep(0.2)  # the loss reaches the protocol
        assert await client.execute([("GET", f"{prefix}k")]) == [b"v"]  # on a new connection
        await client.aclose()

    asyncio.run(main())


def test_no_answer_is_a_timeout_for_every_waiting_request() -> None:
    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # reads nothing, answers nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = RespClient(port=port, timeout_s=0.3)
        results = await asyncio.gather(
            client.execute([("GET", "a")]), client.execute([("GET", "b")]), return_exceptions=True
        )
        assert any(isinstance(r, redis.TimeoutError) for r in results)
        assert all(isinstance(r, redis.RedisError) for r in results)
        server.close()
        for writer in accepted:
            writer.close()
        await client.aclose()

    asyncio.run(main())


def test_an_invalidation_between_two_replies_of_a_batch_drops_the_first() -> None:
    """Redis ran the batch's first read, another client then wrote its key, and the invalidation
    came before the batch's second reply: the first reply must not stay cached (it was kept only
    once the whole batch had arrived, after the invalidation had found nothing to drop)."""

    class Transport:
        def write(self, _data: bytes) -> None:
            pass

        def close(self) -> None:
            pass

    async def main() -> None:
        cache = TrackedCache(1 << 20, 60.0)
        conn = _Connection()
        conn.connection_made(Transport())  # type: ignore[arg-type]
        conn.cache = cache
        history = hiredis.pack_command(("LRANGE", "h:u1", 0, 99))
        profile = hiredis.pack_command(("GET", "p:u1"))
        fills = [(0, b"h:u1", history), (1, b"p:u1", profile)]
        batch = conn.send(history + profile, 2, asyncio.get_running_loop(), fills)
        conn.data_received(b"*1\r\n$3\r\nold\r\n")  # LRANGE's reply
        conn.data_received(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$4\r\nh:u1\r\n")  # h:u1 written since
        conn.data_received(b"$-1\r\n")  # GET's reply
        assert await batch == [[b"old"], None]
        assert cache.get(b"h:u1", history) is MISSING
        assert cache.get(b"p:u1", profile) is None  # kept: no invalidation followed it

    asyncio.run(main())


def _base_url(redis_url: str) -> str:
    """``redis_url`` without its database number: append ``/<db>`` to pick one."""
    return redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url


@pytest.fixture
def empty_db(redis_url: str) -> str:
    """The URL of a database of the session's Redis that holds no keys (the highest such), for a
    test that flushes it: never the database the other tests use. Only a Redis the session started
    itself: on a given ``REDIS_URL`` (a developer's, another session's) a database empty now may
    not stay so, and a flush tells every tracking client of that server to drop its cache."""
    if os.environ.get("REDIS_URL"):
        pytest.skip("REDIS_URL is set: this test flushes a database, which only the session's own Redis may have")
    probe = redis.Redis.from_url(redis_url)
    try:
        count = int(probe.config_get("databases")["databases"])
        taken = {int(name[2:]) for name in probe.info("keyspace")}  # db<N> of the databases with keys
        taken.add(int(probe.connection_pool.connection_kwargs.get("db", 0)))
    finally:
        probe.close()
    free = [db for db in range(count - 1, 0, -1) if db not in taken]
    if not free:
        pytest.skip("every database of this Redis holds keys: none to flush")
    return f"{_base_url(redis_url)}/{free[0]}"


def test_the_url_selects_the_database(redis_url: str) -> None:
    base = _base_url(redis_url)
    sync = redis.Redis.from_url(f"{base}/3")
    key = f"resp-test-db-{uuid.uuid4().hex[:8]}"
    sync.set(key, b"in db 3")
    try:

        async def main() -> tuple[list, list]:
            in3, in0 = RespClient.from_url(f"{base}/3"), RespClient.from_url(f"{base}/0")
            try:
                return await in3.execute([("GET", key)]), await in0.execute([("GET", key)])
            finally:
                await in3.aclose()
                await in0.aclose()

        assert asyncio.run(main()) == ([b"in db 3"], [None])
    finally:
        sync.delete(key)
        sync.close()


def test_urls_it_does_not_handle_go_to_redis_py() -> None:
    assert isinstance(request_client("redis://127.0.0.1:6379/0", 2.0), RespClient)
    assert isinstance(request_client("unix:///tmp/redis.sock?db=1", 2.0), RespClient)
    assert isinstance(request_client("rediss://127.0.0.1:6379/0", 2.0), RedisPyExecutor)
    assert isinstance(request_client("redis://127.0.0.1:6379/0?socket_keepalive=true", 2.0), RedisPyExecutor)


def test_cached_reads_follow_redis_invalidations(empty_db: str) -> None:
    """With a TrackedCache, repeated reads cost no round trip until another client changes the
    key; a flush and a lost connection empty the cache. Another client's write is seen once its
    invalidation has reached this client (pushed, so within about a round trip), hence _until.
    It runs in a database of its own (``empty_db``), which it flushes."""
    sync = redis.Redis.from_url(empty_db)
    db = int(sync.connection_pool.connection_kwargs["db"])
    history, profile = "h0", "p0"
    sync.rpush(history, b"a")
    events: list[str] = []
    cache = TrackedCache(1 << 20, 60.0, note=events.append)
    reads = (("LRANGE", history, 0, 99), ("GET", profile))

    async def main() -> None:
        client = RespClient.from_url(empty_db, cache=cache)
        try:
            assert await client.execute(reads, cached=True) == [[b"a"], None]  # connects: nothing cached
            assert await client.execute(reads, cached=True) == [[b"a"], None]  # now kept
            before = events.count("hit")
            for _ in range(5):
                assert await client.execute(reads, cached=True) == [[b"a"], None]
            assert events.count("hit") - before == 10  # both keys, five times, no round trip
            calls = sync.info("commandstats")["cmdstat_lrange"]["calls"]
            await client.execute(reads, cached=True)
            assert sync.info("commandstats")["cmdstat_lrange"]["calls"] == calls

            sync.lpush(history, b"b")  # another client's write: Redis pushes an invalidation
            sync.set(profile, b"p")
            assert await _until(client, reads, [[b"b", b"a"], b"p"])
            assert events.count("invalidated") >= 1

            sync.execute_command("FLUSHDB")  # this test's database only; invalidates everything
            assert await _until(client, reads, [[], None])

            sync.rpush(history, b"c")
            assert await _until(client, reads, [[b"c"], None])
            own = [c for c in sync.client_list(_type="normal") if int(c.get("db", -1)) == db]
            tracked = [c for c in own if "t" in c.get("flags", "")]
            assert tracked, "the request connection tracks its keys"
            for entry in tracked:
                sync.client_kill_filter(_id=entry["id"])
            # the killed connection's cache is gone; the next reads reconnect and are right
            sync.rpush(history, b"d")
            assert await _until(client, reads, [[b"c", b"d"], None])
            assert "flushed" in events
        finally:
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        sync.delete(history, profile)
        sync.close()


async def _until(client: RespClient, reads: tuple, want: list, timeout_s: float = 5.0) -> bool:
    """Read until the replies equal ``want`` (an invalidation is pushed, not instant): True when
    they did within ``timeout_s``. Lost connections are retried, as the request path's caller would."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            if await client.execute(reads, cached=True) == want:
                return True
        except redis.ConnectionError:
            pass
        await asyncio.sleep(0.01)
    return False


def test_uncached_reads_on_a_tracking_connection_are_not_kept(redis_url: str, keys) -> None:
    sync, prefix = keys
    sync.set(f"{prefix}k", b"1")
    events: list[str] = []

    async def main() -> None:
        client = RespClient.from_url(redis_url, cache=TrackedCache(1 << 20, 60.0, note=events.append))
        try:
            for _ in range(3):
                assert await client.execute([("GET", f"{prefix}k")]) == [b"1"]
        finally:
            await client.aclose()

    asyncio.run(main())
    assert events == []
