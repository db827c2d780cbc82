"""``evaluate simulate``: the simulated log, its ground truth, and the recall against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.protocol import MS_PER_DAY, Protocol, warmup_size
from evaluation.replay import make_policies, run
from evaluation.simulate import START_MS, SimulationSpec, Truth, TruthMetrics, TruthScorer, generate
from producers.world import SimulatorWorld
from twotower.config import SimulatorConfig

REPO = Path(__file__).resolve().parents[1]
WORLD = SimulatorConfig(n_users=60, n_items=200, n_categories=5, seed=3)
SPEC = SimulationSpec(days=3, events_per_day=300, new_items_per_day=20, truth_every=3, k=5)


def test_generated_log_is_deterministic_sorted_and_day_aligned() -> None:
    a, b = generate(WORLD, SPEC), generate(WORLD, SPEC)
    assert a.events == b.events and a.truth == b.truth
    times = [e.ts_ms for e in a.events]
    assert times == sorted(times) and len(times) == 900
    assert START_MS % MS_PER_DAY == 0 and (times[-1] - START_MS) // MS_PER_DAY == 2
    assert a.n_items > a.n_initial_items  # new items arrived
    other = generate(WORLD.model_copy(update={"seed": 4}), SPEC)
    assert other.events != a.events


def test_drift_is_measured_over_the_last_day_not_since_midnight() -> None:
    """Every user drifts at the same rate: a day into the log, the angle over the last day is
    about the same just after midnight as just before it (measured since midnight, it fell to
    zero at each midnight)."""
    log = generate(WORLD, SPEC)

    def mean_drift(start_h: float, end_h: float) -> float:
        window = [
            truth.drift
            for index, truth in log.truth.items()
            if start_h * 3_600_000 <= log.events[index].ts_ms - START_MS < end_h * 3_600_000
        ]
        return float(np.mean(window))

    before, after = mean_drift(44, 48), mean_drift(48, 52)
    assert before > 0 and after > 0.7 * before


def test_truth_is_the_users_best_unseen_items_at_that_moment() -> None:
    log = generate(WORLD, SPEC)
    seen: dict[str, set[str]] = {}
    for index, event in enumerate(log.events):
        truth = log.truth.get(index)
        if truth is not None:
            assert len(truth.top) == SPEC.k and len(set(truth.top)) == SPEC.k
            assert not seen.get(event.user, set()) & set(truth.top)  # never an item already clicked
            first_new = {SimulatorWorld.item_id(j) for j in range(log.n_initial_items, log.n_items)}
            assert truth.cold == set(truth.top) & first_new
            assert 0.0 <= truth.drift <= np.pi
        seen.setdefault(event.user, set()).add(event.item)
    assert len(log.truth) == len(range(0, len(log.events), SPEC.truth_every))
    # organic clicks follow the truth: the clicked item is far more often in the true top-K than chance
    in_top = sum(log.events[i].item in t.top for i, t in log.truth.items())
    assert in_top / len(log.truth) > 5 * SPEC.k / log.n_items


def test_truth_metrics_count_overlap_cold_items_and_drifting_users() -> None:
    metrics = TruthMetrics(k=2)
    metrics.update(["a", "b", "x"], Truth(top=("a", "c"), cold=frozenset({"c"}), drift=0.1))
    metrics.update(["c", "d"], Truth(top=("c", "d"), cold=frozenset({"c", "d"}), drift=0.9))
    metrics.update(["z", "y"], Truth(top=("a", "b"), cold=frozenset(), drift=0.5))
    out = metrics.summary(drifting_quantile=0.75)
    assert out["true_recall@2"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["true_recall@2_cold_items"] == pytest.approx(2 / 3)  # c missed once, then c and d found
    assert out["true_recall@2_drifting_users"] == pytest.approx(1.0)  # only the 0.9-drift event
    assert TruthMetrics(k=3).summary(0.5)["true_recall@3"] is None


def test_recall_against_truth_is_far_above_chance_for_real_policies() -> None:
    log = generate(WORLD, SPEC)
    protocol = Protocol(cold_days=1.0, seed=3)
    scorer = TruthScorer(log, SPEC)
    run(log.events, make_policies(["popularity_7d", "itemknn_stream"], protocol), protocol, scorer)
    out = scorer.summary()
    assert set(out) == {"popularity_7d", "itemknn_stream"}
    chance = SPEC.k / log.n_items  # a random list's expected share of the true top-K
    for name in out:
        assert out[name]["true_recall@5"] > 3 * chance, (name, out[name])
        assert out[name]["truth_events"] == sum(i >= warmup_size(len(log.events), 0.6) for i in log.truth)


def test_cli_writes_results_truth_and_settings(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    cmd = [
        sys.executable, "-m", "twotower.cli", "evaluate", "simulate", "--json", str(out),
        "--days", "2", "--events-per-day", "150", "--users", "40", "--items", "100",
        "--policies", "popularity_7d,itemknn_stream", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(report["truth"]) == {"popularity_7d", "itemknn_stream"}
    assert report["simulation"]["events"] == 300 and report["protocol"]["cold_days"] == 1.0
    assert "true_recall@10" in proc.stdout
    env = {**os.environ, "COLUMNS": "300"}  # the error box must not wrap the message
    bad = subprocess.run(
        [*cmd[:7], "--policies", "nope"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0 and "unknown policies" in bad.stderr
