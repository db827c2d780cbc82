"""What the bench measures and how it reports it: percentiles, failed requests, swap errors, timing.

The load paths run against :class:`FakeRetriever`, a small HTTP server in a thread (no retriever,
no Redis): it answers ``/recommend`` at once, or late as a test asks, and serves ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import multiprocessing.context
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.common import LOAD_STARTED, SystemOptions, latencies_ms, percentile, provenance, wrk_latencies
from bench.http_floor import _summary
from bench.open_loop import _drive
from bench.retriever import (
    RetrieverBenchOptions,
    SwapPublisher,
    _closed_loop_phase,
    _http_report,
    _load,
    _open_loop_phase,
    _probe_phase,
    _python_load_worker,
    _run_errors,
    _targets,
    run_wrk,
    swap_times,
)
from twotower.config import ModelConfig


class FakeRetriever:
    """What the handler answers: ``/recommend`` at once, user ``u0`` after ``hang_s``, and every
    request that arrives within a stall (:meth:`stall`) when it ends; ``/metrics`` is ``metrics``.
    The arrival times (``time.monotonic()``) of the ``/recommend`` requests are kept."""

    def __init__(self) -> None:
        self.hang_s = 0.0
        self.drop = False
        """Close the connection on user ``u0``'s requests instead of answering."""
        self.metrics = ""
        self.arrivals: list[float] = []
        self.stalls: list[tuple[float, float]] = []
        self.version = 1
        self.swaps: dict[str, int] = {}

    def serve_version(self, version: int, kind: str, after_s: float) -> None:
        """Let its one worker serve ``version`` (a swap of ``kind``) ``after_s`` from now, as its
        metrics then say (``twotower_retriever_swaps_total``, ``..._snapshot_version``)."""

        def swap() -> None:
            self.swaps[kind] = self.swaps.get(kind, 0) + 1
            self.version = version

        threading.Timer(after_s, swap).start()

    def render_metrics(self) -> str:
        lines = ["# TYPE twotower_retriever_swaps_total counter"]
        lines += [f'twotower_retriever_swaps_total{{kind="{kind}"}} {n}' for kind, n in self.swaps.items()]
        lines += [
            "# TYPE twotower_retriever_snapshot_version gauge",
            f"twotower_retriever_snapshot_version {self.version}",
        ]
        return self.metrics + "\n".join(lines) + "\n"

    def stall(self, at: float, seconds: float) -> None:
        """Hold every request arriving between ``at`` (monotonic) and ``at + seconds`` until then."""
        self.stalls.append((at, at + seconds))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    fake: FakeRetriever

    def do_GET(self) -> None:  # the name http.server calls
        fake = self.server.fake  # type: ignore[attr-defined]
        url = urlparse(self.path)
        if url.path == "/metrics":
            body = fake.render_metrics().encode()
        else:
            now = time.monotonic()
            fake.arrivals.append(now)
            for start, end in fake.stalls:
                if start <= now < end:
                    time.sleep(end - now)
            if parse_qs(url.query).get("user_id") == ["u0"]:
                if fake.drop:
                    self.close_connection = True
                    return
                time.sleep(fake.hang_s)
            body = b'{"items":[]}'
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up on it (a timeout)
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[tuple[FakeRetriever, str]]:
    """A :class:`FakeRetriever` and its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.fake = FakeRetriever()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.fake, f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


class _Out:
    """A spawned load generator's result queue, for running its body in this process."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def put(self, item: Any) -> None:
        self.items.append(item)


