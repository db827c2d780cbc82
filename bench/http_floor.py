"""The HTTP floor of ``bench retriever --open-rate``: what a server that does nothing costs here.

A retriever request's latency is its compute (the in-process floor: user tower + Faiss search)
plus everything around it: the load generator, the loopback network stack, waking the server
process, uvicorn's HTTP parsing, and the scheduling of all of these on the machine's cores.
This measures the second part alone: :data:`app` answers every request at once with a fixed body
the size of a ten-item recommendation, served by uvicorn with the retriever's options (one
process, uvloop, httptools, no Date/Server headers, no access log), and driven by the same
open-loop generator at the same rates. Its percentiles are the lowest the retriever could
show on this machine with this generator, whatever it computed.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import HOST, achieved_qps, cpu_jiffies, free_ports, latencies_ms, steal_pct, wait_until
from bench.open_loop import run_open_loop, sending_figures

log = logging.getLogger(__name__)

BODY = (
    b'{"user_id":"u1","version":1,"items":['
    + b",".join(b'{"item_id":"i%d","score":0.5,"category":"c%d"}' % (i, i % 7) for i in range(10))
    + b"]}"
)
"""About the size of the retriever's answer for k=10 (item ids, scores, categories)."""
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """An ASGI app that answers every HTTP request with :data:`BODY`."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def measure(
    rates: Sequence[float], duration_s: float, users: int, k: int, seed: int, log_path: Path
) -> list[dict[str, Any]]:
    """Run :data:`app` under uvicorn in a process of its own and drive it open-loop at each of
    ``rates`` for ``duration_s``: per rate, the achieved rate and latency percentiles in ms (from
    each request's scheduled time, and from its actual send)."""
    (port,) = free_ports(1)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        f"{__name__}:app",
        "--host",
        HOST,
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--log-level",
        "warning",
        "--no-access-log",
        "--no-server-header",
        "--no-date-header",
    ]
    out: list[dict[str, Any]] = []
    with open(log_path, "ab") as logfile:
        proc = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT)
        try:

            def answers() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"the HTTP floor server exited with {proc.returncode} (see {log_path})")
                try:
                    return httpx.get(f"http://{HOST}:{port}/", timeout=1.0).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(answers, 30.0, "the HTTP floor server to answer")
            for rate in rates:
                before = cpu_jiffies()
                result = run_open_loop(f"http://{HOST}:{port}", rate, duration_s, users, k, seed)
                out.append({**_summary(rate, result), "steal_pct": steal_pct(before, cpu_jiffies())})
                log.info("HTTP floor at %.0f/s: %s", rate, out[-1])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out


def _summary(rate: float, result: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "offered_qps": rate,
        "qps": achieved_qps(result),
        "errors": sum(result[key] for key in ("connect", "read", "write", "status", "timeout")),
        **latencies_ms(result),
        **sending_figures(result),
    }


__all__ = ["app", "measure"]
