"""The open-loop load generator against a small HTTP server in a thread (no retriever): what it counts and lists."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from bench.open_loop import _drive, _read_response


def _read(data: bytes) -> int:
    async def read() -> int:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        status = await _read_response(reader)
        assert await reader.read() == data[data.index(b"\r\n\r\n") + 4 + 5 :]  # the body, no more
        return status

    return asyncio.run(read())


def test_a_response_is_read_to_the_end_of_its_body() -> None:
    assert _read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhelloHTTP/1.1") == 200
    assert _read(b"HTTP/1.1 503 Busy\r\ncontent-length: 5\r\n\r\nbusy!") == 503
    with pytest.raises(asyncio.IncompleteReadError):
        _read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")


def _drive_now(port: int, rate: float, duration_s: float, users: int, max_connections: int) -> dict:
    return asyncio.run(_drive("127.0.0.1", port, rate, duration_s, users, 10, 1, max_connections))


class _Handler(BaseHTTPRequestHandler):
    """Answers /recommend: user u0 after 60 ms, u1 with 503, u2 by closing the connection."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the head and the body are two writes

    def do_GET(self) -> None:  # the name http.server calls
        user = parse_qs(urlparse(self.path).query)["user_id"][0]
        if user == "u2":
            self.close_connection = True
            return
        if user == "u0":
            time.sleep(0.06)
        body = b'{"items":[]}'
        self.send_response(503 if user == "u1" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_every_scheduled_request_is_answered_or_counted(server: int) -> None:
    result = _drive_now(server, rate=100.0, duration_s=1.0, users=4, max_connections=8)
    errors = sum(result[key] for key in ("connect", "read", "write", "timeout"))
    assert result["scheduled"] == 100
    assert result["requests"] + errors == 100
    assert result["timer"] == ("timerfd" if sys.platform == "linux" else "loop")  # the schedule's timer
    assert result["read"] > 0  # u2's: the server closed the connection without answering
    assert result["status"] > 0  # u1's 503s are answered, and counted
    assert 1 < result["connections"] <= 8  # the most open at once: a closed one is replaced
    # u0's answers take 60 ms: each is listed as slow, with its time of sending
    assert result["slow"] and all(latency >= 60 and from_send >= 60 for _, latency, from_send in result["slow"])
    started = time.time() - 5
    assert all(started < at < time.time() for at, _, _ in result["slow"])
    assert result["p99_us"] >= 60_000 and 0 < result["p50_us"] <= result["p99_us"]


def test_a_request_with_no_free_connection_waits_and_the_wait_counts(server: int) -> None:
    # one connection and u0 everywhere would need 60 ms per request: at 50/s the queue grows
    result = _drive_now(server, rate=50.0, duration_s=0.5, users=1, max_connections=1)
    assert result["requests"] == result["scheduled"] == 25 and result["connections"] == 1
    assert result["late"] > 0
    assert result["max_us"] > 800_000  # the last one waited for nearly all before it (25 x 60 ms, sent over 0.5 s)
    assert result["from_send_p99_us"] < result["p99_us"]
