"""An open-loop (fixed-rate) HTTP load generator for ``bench retriever --open-rate``.

The closed-loop generators (wrk, the Python fallback) keep ``concurrency`` requests in flight
and send the next one as soon as one returns: they measure the most the server can answer,
and their latencies are mostly queueing behind those ``concurrency`` requests. This one sends
requests on a fixed schedule (``rate`` per second, evenly spaced) whatever the answers do, as
independent users would, so its latencies say what a request costs at that offered load.

Each request's latency runs from its **scheduled** send time, not from when a connection was
free to send it: a server that falls behind shows up as growing latencies (no coordinated
omission); the same percentiles from the actual send time are given beside them (waits for
a free connection, and for a core to run the generator on, are the difference). The schedule
is kept by a ``timerfd`` (:mod:`bench.deadline_timer`): the loop's own timers end a wait up to
about a millisecond late (uvloop's, below a millisecond, early, so the generator spun), which
counted in every latency. Requests go out over up to ``max_connections`` keep-alive
connections, opened as needed; a request for which no connection is free waits (and that wait
counts). ``late`` counts requests sent more than 1 ms after their scheduled time. A request
that gets no answer (a connection refused or closed, no answer within 2 s, or still unanswered
when the drain ends) counts as infinitely slow in the percentiles, so a p99 that reaches the
failures is ``inf`` (``None`` in a report), not a figure of the answered requests alone.

It runs in its own (spawned) process with an asyncio loop (uvloop when installed), so its
CPU is counted with the load generator's, beside wrk's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

from bench.common import FAILED, LOAD_STARTED, rounded, spawned_result, wrk_latencies
from bench.deadline_timer import DeadlineTimer

LATE_S = 0.001
"""A request sent later than this after its scheduled time counts as late."""
DRAIN_S = 30.0
"""After the schedule ends, how long the requests still queued or in flight may take."""
SLOW_S = 0.02
"""A request slower than this (from its scheduled time) is listed with its send time, so that a
report can set the slow ones beside what happened then (a swap, a worker's log line)."""
MAX_SLOW = 1_000
"""At most this many slow requests are listed (the first ones)."""


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def _drive(
    host: str,
    port: int,
    rate: float,
    duration_s: float,
    users: int,
    k: int,
    seed: int,
    max_connections: int,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    rnd = random.Random(seed)
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    service: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    slow: list[tuple[float, float, float]] = []
    unix_offset = time.time() - time.perf_counter()
    late = 0
    last_sent = 0.0
    idle = 0  # connections waiting for work
    workers: list[asyncio.Task[None]] = []

    async def connection() -> None:
        nonlocal idle, late, last_sent
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while True:
            idle += 1
            scheduled = await due.get()
            idle -= 1
            if scheduled is None:
                break
            if reader is None or writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError:
                    errors["connect"] += 1
                    continue
            sent = last_sent = time.perf_counter()
            if sent - scheduled > LATE_S:
                late += 1
            path = f"/recommend?user_id=u{rnd.randrange(users)}&k={k}"
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                status = await asyncio.wait_for(_read_response(reader), timeout=2.0)
            except TimeoutError:
                errors["timeout"] += 1
                writer.close()
                reader = writer = None
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                errors["read"] += 1
                writer.close()
                reader = writer = None
                continue
            done = time.perf_counter()
            latencies.append((done - scheduled) * 1e6)
            service.append((done - sent) * 1e6)
            if done - scheduled > SLOW_S and len(slow) < MAX_SLOW:
                at = round(unix_offset + scheduled, 4)
                slow.append((at, round((done - scheduled) * 1e3, 2), round((done - sent) * 1e3, 2)))
            if status != 200:
                errors["status"] += 1
        if writer is not None:
            writer.close()

    interval = 1.0 / rate
    timer = DeadlineTimer(asyncio.get_running_loop())
    started = time.perf_counter()
    if on_start is not None:  # the schedule's time zero
        on_start()
    n = 0
    while True:
        now = time.perf_counter()
        next_at = started + n * interval
        if next_at >= started + duration_s:
            break
        if next_at > now:
            await timer.sleep_until(next_at)
            continue
        while n * interval + started <= now and n * interval < duration_s:
            if idle == 0 and len(workers) < max_connections:
                workers.append(asyncio.create_task(connection()))
            due.put_nowait(started + n * interval)
            n += 1
    timer_kind = timer.kind
    timer.close()
    for _ in workers:
        due.put_nowait(None)
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=DRAIN_S)
    except TimeoutError:  # a server far behind its schedule: what is still unanswered timed out
        unanswered = n - len(latencies) - sum(v for key, v in errors.items() if key != "status")
        errors["timeout"] += unanswered  # (answers with another status are in latencies too)
    elapsed = time.perf_counter() - started
    # the schedule's span, or up to the last send when requests waited for a connection past it
    send_window = max(n * interval, last_sent - started)
    failed = sum(errors[key] for key in FAILED)  # infinitely slow in the percentiles
    from_send = wrk_latencies(service, failed)
    return {
        "requests": len(latencies),
        "scheduled": n,
        "offered_rate": rate,
        "late": late,
        "timer": timer_kind,
        "connections": len(workers),
        "duration_us": int(elapsed * 1e6),
        "send_window_us": int(send_window * 1e6),
        "bytes": 0,
        **errors,
        **wrk_latencies(latencies, failed),
        "from_send_p50_us": from_send["p50_us"],
        "from_send_p99_us": from_send["p99_us"],
        "slow": slow,
    }


def sending_figures(result: Mapping[str, Any]) -> dict[str, Any]:
    """What a report gives of a :func:`run_open_loop` result's sending: latency percentiles in ms
    from each request's actual send (``None`` where one reached a failed request), the sends over
    :data:`LATE_S` late, and the timer that kept the schedule
    (:attr:`~bench.deadline_timer.DeadlineTimer.kind`)."""
    return {
        "from_send_p50_ms": rounded(result["from_send_p50_us"] / 1000),
        "from_send_p99_ms": rounded(result["from_send_p99_us"] / 1000),
        "late_sends": result["late"],
        "generator_timer": result["timer"],
    }


def _worker(
    base_url: str, rate: float, duration_s: float, users: int, k: int, seed: int, max_connections: int, out: Any
) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio: more CPU per request, same schedule
        pass
    parsed = urlparse(base_url)
    assert parsed.hostname is not None and parsed.port is not None

    def started() -> None:
        out.put((LOAD_STARTED, time.monotonic()))

    host, port = parsed.hostname, parsed.port
    out.put(asyncio.run(_drive(host, port, rate, duration_s, users, k, seed, max_connections, started)))


def run_open_loop(
    base_url: str,
    rate: float,
    duration_s: float,
    users: int,
    k: int,
    seed: int,
    max_connections: int = 64,
    on_start: Callable[[float], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """``rate`` GET /recommend per second for ``duration_s`` from a spawned process (``on_start``
    is called with the ``time.monotonic()`` of its schedule's start as it begins, ``on_end`` as
    its result arrives: :func:`bench.common.spawned_result`); wrk-like
    figures (latencies in microseconds from each request's scheduled time, ``inf`` where they
    reach the requests that got no answer) plus ``scheduled``,
    ``offered_rate``, ``late``, ``connections`` and ``slow``: (Unix time of the scheduled send,
    latency ms, latency from the actual send ms) of the requests over :data:`SLOW_S`.
    ``duration_us`` runs to the last answer (the drain included), ``send_window_us`` over the
    sending only: the schedule's span, or to the last send when one was later (the achieved
    rate is over that)."""
    if rate <= 0:
        raise ValueError("the open-loop rate must be positive")
    return spawned_result(
        _worker,
        (base_url, rate, duration_s, users, k, seed, max_connections),
        duration_s + 90,
        "the open-loop load generator",
        on_start,
        on_end,
    )


__all__ = ["run_open_loop", "sending_figures"]