class FakeStore:
    """A stand-in for :class:`twotower.snapshots.SnapshotStore` under a
    :class:`~bench.retriever.SwapPublisher`: versions numbered on from 2, or ``fail`` raised."""

    def __init__(self, fail: BaseException | None = None, write_s: float = 0.0, server: FakeRetriever | None = None):
        self.fail = fail
        self.write_s = write_s
        self.server = server
        """Made current, a version is served by this server's worker :attr:`reload_s` later."""
        self.reload_s = 0.0
        self.version = 1

    def write(self, kind: str, parts: Any, parent: int | None, trainer_seq: int, current: bool = True) -> int:
        time.sleep(self.write_s)
        if self.fail is not None:
            raise self.fail
        self.version += 1
        if current and self.server is not None:
            self.server.serve_version(self.version, kind, self.reload_s)
        return self.version

    def make_current(self, version: int) -> None:
        if self.fail is not None:
            raise self.fail

    def trim(self, keep_full: int) -> None:
        pass


class SpySwaps(SwapPublisher):
    """A :class:`~bench.retriever.SwapPublisher` that remembers the ``t0`` of each start (and
    calls ``on_start(t0)`` first, where given)."""

    def __init__(self, store: FakeStore, on_start: Callable[[float], None] | None = None) -> None:
        item_ids = [f"i{j}" for j in range(300)]
        super().__init__(store, {}, ModelConfig(), 20, item_ids, 1, 0, item_details=False)  # type: ignore[arg-type]
        self.t0s: list[float] = []
        self.on_start = on_start

    def start(self, plan: Any, times_s: list[float], t0: float) -> None:
        self.t0s.append(t0)
        if self.on_start is not None:
            self.on_start(t0)
        super().start(plan, times_s, t0)


