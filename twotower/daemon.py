"""What every long-running process shares: structured logs, signals, health and metrics.

A daemon is written as ``startup`` → ``main_loop`` → ``shutdown`` around a
:class:`ShutdownFlag`; :func:`run_daemon` wires signals (SIGTERM and SIGINT stop it
gracefully, a second one forces exit) and the ``/metrics`` + ``/health`` endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from twotower.config import ObservabilityConfig

log = logging.getLogger(__name__)
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(cfg: ObservabilityConfig, process: str) -> None:
    """Configure the root logger once per process (stderr; JSON or text)."""
    handler = logging.StreamHandler(sys.stderr)
    if cfg.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.log_level.upper())
    for noisy in ("kafka", "urllib3", "httpx", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ShutdownFlag:
    """Set once a stop is asked for; loops poll :meth:`is_set` or sleep with :meth:`wait`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was asked for meanwhile."""
        return self._event.wait(seconds)


def install_signal_handlers(flag: ShutdownFlag) -> None:
    """First SIGTERM/SIGINT sets ``flag``; a second one exits at once.

    The signals are counted here, not read off the flag: a daemon sets its own flag when a loop
    fails, and the supervisor's one SIGTERM must still get a clean shutdown. The flag is set from
    a thread of its own: the handler runs on the main thread, which may hold the flag's lock
    (inside ``wait``) at that moment, and setting it there would deadlock."""
    received = 0

    def handler(signum: int, _frame: Any) -> None:
        nonlocal received
        received += 1
        if received > 1:
            log.warning("second signal %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        threading.Thread(target=flag.set, name="shutdown-signal", daemon=True).start()

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, handler)


class _Handler(BaseHTTPRequestHandler):
    health: Callable[[], dict[str, Any]] = staticmethod(lambda: {"status": "ok"})

    def do_GET(self) -> None:
        if self.path == "/metrics":
            body, ctype, code = generate_latest(), CONTENT_TYPE_LATEST, 200
        elif self.path == "/health":
            status = type(self).health()
            code = 200 if status.get("status") == "ok" else 503
            body, ctype = json.dumps(status).encode(), "application/json"
        else:
            body, ctype, code = b'{"detail": "not found"}', "application/json", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood the logs


def serve_metrics(port: int, health: Callable[[], dict[str, Any]], host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve ``/metrics`` (Prometheus) and ``/health`` (JSON) on a daemon thread."""
    handler = type("Handler", (_Handler,), {"health": staticmethod(health)})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics and health on http://%s:%d", host, server.server_address[1])
    return server


class Daemon:
    """Base of a long-running process: subclasses fill in the three phases.

    ``health()`` is what ``/health`` answers; it should say ``status: ok`` only when the
    daemon is doing its job: the base answers ``starting`` until :meth:`startup` returned
    (the endpoint is up before, so a supervisor sees a slow start) and ``stopping`` after.
    """

    name = "daemon"

    def __init__(self) -> None:
        self.shutdown_flag = ShutdownFlag()
        self.started_at = time.time()
        self.phase = "starting"
        """``starting``, ``running`` or ``stopping`` (set by :func:`run_daemon`)."""

    def startup(self) -> None:
        """Connect and load state; raise to refuse to start."""

    def main_loop(self) -> None:
        """Work until :attr:`shutdown_flag` is set."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Flush, checkpoint and close; called once, also after a failed main loop."""

    def health(self) -> dict[str, Any]:
        status = "ok" if self.phase == "running" else self.phase
        return {"status": status, "daemon": self.name, "uptime_s": round(time.time() - self.started_at, 1)}


def run_daemon(daemon: Daemon, obs: ObservabilityConfig) -> int:
    """Run a daemon's lifecycle with signal handling and a metrics endpoint; returns an exit code."""
    setup_logging(obs, daemon.name)
    install_signal_handlers(daemon.shutdown_flag)
    server = serve_metrics(obs.metrics_port, daemon.health) if obs.metrics_port else None
    code = 0
    try:
        daemon.startup()
        daemon.phase = "running"
        log.info("%s started", daemon.name)
        daemon.main_loop()
    except Exception:
        log.exception("%s failed", daemon.name)
        code = 1
    finally:
        daemon.phase = "stopping"
        try:
            daemon.shutdown()
        finally:
            if server is not None:
                server.shutdown()
    log.info("%s stopped", daemon.name, extra={"exit_code": code})
    return code
