"""Several retriever worker processes on one port, each with a listening socket of its own.

uvicorn's ``--workers`` gives every worker the same listening socket, and the worker that wakes
first accepts every pending connection: a client's few keep-alive connections can all land on
one worker and leave the other cores idle. Measured at 1M items (5 s wrk runs, 8 fresh
connections each): in 2 runs of 8 one worker did nothing, 504 to 544 QPS against 1,028 to 1,338 in the
others. Here each worker binds its own socket with ``SO_REUSEPORT``, and the kernel spreads new
connections over the sockets by a hash of each connection.

The parent only supervises: it passes SIGTERM or SIGINT on (each worker finishes its in-flight
requests, as a single uvicorn server does) and starts a worker again when one dies. A worker
whose supervisor is gone (even killed with SIGKILL) stops by itself within a second.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import uvicorn
from prometheus_client import multiprocess

log = logging.getLogger(__name__)

BACKLOG = 2048
STOP_TIMEOUT_S = 30.0
"""How long a worker may take to finish its requests after SIGTERM before it is killed."""
RESTART_DELAY_S = 1.0
"""Least time between two starts of the same worker slot (a worker that cannot start is not
restarted in a tight loop)."""
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set, the workers' metrics are shared through files there (prometheus_client multiprocess mode)."""
PORT_WAIT_S = 15.0
"""How long a starting retriever waits for another server on its port to stop before giving up."""


def reuse_port_available() -> bool:
    """Whether ``SO_REUSEPORT`` balances connections here (Linux; other systems lack it or only
    let the last socket bound receive them)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` with ``SO_REUSEPORT``, not listening yet: uvicorn
    listens on it once the app has started (so the kernel sends no connection to a worker still
    loading its first snapshot, ``retriever.startup_wait_s``).

    Raises:
        OSError: the address cannot be bound (in use by a socket without ``SO_REUSEPORT``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def forget_metrics(pid: int | None) -> None:
    """Drop a worker's live gauges from the shared metrics (multiprocess mode): a worker that
    crashed never ran its own shutdown, and its last snapshot version, say, stayed exported."""
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


def _exit_with(parent: int) -> None:
    """Stop this worker (gracefully) once its supervisor is gone, even if it was killed."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker(host: str, port: int, options: dict[str, Any]) -> None:
    """A worker process: its own socket, one uvicorn server (which handles SIGTERM gracefully)."""
    threading.Thread(target=_exit_with, args=(os.getppid(),), name="supervisor-watch", daemon=True).start()
    sock = bound_socket(host, port)
    uvicorn.Server(uvicorn.Config(host=host, port=port, backlog=BACKLOG, **options)).run(sockets=[sock])


def serving_already(host: str, port: int) -> bool:
    """Whether a server accepts connections on ``(host, port)`` (a wildcard host: on loopback)."""
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def run_workers(host: str, port: int, workers: int, options: dict[str, Any], port_wait_s: float = PORT_WAIT_S) -> None:
    """Run ``workers`` processes serving ``options`` (``uvicorn.Config`` keyword arguments, the
    app given as an import string) on ``(host, port)`` until SIGTERM or SIGINT.

    Raises:
        OSError: the address cannot be bound with ``SO_REUSEPORT``, or another server still
            accepts connections there after ``port_wait_s`` (checked before any worker starts).
    """
    bound_socket(host, port).close()  # a clear error here rather than workers dying in a loop
    # SO_REUSEPORT lets a second retriever of the same user bind beside a running one and take
    # a share of its connections: refuse instead (waiting a little for one that is stopping)
    deadline = time.monotonic() + port_wait_s
    while serving_already(host, port):
        if time.monotonic() >= deadline:
            raise OSError(errno.EADDRINUSE, f"{host}:{port} is already served by another process")
        time.sleep(0.5)
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def start() -> tuple[multiprocessing.process.BaseProcess, float]:
        process = context.Process(target=_worker, args=(host, port, options), name="retriever-worker")
        process.start()
        return process, time.monotonic()

    def on_signal(*_: object) -> None:  # set from a thread: the main thread may hold the event's lock
        threading.Thread(target=stopping.set, name="stop-signal", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    slots = [start() for _ in range(workers)]
    log.info("retriever workers %s, one SO_REUSEPORT socket each", [p.pid for p, _ in slots])
    try:
        while not stopping.is_set():
            for i, (process, started) in enumerate(slots):
                if not process.is_alive() and time.monotonic() - started >= RESTART_DELAY_S:
                    log.warning("retriever worker %d exited (code %s): starting another", process.pid, process.exitcode)
                    forget_metrics(process.pid)
                    slots[i] = start()
            stopping.wait(0.2)
    finally:
        for process, _ in slots:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process, _ in slots:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("retriever worker %d did not stop within %.0f s: killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.join()
            forget_metrics(process.pid)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