@pytest.fixture
def spawns(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The ``time.monotonic()`` at which each spawned process (a load generator) was started: a
    load's time zero taken by the generator itself comes after it; one taken by the bench before
    the spawn (about a second early, the bug of 37db813) comes before it."""
    stamps: list[float] = []
    original = multiprocessing.context.SpawnProcess.start

    def start(self: multiprocessing.process.BaseProcess) -> None:
        stamps.append(time.monotonic())
        original(self)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start)
    return stamps


class FakeRedis:
    """What the bench asks Redis beside the load: its slow log and CPU."""

    def slowlog_get(self, n: int) -> list[Any]:
        return []

    def info(self, section: str) -> dict[str, float]:
        return {"used_cpu_user": 0.0, "used_cpu_sys": 0.0}


# --- percentiles ---------------------------------------------------------------------------------
def test_load_generator_percentiles_interpolate_like_every_other_percentile() -> None:
    samples = [float(x) for x in range(1, 101)]
    figures = wrk_latencies(samples[::-1])
    assert figures["p50_us"] == pytest.approx(50.5)  # not the 51st value
    for q in (50, 90, 99, 99.9):
        assert figures[f"p{str(q).replace('.', '')}_us"] == pytest.approx(percentile(samples, q))
    assert figures["max_us"] == 100.0 and figures["mean_us"] == pytest.approx(50.5)


# --- failed requests -----------------------------------------------------------------------------
def test_a_failed_request_counts_as_infinitely_slow() -> None:
    figures = wrk_latencies([float(x) for x in range(1, 99)], failed=2)  # 2 % without an answer
    assert figures["p50_us"] == pytest.approx(50.5) and math.isinf(figures["p99_us"])
    assert math.isinf(figures["max_us"]) and figures["mean_us"] == pytest.approx(49.5)  # of the answered
    in_ms = latencies_ms(figures)
    assert in_ms["p99_ms"] is None and in_ms["max_ms"] is None and in_ms["p50_ms"] == 0.051
    assert wrk_latencies([], failed=1)["p50_us"] == math.inf


def test_open_loop_timeouts_reach_the_percentiles(fake: tuple[FakeRetriever, str]) -> None:
    server, url = fake
    server.hang_s = 2.5  # past the generator's 2 s timeout
    port = int(url.rsplit(":", 1)[1])
    result = asyncio.run(_drive("127.0.0.1", port, 100.0, 1.0, 20, 10, 1, 16))  # about 5 % to u0
    assert 0 < result["timeout"] < 20 and result["requests"] + result["timeout"] == result["scheduled"]
    assert math.isfinite(result["p50_us"]) and math.isinf(result["p99_us"]) and math.isinf(result["max_us"])
    assert math.isinf(result["from_send_p99_us"])
    assert latencies_ms(result)["p99_ms"] is None


def test_python_load_generator_timeouts_reach_the_percentiles(fake: tuple[FakeRetriever, str]) -> None:
    server, url = fake
    server.hang_s = 2.5
    out = _Out()
    _python_load_worker(url, 0.5, 2, 2, 10, 0, out)  # half the requests to u0: each connection waits one out
    started, result = out.items
    assert started[0] == LOAD_STARTED
    assert result["timeout"] >= 1 and math.isinf(result["p99_us"]) and math.isinf(result["max_us"])


@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed")
def test_wrk_timeouts_reach_the_percentiles(fake: tuple[FakeRetriever, str], tmp_path: Path) -> None:
    server, url = fake
    server.hang_s = 2.2  # user u0's requests: answered within the run, after wrk's 2 s timeout
    result = run_wrk(url, 3.0, 2, 1, 2, 10, tmp_path)
    # each connection soon draws u0 and waits 2.2 s for it: a few answers, and 1-4 timeouts among
    # them (wrk's users are random: at times both connections draw u0 first, and then no other
    # request is answered)
    assert result["timeout"] >= 1 and result["requests"] >= result["timeout"]
    assert math.isinf(result["p99_us"]) and math.isinf(result["max_us"])


@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed")
def test_wrk_percentiles_without_failures_are_finite(fake: tuple[FakeRetriever, str], tmp_path: Path) -> None:
    result = run_wrk(fake[1], 1.0, 2, 1, 10, 10, tmp_path)
    assert result["timeout"] == 0 and result["requests"] > 100
    assert 0 < result["p50_us"] <= result["p90_us"] <= result["p99_us"] <= result["p999_us"] <= result["max_us"]


def test_a_p99_that_reached_a_failed_request_meets_no_target() -> None:
    run = {"p99_ms": None, "qps": 10.0, "errors": 1, "non_200": 0, "offered_qps": 10.0}
    targets = _targets({"http": dict(run), "floor": {"p99_ms": 1.0}, "open_loop": [dict(run)]})
    assert targets["p99_le_3ms"] is False and targets["p99_le_2x_floor"] is False
    assert targets["p99_over_floor_p99"] is None and targets["zero_errors"] is False
    assert targets["open_loop"][0]["p99_le_3ms"] is False and targets["open_loop"][0]["p99_over_floor_p99"] is None


# --- the swap probe ------------------------------------------------------------------------------
def test_the_swap_probe_counts_a_stall_in_every_request_it_delayed(
    fake: tuple[FakeRetriever, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.retriever

    # a request every 20 ms (not 5): the probe keeps its schedule on a busy machine too
    monkeypatch.setattr(bench.retriever, "PROBE_INTERVAL_S", 0.02)
    server, url = fake
    # the whole server stalls 300 ms (a GC, a swap, the host), 0.5 s into the probe's schedule:
    # from its t0 (the swaps' start), not from now, which the probe's setup may be past on a busy machine
    swaps = SpySwaps(FakeStore(), on_start=lambda t0: server.stall(t0 + 0.5, 0.3))
    opts = RetrieverBenchOptions(items=100, users=10, swaps=0, probe_s=2.0)
    report = _probe_phase(opts, url, swaps, FakeRedis())  # type: ignore[arg-type]
    assert report["requests"] == 100 and report["errors"] == 0
    # one request meets the stall and is held to its end: the next one is sent after it, so every
    # request due in its first ~270 ms (~13) is late from its schedule; from the send, that one
    # request was slow (and any other a busy machine delayed, far fewer than the stall delayed)
    assert report["from_schedule_over_30_ms"] >= 8 and report["from_schedule_over_100_ms"] >= 4
    assert report["from_schedule_max_ms"] >= 250 and report["max_ms"] >= 200
    assert 1 <= report["over_30_ms"] <= report["from_schedule_over_30_ms"] // 2
    # outside the stall the probe keeps its schedule (timed from t0, the median would be ~1 s)
    assert report["from_schedule_p50_ms"] < 100


def test_the_swap_probe_counts_a_request_without_an_answer_as_infinitely_slow(
    fake: tuple[FakeRetriever, str],
) -> None:
    server, url = fake
    server.drop = True  # about half the requests: the connection closes without an answer
    opts = RetrieverBenchOptions(items=100, users=2, swaps=0, probe_s=0.5)
    report = _probe_phase(opts, url, SpySwaps(FakeStore()), FakeRedis())  # type: ignore[arg-type]
    assert report["requests"] == 100 and 20 < report["errors"] < 80
    assert report["p99_ms"] is None and report["max_ms"] is None and report["over_100_ms"] >= report["errors"]
    assert report["from_schedule_p99_ms"] is None and report["from_schedule_over_100_ms"] >= report["errors"]


# --- swap errors ---------------------------------------------------------------------------------
def test_a_swap_run_stopped_by_its_join_stops_no_later_run() -> None:
    swaps = SpySwaps(FakeStore())
    swaps.start([("delta", 7)], [60.0], time.monotonic())
    swaps.join(0.05)  # still waiting for its time: stopped, and an error of that run
    assert swaps.errors() == [repr(swaps.error), "published 0 of 1 versions"]
    assert isinstance(swaps.error, TimeoutError)
    swaps.start([("delta", 8)], [0.0], time.monotonic())
    swaps.join(10)
    assert [r.version for r in swaps.records] == [8] and swaps.errors() == []


def test_a_failed_swap_is_an_error_of_its_run() -> None:
    swaps = SpySwaps(FakeStore(fail=RuntimeError("redis went away")))
    swaps.start([("delta", 7)], [0.0], time.monotonic())
    swaps.join(10)
    assert swaps.errors() == ["RuntimeError('redis went away')", "published 0 of 1 versions"]


def test_open_loop_reports_its_swap_errors(fake: tuple[FakeRetriever, str]) -> None:
    _, url = fake
    opts = RetrieverBenchOptions(items=300, users=20, swaps=2, swap_kinds="delta", duration_s=1.0)
    store = FakeStore(fail=RuntimeError("redis went away"))
    run = _open_loop_phase(opts, 50.0, url, os.getpid(), FakeRedis(), SpySwaps(store))  # type: ignore[arg-type]
    assert run["errors"] == 0 and run["swaps_published"] == 0
    assert run["swap_errors"] == ["RuntimeError('redis went away')", "published 0 of 2 versions"]


def _report(**changes: Any) -> dict[str, Any]:
    """A retriever report of a clean run (what _targets and _run_errors read), with ``changes``."""
    clean = {"errors": 0, "non_200": 0, "client_errors": {}, "p99_ms": 1.0, "qps": 100.0}
    report: dict[str, Any] = {
        "http": dict(clean),
        "floor": {"p99_ms": 1.0},
        "swaps": {"errors": []},
        "open_loop": [{**clean, "offered_qps": 50.0, "swap_errors": []}],
        "probe": {"errors": 0, "swap_errors": []},
        "http_floor": [{"offered_qps": 50.0, "errors": 0, "p99_ms": 0.5}],
    }
    for key, value in changes.items():
        report[key] = value
    return report


def test_swap_errors_fail_the_targets_and_the_run() -> None:
    assert _run_errors(_report()) == [] and _targets(_report())["zero_errors"] is True
    closed = _report(swaps={"errors": ["RuntimeError('x')"]})
    assert _targets(closed)["zero_errors"] is False and _run_errors(closed) == ["closed loop swaps: RuntimeError('x')"]
    opened = _report(open_loop=[{**_report()["open_loop"][0], "swap_errors": ["published 1 of 2 versions"]}])
    assert _targets(opened)["open_loop"][0]["zero_errors"] is False
    assert _run_errors(opened) == ["open loop at 50/s swaps: published 1 of 2 versions"]
    probe = _report(probe={"errors": 3, "swap_errors": []})
    assert _targets(probe)["probe"]["zero_errors"] is False and len(_run_errors(probe)) == 1
    floor = _report(http_floor=[{"offered_qps": 50.0, "errors": 2, "p99_ms": None}])
    assert _run_errors(floor) == ["HTTP floor at 50/s: 2 requests failed or were answered another status than 200"]


@pytest.mark.parametrize("errors", [[], ["closed loop swaps: RuntimeError('x')"]])
def test_the_retriever_bench_exits_1_on_an_error_of_the_run(monkeypatch: pytest.MonkeyPatch, errors: list[str]) -> None:
    import bench.retriever
    from retriever import malloc

    monkeypatch.setattr(malloc, "reexec_with", lambda tunables: None)
    monkeypatch.setattr(bench.retriever, "run", lambda opts: {"benchmark": "retriever", "run_errors": errors})
    result = CliRunner().invoke(app, ["retriever", "--items", "100"])
    assert result.exit_code == (1 if errors else 0), result.output


# --- the swaps' time zero ------------------------------------------------------------------------
def test_open_loop_swaps_start_with_the_load(fake: tuple[FakeRetriever, str], spawns: list[float]) -> None:
    server, url = fake
    # 3 s: the last swap is due at 2.4 s, so "published before the load ended" has 0.6 s of slack
    opts = RetrieverBenchOptions(items=300, users=20, swaps=2, swap_kinds="delta", duration_s=3.0)
    swaps = SpySwaps(FakeStore())
    run = _open_loop_phase(opts, 50.0, url, os.getpid(), FakeRedis(), swaps)  # type: ignore[arg-type]
    # the generator's process takes a second or so to start: the swaps' clock starts with its
    # schedule (the generator's stamp, after its process started), just before its first request
    ((spawned,), (t0,)) = spawns, swaps.t0s
    assert spawned < t0 <= server.arrivals[0] < t0 + 1.0
    assert run["swaps_published_after_load_end"] == [] and run["swap_errors"] == []
    at_s = [r["at_s"] for r in run["swap_schedule"]]
    due = swap_times(opts.swaps, opts.duration_s)  # 0.3 and 2.4 s
    assert len(at_s) == 2 and all(round(d, 3) <= at < d + 0.5 for at, d in zip(at_s, due, strict=True))


@pytest.mark.parametrize(
    "tool", ["python", pytest.param("wrk", marks=pytest.mark.skipif(not shutil.which("wrk"), reason="no wrk"))]
)
def test_closed_loop_reports_when_its_load_starts(
    fake: tuple[FakeRetriever, str], tmp_path: Path, tool: str, spawns: list[float]
) -> None:
    server, url = fake
    starts: list[float] = []
    opts = RetrieverBenchOptions(items=100, users=20, concurrency=1)
    result = _load(tool, opts, url, 1.0, tmp_path, starts.append)
    assert result["requests"] > 0 and len(starts) == 1
    # the load's time zero is just before its first request; the Python generator's is its own
    # stamp, after its process started (wrk is exec'd, not spawned, and starts within milliseconds)
    assert starts[0] <= server.arrivals[0] < starts[0] + 1.0
    assert all(spawned < starts[0] for spawned in spawns) and len(spawns) == (tool == "python")


# --- the closed loop's figures -------------------------------------------------------------------
def test_closed_loop_swap_figures_are_those_of_the_load(fake: tuple[FakeRetriever, str], tmp_path: Path) -> None:
    server, url = fake
    opts = RetrieverBenchOptions(
        items=300, users=20, swaps=2, swap_kinds="delta", duration_s=1.0, concurrency=1, workers=1
    )
    store = FakeStore(write_s=0.3, server=server)
    store.reload_s = 0.3  # published at 0.1 + 0.3 s (served at 0.7 s) and 0.8 + 0.3 s (at 1.4 s, after the load)
    swaps = SpySwaps(store)
    phase = _closed_loop_phase(opts, "python", url, tmp_path, swaps, 1, os.getpid(), FakeRedis())  # type: ignore[arg-type]
    figures = phase["swaps"]
    assert figures["published"] == 2 and figures["errors"] == [] and figures["workers_on_last_version"]
    assert figures["applied_by_all_workers"] == 1  # the one reloaded during the load
    assert figures["published_after_load_end"] == [3]
    settled = figures["by_end_of_settling"]
    assert settled["applied_by_all_workers"] == 2 and settled["at_s"] >= 1.4
    assert phase["http"]["requests"] > 0 and phase["http"]["errors"] == 0


# --- provenance ----------------------------------------------------------------------------------
def _git(checkout: Path, *args: str) -> str:
    command = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not shutil.which("git"), reason="git not installed")
def test_provenance_names_the_commit_and_whether_the_tree_differs(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "a")
    clean = provenance(tmp_path)
    assert clean["git_commit"] == _git(tmp_path, "rev-parse", "HEAD").strip() and clean["git_dirty"] is False
    started = datetime.fromisoformat(clean["started_utc"])
    assert started.tzinfo is not None and abs((datetime.now(UTC) - started).total_seconds()) < 60
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance(tmp_path)["git_dirty"] is True
    assert provenance(tmp_path / "a.py")["git_commit"] is None  # not a checkout (git cannot run there)
    not_git = tmp_path / "elsewhere"
    not_git.mkdir()
    (not_git / ".git").write_text("gitdir: /nonexistent\n")  # inside tmp_path's checkout, but broken
    assert provenance(not_git)["git_commit"] is None and provenance(not_git)["git_dirty"] is None


def test_every_bench_report_carries_its_provenance(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import bench.common
    from bench.checkpoint import run as checkpoint_run

    here = provenance()
    del here["started_utc"]
    report = checkpoint_run(users=5, items=5, repeat=1, state_dir=tmp_path)
    assert report["provenance"].items() >= here.items() and report["provenance"]["started_utc"]

    class System:
        def describe(self) -> dict[str, Any]:
            return {}

    @contextlib.contextmanager
    def live_system(opts: SystemOptions, keep_logs: Path | None = None) -> Iterator[System]:
        yield System()

    monkeypatch.setattr(bench.common, "live_system", live_system)
    report = bench.common.run_on_live_system("cold-item", SystemOptions(), lambda system: {"items": 0})
    assert report["provenance"].items() >= here.items()  # this checkout's (None outside a git checkout)


def test_a_load_generator_that_dies_is_reported_at_once_not_at_the_timeout() -> None:
    from bench.common import spawned_result

    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited \(code 1\) without a result"):
        spawned_result(math.sqrt, (), 120.0, "the generator")  # sqrt(queue): a TypeError in the child
    assert time.monotonic() - started < 30


# --- achieved rates ------------------------------------------------------------------------------
def test_open_loop_rate_is_over_its_sending_not_its_drain(fake: tuple[FakeRetriever, str]) -> None:
    server, url = fake
    server.hang_s = 1.0  # half the requests: the last answers come a second after the last send
    port = int(url.rsplit(":", 1)[1])
    result = asyncio.run(_drive("127.0.0.1", port, 50.0, 0.5, 2, 10, 1, 32))
    assert result["requests"] == 25 and result["duration_us"] > 1_300_000
    assert 500_000 <= result["send_window_us"] < 600_000
    http = _http_report(result, [], [], RetrieverBenchOptions(), "open-loop")
    assert http["qps"] == pytest.approx(50, rel=0.1) and http["send_window_s"] == 0.5
    assert _summary(50.0, result)["qps"] == pytest.approx(50, rel=0.1)  # the HTTP floor's
