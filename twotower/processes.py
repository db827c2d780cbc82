"""Daemons run as ``twotower`` subprocesses: what the demo and the benchmarks start and stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


@dataclass
class DaemonProcess:
    """One ``twotower`` subcommand run as a subprocess in its own session, logging to a file."""

    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: Mapping[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as fh:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "twotower.cli", *self.args],
                env=dict(env),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        log.info("started %s (pid %d): twotower %s", self.name, self.process.pid, " ".join(self.args))

    @property
    def pid(self) -> int:
        """The daemon's pid (also its session id)."""
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        """Raises RuntimeError with the log's tail if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.process.returncode}; log tail:\n{tail(self.log_path)}"
            )

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL its process group (only this daemon's own session)."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing its process group", self.name, timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # workers of a multi-process server live in the same session: make sure none is left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode


def wait_healthy(daemons: Sequence[tuple[DaemonProcess, str]], timeout_s: float, ready: bool = False) -> None:
    """Wait until each daemon's health URL answers (any status: the process serves), or fail.

    With ``ready``, wait for a 200 (the daemon has started and is doing its job).

    Raises:
        RuntimeError: a daemon exited, or did not answer within ``timeout_s`` (all together).
    """
    deadline = time.monotonic() + timeout_s
    for daemon, url in daemons:
        while True:
            if not daemon.alive():
                raise RuntimeError(f"{daemon.name} exited during startup; see {daemon.log_path}")
            try:
                response = httpx.get(url, timeout=1.0)
                if not ready or response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{daemon.name} was not {'ready' if ready else 'up'} within {timeout_s:.0f} s")
            time.sleep(0.5)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
