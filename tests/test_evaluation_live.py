"""``evaluate replay --live``: a log through real Kafka, the trainer, publisher and retriever daemons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.protocol import MS_PER_DAY, utc_day, warmup_size

REPO = Path(__file__).resolve().parents[1]
DAY0 = 19_000 * MS_PER_DAY


def taste_groups_csv(path: Path, n_users: int = 30, n_items: int = 45, days: int = 3, per_day: int = 120) -> int:
    """Users in three taste groups, each clicking items of its own group; returns the event count."""
    rng = np.random.default_rng(7)
    rows = ["user,item,ts"]
    for d in range(days):
        for t in np.sort(rng.integers(0, MS_PER_DAY, size=per_day)).tolist():
            user = int(rng.integers(0, n_users))
            item = int(rng.integers(0, n_items // 3)) * 3 + user % 3
            rows.append(f"u{user},i{item},{(DAY0 + d * MS_PER_DAY + t) // 1000}")
    path.write_text("\n".join(rows) + "\n")
    return len(rows) - 1


@pytest.mark.integration
def test_live_replay_scores_the_retrievers_answers_and_runs_the_nightly(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    log_file = tmp_path / "log.csv"
    n = taste_groups_csv(log_file)
    out = tmp_path / "live.json"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": kafka_bootstrap,
        "REDIS_URL": redis_url,
        "TWOTOWER_MODEL__DIM": "16",
        "TWOTOWER_MODEL__ID_DIM": "8",
        "TWOTOWER_MODEL__HIDDEN": "16",
        "TWOTOWER_TRAINER__BATCH_SIZE": "32",
        "TWOTOWER_TRAINER__CHECKPOINT_INTERVAL_S": "1",
    }
    cmd = [
        sys.executable, "-m", "twotower.cli", "evaluate", "replay", "--data", str(log_file), "--format", "csv",
        "--user-col", "user", "--item-col", "item", "--time-col", "ts", "--json", str(out), "--plot",
        str(tmp_path / "live.png"), "--live", "--speed", "20000", "--bootstrap-epochs", "3", "--state-root",
        str(tmp_path / "live"), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    n_warm = warmup_size(n, 0.6)
    live = report["results"]["two_tower_live"]
    offline = report["results"]["two_tower_streaming"]
    assert live["events_evaluated"] == offline["events_evaluated"] == n - n_warm
    # the lists came from the retriever, not from the popularity fallback
    assert report["live"]["request_errors"] == 0
    assert live["fallback_share"] < 0.05
    assert report["live"]["served_version_at_end"] > 1
    # every UTC day boundary after the warm-up ran a nightly retrain (handed over to the trainer)
    times = sorted(int(line.split(",")[2]) * 1000 for line in log_file.read_text().splitlines()[1:])
    boundaries = utc_day(times[-1]) - utc_day(times[n_warm - 1])
    assert boundaries >= 1
    assert [r["status"] for r in report["live"]["nightly_runs"]] == ["trained"] * boundaries
    # the live system and the offline harness run the same code on the same log: close figures
    # (144 scored events: one standard error of HR@10 is about 0.03)
    assert abs(live["HR@10"] - offline["HR@10"]) <= 0.1, (live, offline)
    assert live["HR@10"] > 0
    assert (tmp_path / "live.png").stat().st_size > 1000
