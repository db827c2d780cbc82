"""``twotower serve``: run the retriever's HTTP API under uvicorn."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import typer
import uvicorn

from retriever import malloc
from retriever.workers import MULTIPROC_ENV, reuse_port_available, run_workers
from twotower.config import load_config
from twotower.daemon import setup_logging

log = logging.getLogger(__name__)


def clear_metrics_dir(path: Path) -> int:
    """Delete the metric files an earlier run left in a multiprocess directory you gave
    (``PROMETHEUS_MULTIPROC_DIR``; prometheus_client needs it empty at start, or the counters of
    earlier runs add to this one's); how many there were."""
    stale = list(path.glob("*.db"))
    for file in stale:
        file.unlink(missing_ok=True)
    return len(stale)


def serve_command(
    host: str | None = typer.Option(None, help="Bind address (default: retriever.host)."),
    port: int | None = typer.Option(None, help="Port (default: retriever.port)."),
    workers: int | None = typer.Option(None, min=1, help="Worker processes (default: retriever.workers)."),
) -> None:
    """Serve recommendations over HTTP: GET/POST /recommend, /health, /ready, /metrics.

    Each worker process loads the current snapshot from Redis and follows new versions (pub/sub notices plus a 1 s poll), swapping without dropping a request.

    SIGTERM stops gracefully: in-flight requests finish.
    """  # noqa: E501 (typer shows docstring lines as they are)
    cfg = load_config()
    malloc.reexec_with(malloc.wanted(cfg.retriever))  # glibc reads its tunables at process start only
    setup_logging(cfg.observability, "retriever")
    host = cfg.retriever.host if host is None else host
    port = cfg.retriever.port if port is None else port
    workers = cfg.retriever.workers if workers is None else workers
    own_dir = None
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        # several processes: metrics must be aggregated through files (prometheus_client
        # multiprocess mode); the workers inherit the variable
        own_dir = tempfile.mkdtemp(prefix="twotower-retriever-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    elif workers > 1:
        cleared = clear_metrics_dir(Path(os.environ[MULTIPROC_ENV]))
        if cleared:
            log.info("removed %d metric files of an earlier run from %s", cleared, os.environ[MULTIPROC_ENV])
    tunables = os.environ.get(malloc.ENV, "")
    log.info(
        "retriever serving on http://%s:%d with %d worker(s), GLIBC_TUNABLES=%s",
        host,
        port,
        workers,
        tunables,
        extra={"glibc_tunables": tunables},
    )
    options = {
        "app": "retriever.app:app_from_env",
        "factory": True,
        "log_level": "warning",
        "log_config": None,  # keep the JSON logging set up above (and in each worker)
        "access_log": False,
        # no per-response Date/Server headers, no X-Forwarded-* rewriting: the retriever sits
        # behind nothing that needs them, and each costs every request some CPU
        "server_header": False,
        "date_header": False,
        "proxy_headers": False,
    }
    try:
        if workers > 1 and port != 0 and reuse_port_available():
            # a socket per worker: connections spread over the workers (retriever.workers)
            run_workers(host, port, workers, options)
        else:
            uvicorn.run(host=host, port=port, workers=workers, **options)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
