"""Smoke runs of the benchmarks: tiny sizes, checking the report's fields and that its numbers
are sane (never how fast anything is: that is what the benchmarks themselves report)."""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from bench.cli import _parse_sets, app
from bench.common import (
    SystemOptions,
    live_system,
    percentile,
    redis_slow_commands,
    redis_slowlog_tip,
    summarize_s,
    write_report,
)
from bench.retriever import RetrieverBenchOptions, _changed_index, _changed_rows, swap_times
from publisher.index import build_index, deserialize, serialize
from retriever.parts import on_huge_page_tmpfs
from retriever.thread_sched import thread_slice_us
from twotower.blobs import Rows, pack_rows, unpack_rows
from twotower.config import load_config

TOOLS = ["python", pytest.param("wrk", marks=pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed"))]


# --- pure helpers --------------------------------------------------------------------------------
def test_percentile_interpolates_and_handles_timeouts() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    assert math.isinf(percentile([1.0, 2.0, math.inf], 99))


def test_summary_reports_timeouts_as_null_not_as_fast() -> None:
    summary = summarize_s([0.1, 0.2, math.inf])
    assert summary["n"] == 3 and summary["timeouts"] == 1
    assert summary["p50_s"] == 0.2
    assert summary["p95_s"] is None and summary["max_s"] is None
    assert summary["mean_s"] == pytest.approx(0.15)
    json.loads(write_report({"s": summary}, None))  # valid JSON, no NaN/Infinity


def test_swap_times_fall_inside_the_load() -> None:
    times = swap_times(10, 20.0)
    assert len(times) == 10 and times == sorted(times)
    assert times[0] >= 2.0 and times[-1] <= 16.0
    assert swap_times(0, 20.0) == []


@pytest.mark.parametrize(("kind", "storage"), [("flat", "float32"), ("hnsw", "float16"), ("hnsw", "float32")])
def test_a_fresh_full_part_is_a_valid_index_with_other_bytes(kind: str, storage: str) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    data = serialize(build_index(vectors, np.arange(500) * 3, kind, hnsw_storage=storage, recall_queries=0))
    changed = _changed_index(data, 7)
    assert len(changed) == len(data) and changed != data
    assert sum(a != b for a, b in zip(changed, data, strict=True)) == 1  # one byte, one bit of it
    before, after = deserialize(data), deserialize(changed)
    assert after.ntotal == before.ntotal == 500
    _, ids_before = before.search(vectors[:20], 5)
    _, ids_after = after.search(vectors[:20], 5)
    assert (ids_after[:, 0] == np.arange(20) * 3).all() and (ids_before[:, 0] == ids_after[:, 0]).all()
    assert _changed_index(data, 8) != changed  # each full version its own bytes


def test_a_fresh_rows_part_changes_one_value() -> None:
    rows = Rows([f"i{j}" for j in range(10)], np.ones((10, 4), dtype=np.float32))
    changed = unpack_rows(_changed_rows(pack_rows(rows), 13))
    assert changed.ids == rows.ids
    assert np.count_nonzero(changed.matrix != rows.matrix) == 1 and changed.matrix[3, 0] != 1.0


def test_an_index_without_flat_codes_cannot_be_changed() -> None:
    vectors = np.random.default_rng(0).standard_normal((2_000, 8)).astype(np.float32)
    data = serialize(build_index(vectors, np.arange(2_000), "ivf", nlist=8, recall_queries=0))
    with pytest.raises(ValueError, match="cannot change the codes"):
        _changed_index(data, 0)


def test_set_options_become_environment_variables() -> None:
    assert _parse_sets(["trainer.checkpoint_interval_s=1"]) == {"TWOTOWER_TRAINER__CHECKPOINT_INTERVAL_S": "1"}


def test_cli_lists_the_three_benchmarks() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("retriever", "freshness", "cold-item"):
        assert name in result.output


def test_checkpoint_bench_smoke(tmp_path: Path) -> None:
    from bench.checkpoint import run

    report = run(users=30, items=10, repeat=1, state_dir=tmp_path)
    assert report["history_entries"] == 30 * report["history_len"] and report["delta_users"] == 1
    assert report["file_bytes"] > 0 and set(report["median"]) == set(report["runs"])
    assert all(len(runs) == 1 and runs[0] >= 0 for runs in report["runs"].values())
    json.loads(write_report(report, None))
    assert list(tmp_path.iterdir()) == []  # the checkpoints went with their temporary directory


# --- live smoke runs -----------------------------------------------------------------------------
@pytest.mark.integration
def test_redis_slow_commands_are_counted_by_name(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"slow-{uuid.uuid4().hex}"
    tip = redis_slowlog_tip(client)
    threshold = client.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    client.config_set("slowlog-log-slower-than", 0)  # every command counts as slow
    try:
        client.set(key, "x")
        client.get(key)
        client.get(key)
        started = time.perf_counter()
        client.eval("local n = 0 for i = 1, 300000 do n = n + i end return 1", 0)  # some ms in Redis
        eval_ms = (time.perf_counter() - started) * 1000
    finally:
        client.config_set("slowlog-log-slower-than", threshold)
        client.delete(key)
        client.close()
    client = redis.Redis.from_url(redis_url)
    slow = redis_slow_commands(client, tip)
    client.close()
    assert slow["GET"]["count"] == 2 and slow["SET"]["count"] == 1  # only those after the tip
    # the longest in ms (Redis logs µs): what Redis took, within what the client waited for it
    assert slow["EVAL"]["count"] == 1 and 0 < slow["EVAL"]["max_ms"] <= eval_ms + 0.05


@pytest.mark.integration
@pytest.mark.parametrize("tool", TOOLS)
def test_retriever_bench_smoke(redis_url: str, tool: str, tmp_path: Path) -> None:
    from bench.retriever import run

    opts = RetrieverBenchOptions(
        items=2_000,
        users=200,
        duration_s=2.0,
        warmup_s=1.0,
        concurrency=2,
        workers=1,
        swaps=2,
        floor_requests=100,
        load_tool=tool,
        open_rates=(50.0,),
        open_swaps=True,
        prewrite_swaps=tool == "python",  # one run of each way to publish the swaps
        fresh_full_parts=tool == "python",  # and of full versions with item and index parts of their own
        probe_s=2.0,
    )
    report = run(opts, env={"REDIS_URL": redis_url})
    out = tmp_path / "retriever.json"
    write_report(report, out)
    report = json.loads(out.read_text())

    assert report["items"] == 2_000 and report["tool"] == tool
    assert set(report["provenance"]) == {"git_commit", "git_dirty", "started_utc"}  # the code measured
    setup = report["setup"]  # where the workers shared the parts, and whether they mapped the index
    assert setup["parts_dir"] is None or Path(setup["parts_dir"]).is_absolute()
    # the index is copied into each worker's huge pages (retriever.index_huge_pages) unless the
    # parts are shared on a huge-page tmpfs, where it is mapped from there
    huge_tmpfs = setup["parts_dir"] is not None and on_huge_page_tmpfs(Path(setup["parts_dir"]))
    assert setup["index_mapped"] is (huge_tmpfs or not load_config().retriever.index_huge_pages)
    # one worker: its request thread's slice as the kernel reports it (the configured 100 µs)
    assert setup["request_thread_slice_us"] == [None if thread_slice_us() is None else 100]
    assert report["index"]["kind"] == "flat" and report["index"]["recall_at_10"] == 1.0
    http = report["http"]
    for key in ("p50_ms", "p90_ms", "p99_ms", "qps", "requests", "errors", "non_200"):
        assert key in http
    assert http["requests"] > 0 and http["qps"] > 0
    assert 0 < http["p50_ms"] <= http["p90_ms"] <= http["p99_ms"]
    assert http["non_200"] == 0  # a swap must never fail a request
    floor = report["floor"]
    assert 0 < floor["p50_ms"] <= floor["p99_ms"]
    paced = report["floor_paced"]  # the same work with the thread idle between requests (open_rates)
    assert 0 < paced["p50_ms"] <= paced["p99_ms"] and paced["pause_ms"] == 20.0  # 1 worker at 50/s
    assert report["swaps"]["published"] == 2 and report["swaps"]["publish_error"] is None
    assert report["swaps"]["errors"] == [] and report["run_errors"] == []
    assert report["swaps_done"] >= 1  # during the load; and by the end of the wait for the last version:
    settled = report["swaps"]["by_end_of_settling"]
    assert settled["applied_by_all_workers"] >= report["swaps"]["applied_by_all_workers"] and settled["at_s"] > 0
    assert report["machine"]["nproc"] >= 1 and report["machine"]["cpu_model"]
    assert 0 <= report["cpu"]["steal_pct"] <= 100  # the host's share of this VM's CPU time
    assert set(report["targets"]) >= {"p99_le_3ms", "qps_ge_1500", "p99_le_2x_floor", "zero_errors", "open_loop"}
    (open_run,) = report["open_loop"]  # every scheduled request is answered or counted as an error
    assert open_run["offered_qps"] == 50.0 and open_run["scheduled"] == open_run["requests"] + open_run["errors"]
    assert open_run["requests"] > 0 and open_run["non_200"] == 0 and open_run["generator_timer"] in ("timerfd", "loop")
    assert 0 < open_run["p50_ms"] <= open_run["p99_ms"] and open_run["cpu"]["retriever_ms_per_request"] > 0
    # with --open-swaps the open loop ran under swaps too, and every worker applied some
    assert open_run["swaps_published"] == 2 and open_run["swaps_applied_by_all_workers"] >= 1
    assert [r["kind"] for r in open_run["swap_schedule"]] == ["delta", "full"]  # when each was published
    assert all(r["at_unix"] > 0 for r in open_run["swap_schedule"])
    (floor_run,) = report["http_floor"]  # the do-nothing server, same generator and rate
    assert floor_run["offered_qps"] == 50.0 and floor_run["errors"] == 0 and floor_run["qps"] > 0
    assert 0 < floor_run["p50_ms"] <= floor_run["p99_ms"]
    assert report["targets"]["open_loop"][0]["http_floor_p99_ms"] == floor_run["p99_ms"]
    probe = report["probe"]  # the swap probe: one connection while the versions are made current
    assert probe["requests"] > 0 and probe["errors"] == 0 and probe["swaps_published"] == 2
    assert 0 < probe["p50_ms"] <= probe["p99_ms"] <= probe["max_ms"]
    assert probe["requests"] >= probe["over_30_ms"] >= probe["over_100_ms"] >= 0
    assert probe["swaps_applied_by_all_workers"] >= 1
    assert http["server_timed"]["count"] == http["server_requests"]  # both counted by the front door
    # the worker's event-loop lag checks (every 50 ms) counted in every run of 2 s
    for run_report in (http, open_run, probe):
        lag = run_report["loop_lag"]
        assert lag["count"] >= 10 and lag["count"] >= lag["over_10_ms"] >= lag["over_100_ms"] >= 0
        timed = run_report["server_timed"]  # requests the retriever timed itself, over 1 to 10 ms
        over = [timed[key] for key in ("over_1_ms", "over_2_5_ms", "over_5_ms", "over_10_ms")]
        assert timed["count"] > 0 and [timed["count"], *over] == sorted([timed["count"], *over], reverse=True)
        cache = run_report["redis_cache"]  # the workers' cached user reads: most requests repeat a user
        assert set(cache) == {"hit", "miss", "invalidated", "evicted", "flushed"} and cache["hit"] > 0
        collections = run_report["gc"]  # the workers' garbage collections, by generation
        assert set(collections) == {"gen0", "gen1", "gen2"}
        assert all(g["collections"] >= g["over_10_ms"] >= 0 and g["seconds"] >= 0 for g in collections.values())
        # commands Redis logged as slow meanwhile, by name: often none at this size, so what an
        # entry holds is checked in test_redis_slow_commands_are_counted_by_name
        assert isinstance(run_report["redis_slow"], dict)


@pytest.mark.integration
def test_freshness_and_cold_item_smoke(kafka_bootstrap: str, redis_url: str) -> None:
    from bench import cold_item, freshness

    opts = SystemOptions(
        catalog=100,
        categories=5,
        users=6,
        warm_clicks=3,
        background_rate=5.0,
        background_users=10,
        # the harness is under test here, not the default latencies: checkpoint often, and let
        # streaming move item rows too (off by default) so the item-row probe has something to see
        env_overrides={"TWOTOWER_TRAINER__CHECKPOINT_INTERVAL_S": "1", "TWOTOWER_TRAINER__STREAM_ITEM_ROWS": "true"},
        ready_timeout_s=120.0,
    )
    with live_system(opts, env={"KAFKA_BOOTSTRAP": kafka_bootstrap, "REDIS_URL": redis_url}) as system:
        fresh = freshness.measure(system, clicks=2, timeout_s=60.0)
        cold = cold_item.measure(system, items=2, timeout_s=60.0)
        described = system.describe()

    assert fresh["clicks"] == 2
    for path in ("history_path", "parameter_path"):
        summary = fresh[path]
        assert summary["n"] == 2 and summary["timeouts"] == 0
        assert 0 < summary["p50_s"] <= summary["p95_s"] <= summary["max_s"]
        assert isinstance(summary["meets_target"], bool)
    for probe in fresh["probes"]:
        assert probe["params_version"] is not None and probe["item_row_in_same_version"] is True
        assert probe["history_s"] > 0 and probe["params_s"] > 0
    assert cold["items"] == 2 and cold["retrievable"]["timeouts"] == 0
    assert all(p["retrievable_s"] > 0 for p in cold["probes"])
    assert described["settings"] == {
        "TWOTOWER_TRAINER__CHECKPOINT_INTERVAL_S": "1",
        "TWOTOWER_TRAINER__STREAM_ITEM_ROWS": "true",
    }
    json.loads(write_report({"freshness": fresh, "cold_item": cold}, None))
