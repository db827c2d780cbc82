"""The request path's Redis client: one multiplexed connection per worker, replies matched in order.

A request reads Redis once (its history and profile) and, on item-details cache misses, once
more. ``redis.asyncio`` spends more Python per round trip than the reads themselves take
(a pipeline object, a connection checked out of and back into a pool, a retry wrapper, command
packing and reply parsing in Python): ~10 % of a worker's CPU at 1M items. Redis answers the
commands of one connection in the order it received them, so every request of a worker can
share one connection: :class:`RespClient` writes a request's commands at once (packed by hiredis)
and queues one waiter per batch; the connection's protocol feeds what arrives to a hiredis
reader and hands the replies, in order, to the oldest waiter. No task, lock or pool per request.

Failures (mapped by the caller to 503, as before): a connection that cannot be made or is lost
fails the requests waiting on it with :class:`redis.ConnectionError` (the next request
reconnects; a batch sent on a connection found broken while writing is retried once, the
request path only reads); no complete answer within ``timeout_s`` is a
:class:`redis.TimeoutError`, and closes the connection (later replies could no longer be matched
to their requests), failing the other requests waiting on it too; an error reply is a
:class:`redis.ResponseError`.

With a :class:`~retriever.tracked_cache.TrackedCache`, the connection speaks RESP3 and turns
Redis's key tracking on (``HELLO 3``, ``CLIENT TRACKING ON``): reads sent with ``cached=True``
are answered from the cache while Redis has not reported their key changed; the invalidation
push messages arrive on the same connection, in order with the replies, and are applied as they
are parsed (the module docstring of :mod:`retriever.tracked_cache` says why that leaves no
window for a stale reply). The cache is cleared whenever a tracking connection ends. A server
that refuses ``HELLO 3`` (Redis before 6) is read uncached. RESP3 changes the reply type of
some commands (a hash as a dict, for one); the request path reads lists, strings and HMGET
arrays, which are the same in both.

URLs: ``redis://`` and ``unix://`` with user, password and db. Anything else (``rediss://``,
connection options in the query string) is served by :class:`RedisPyExecutor`, a thin wrapper
around a ``redis.asyncio`` pipeline with the same interface (:func:`request_client` chooses).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import hiredis
import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url

from retriever.tracked_cache import MISSING, TrackedCache

log = logging.getLogger(__name__)

Command = Sequence[bytes | str | int | float]
Fill = tuple[int, bytes, bytes]
"""(index of a reply in its batch, the key it read, the packed command): a reply to keep."""


class RequestRedis(Protocol):
    """What the request path needs of Redis: a batch of read commands in, their replies out."""

    async def execute(self, commands: Sequence[Command], cached: bool = False) -> list[Any]: ...

    async def aclose(self) -> None: ...


def _key(command: Command) -> bytes:
    key = command[1]
    return key if isinstance(key, bytes) else str(key).encode()


class _Waiter:
    __slots__ = ("fills", "future", "remaining", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], n: int, fills: Sequence[Fill]) -> None:
        self.future = future
        self.remaining = n
        self.replies: list[Any] = []
        self.fills = {index: (key, packed) for index, key, packed in fills}
        """By reply index: the key and packed command of each reply to keep."""


class _Connection(asyncio.Protocol):
    """One Redis connection: batches go out in order, replies come back in the same order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(protocolError=redis.InvalidResponse, replyError=redis.ResponseError)
        self.waiters: deque[_Waiter] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.cache: TrackedCache | None = None
        """Set once Redis tracks the keys this connection reads."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = reader.gets()
            except redis.InvalidResponse as exc:
                self.fail(redis.ConnectionError(f"redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if isinstance(reply, hiredis.PushNotification):  # RESP3 out-of-band: not a reply
                if self.cache is not None and len(reply) >= 2 and reply[0] == b"invalidate":
                    self.cache.invalidate(reply[1])
                continue
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self.fail(redis.ConnectionError("unexpected reply from redis"))
                return
            waiter = waiters[0]
            if waiter.fills and self.cache is not None:
                # kept now, as it is parsed: an invalidation Redis sends after this reply (a
                # write that followed the read, even one arriving before the batch's next reply)
                # is parsed after it and drops it
                fill = waiter.fills.get(len(waiter.replies))
                if fill is not None and not isinstance(reply, redis.ResponseError):
                    self.cache.put(fill[0], fill[1], reply)
            waiter.replies.append(reply)
            waiter.remaining -= 1
            if waiter.remaining == 0:
                waiters.popleft()
                if not waiter.future.done():  # a timed-out waiter is already failed
                    waiter.future.set_result(waiter.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.ConnectionError(f"connection to redis lost: {exc or 'closed by the server'}"))

    def fail(self, exc: Exception) -> None:
        """Close the connection and fail every waiting request with ``exc``; forget what it cached
        (the invalidations it would have received are lost with it)."""
        self.closed = True
        if self.cache is not None:
            self.cache.clear()
            self.cache = None
        if self.transport is not None:
            self.transport.close()
        while self.waiters:
            future = self.waiters.popleft().future
            if not future.done():
                future.set_exception(exc)

    def send(
        self, payload: bytes, n: int, loop: asyncio.AbstractEventLoop, fills: Sequence[Fill] = ()
    ) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = loop.create_future()
        self.waiters.append(_Waiter(future, n, fills))
        assert self.transport is not None
        self.transport.write(payload)
        return future


async def _setup(conn: _Connection, commands: Sequence[Command], loop: asyncio.AbstractEventLoop) -> list[Any]:
    """Send a new connection's setup commands; their replies (errors included). A connection
    that fails meanwhile is closed."""
    try:
        return await conn.send(b"".join(hiredis.pack_command(tuple(c)) for c in commands), len(commands), loop)
    except BaseException:
        conn.fail(redis.ConnectionError("connection setup failed"))
        raise


class RespClient:
    """A multiplexed asyncio Redis client for read commands (see the module docstring).

    Use it from one event loop at a time (it reconnects when called from another one).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        path: str | None = None,
        timeout_s: float = 2.0,
        cache: TrackedCache | None = None,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.db, self.username, self.password = db, username, password
        self.timeout_s = timeout_s
        self.cache = cache
        self._conn: _Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    @classmethod
    def from_url(cls, url: str, timeout_s: float = 2.0, cache: TrackedCache | None = None) -> RespClient:
        """Raises: ValueError: a URL this client does not handle (TLS, connection options)."""
        kwargs = parse_url(url)
        connection_class = kwargs.pop("connection_class", None)
        if connection_class not in (None, UnixDomainSocketConnection):
            raise ValueError(f"{url.split('://', 1)[0]}:// is not handled by RespClient")
        unknown = set(kwargs) - {"host", "port", "db", "username", "password", "path"}
        if unknown:
            raise ValueError(f"connection options {sorted(unknown)} are not handled by RespClient")
        return cls(timeout_s=timeout_s, cache=cache, **kwargs)  # type: ignore[arg-type]

    async def execute(self, commands: Sequence[Command], cached: bool = False) -> list[Any]:
        """Send ``commands`` at once; their replies in order.

        With ``cached`` (read commands whose key is their first argument), replies the cache
        holds are not asked for again, and those fetched are kept; the replies are then shared
        with the cache and must not be modified.

        Raises:
            redis.ConnectionError: Redis unreachable, or the connection was lost meanwhile.
            redis.TimeoutError: no complete answer within ``timeout_s``.
            redis.ResponseError: Redis answered a command with an error.
        """
        loop = asyncio.get_running_loop()
        conn = self._conn
        if cached and conn is not None and conn.cache is not None and self._loop is loop:  # a closed one has none
            return await self._execute_cached(commands, conn.cache, loop)
        payload = b"".join(hiredis.pack_command(tuple(command)) for command in commands)
        return await self._send(payload, len(commands), loop, ())

    async def _execute_cached(
        self, commands: Sequence[Command], cache: TrackedCache, loop: asyncio.AbstractEventLoop
    ) -> list[Any]:
        packed = [hiredis.pack_command(tuple(command)) for command in commands]
        keys = [_key(command) for command in commands]
        replies = [cache.get(key, one) for key, one in zip(keys, packed, strict=True)]
        missing = [i for i, reply in enumerate(replies) if reply is MISSING]
        if not missing:
            return replies
        fills = [(j, keys[i], packed[i]) for j, i in enumerate(missing)]
        fetched = await self._send(b"".join(packed[i] for i in missing), len(missing), loop, fills)
        for j, i in enumerate(missing):
            replies[i] = fetched[j]
        return replies

    async def _send(self, payload: bytes, n: int, loop: asyncio.AbstractEventLoop, fills: Sequence[Fill]) -> list[Any]:
        conn = await self._ready(loop)
        if conn.transport is None or conn.transport.is_closing():  # broken meanwhile: reconnect once
            conn.fail(redis.ConnectionError("connection to redis closed"))
            conn = await self._ready(loop)
            if conn.transport is None or conn.transport.is_closing():
                raise redis.ConnectionError("connection to redis closed")
        future = conn.send(payload, n, loop, fills)
        timer = loop.call_later(self.timeout_s, self._time_out, conn, future)
        try:
            replies = await future
        finally:
            timer.cancel()
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return replies

    async def _ready(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        conn = self._conn
        if conn is None or conn.closed or self._loop is not loop:
            conn = await self._connect(loop)
        return conn

    def _time_out(self, conn: _Connection, future: asyncio.Future[list[Any]]) -> None:
        if not future.done():
            future.set_exception(redis.TimeoutError(f"no answer from redis within {self.timeout_s} s"))
            conn.fail(redis.ConnectionError("an earlier request on this connection timed out"))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        if self._connecting is not None and self._loop is loop and not self._connecting.done():
            return await asyncio.shield(self._connecting)  # another request is connecting already
        if self._conn is not None and self._loop is not loop and not self._conn.closed:
            self._conn.fail(redis.ConnectionError("the event loop changed"))  # pragma: no cover
        self._loop = loop
        self._connecting = loop.create_future()
        try:
            conn = await asyncio.wait_for(self._open(loop), self.timeout_s)
        except TimeoutError:
            exc: Exception = redis.TimeoutError(f"connecting to redis took over {self.timeout_s} s")
            self._connecting.set_exception(exc)
            self._connecting.exception()  # retrieved: no "never retrieved" warning without waiters
            raise exc from None
        except (OSError, redis.RedisError) as error:
            exc = error if isinstance(error, redis.RedisError) else redis.ConnectionError(str(error))
            self._connecting.set_exception(exc)
            self._connecting.exception()
            raise exc from None
        self._conn = conn
        self._connecting.set_result(conn)
        return conn

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        if self.path:
            _, conn = await loop.create_unix_connection(_Connection, self.path)
        else:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        setup: list[Command] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        if setup:
            for reply in await _setup(conn, setup, loop):
                if isinstance(reply, redis.ResponseError):
                    conn.fail(redis.ConnectionError(f"connection setup failed: {reply}"))
                    raise redis.ConnectionError(f"redis refused the connection setup: {reply}")
        if self.cache is not None:
            await self._track(conn, loop, self.cache)
        return conn

    async def _track(self, conn: _Connection, loop: asyncio.AbstractEventLoop, cache: TrackedCache) -> None:
        """Switch ``conn`` to RESP3 and key tracking; leave it uncached if Redis refuses. The
        cache holds nothing of an earlier connection: :meth:`_Connection.fail` cleared it."""
        for command in (("HELLO", 3), ("CLIENT", "TRACKING", "ON")):
            (reply,) = await _setup(conn, [command], loop)
            if isinstance(reply, redis.ResponseError):  # the connection stays usable, uncached
                log.warning("redis refused %s (%s): the request path reads uncached", command[0], reply)
                return
        conn.cache = cache

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.fail(redis.ConnectionError("client closed"))
            self._conn = None


class RedisPyExecutor:
    """The same interface over a ``redis.asyncio`` client (URLs :class:`RespClient` does not
    handle); it caches nothing."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def execute(self, commands: Sequence[Command], cached: bool = False) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()

    async def aclose(self) -> None:
        await self.client.aclose()


def request_client(url: str, timeout_s: float, cache: TrackedCache | None = None) -> RequestRedis:
    """:class:`RespClient` for ``url`` when it handles it (with ``cache``), else
    :class:`RedisPyExecutor`."""
    try:
        return RespClient.from_url(url, timeout_s, cache)
    except ValueError:
        client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return RedisPyExecutor(client)
