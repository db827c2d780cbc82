"""``twotower demo`` end to end against the session's broker and Redis (the README's first command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_every_stage_and_beats_random(kafka_bootstrap: str, redis_url: str, tmp_path) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP": kafka_bootstrap, "REDIS_URL": redis_url}
    proc = subprocess.run(
        [sys.executable, "-m", "twotower.cli", "demo", "--duration", "40", "--rate", "60", "--state-root", tmp_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    summary = json.loads(lines[-1])  # the last line is one JSON object
    assert proc.returncode == 0, (summary, proc.stderr[-2000:])
    assert summary["ok"] is True
    assert summary["events_produced"] > 0 and summary["events_trained"] > 0
    assert summary["snapshots_published"] > 0 and summary["recommendations_served"] > 0
    assert summary["served_hit_rate"] > summary["random_hit_rate"]
    assert summary["daemons_failed"] == []
