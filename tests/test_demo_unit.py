"""The demo's cleanup: what it started, it stops, however it ends (no services)."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from twotower import demo, infra


@pytest.mark.parametrize(("running_before", "stopped"), [((), ["kafka", "redis"]), (("kafka",), ["redis"])])
def test_a_demo_that_fails_to_start_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, running_before: tuple[str, ...], stopped: list[str]
) -> None:
    downs: list[list[str]] = []

    def up(*args: object, **kwargs: object) -> None:
        raise infra.InfraError("redis: port taken")  # Kafka started, Redis did not

    states = {name: SimpleNamespace(running=name in running_before) for name in infra.SERVICES}
    monkeypatch.setattr(infra, "status", lambda _dir: states)
    monkeypatch.setattr(infra, "up", up)
    monkeypatch.setattr(infra, "down", lambda _dir, services: downs.append(list(services)))
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    code, summary = demo.run_demo(1.0, None, tmp_path, Console(quiet=True))
    assert (code, summary) == (1, {"ok": False, "error": "redis: port taken"})  # one line, not a traceback
    assert downs == [stopped]
    assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_the_demo_runs_its_cleanup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: signal.Signals
) -> None:
    """A timeout's SIGTERM, or a closed terminal's SIGHUP (which left all five daemons running,
    the simulator still producing)."""
    downs: list[list[str]] = []

    def up(*args: object, **kwargs: object) -> None:
        signal.raise_signal(signum)  # while the services start
        raise AssertionError("not reached")

    monkeypatch.setattr(infra, "status", lambda _dir: {n: SimpleNamespace(running=False) for n in infra.SERVICES})
    monkeypatch.setattr(infra, "up", up)
    monkeypatch.setattr(infra, "down", lambda _dir, services: downs.append(list(services)))
    with pytest.raises(SystemExit) as exited:
        demo.run_demo(1.0, None, tmp_path, Console(quiet=True))
    assert exited.value.code == 128 + signum and downs == [["kafka", "redis"]]
