"""``bench cold-item``: catalogue event → the new item is retrievable, on the live system.

One item at a time: a catalogue record for a brand-new item (content features only, a
category nobody else has) is produced to Kafka and the clock starts; the retriever is then
asked ``GET /recommend?category=<that category>&k=1`` until the item comes back. The
retriever only returns items of its served index, and only this item has that category,
so the answer names the item exactly when it is searchable. Also noted: when the item's
details hash appeared in Redis (the publisher's serving-state write, which comes first).

A timeout counts as infinitely slow (a percentile reaching it is reported as ``null``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import LiveSystem, SystemOptions, http_json, run_on_live_system, summarize_s
from twotower.snapshots import SnapshotLayout

log = logging.getLogger(__name__)

POLL_S = 0.01
PAUSE_S = 0.3
"""Between two items, so that each one is published on its own."""
TARGET_S = 2.0


def measure(system: LiveSystem, items: int, timeout_s: float) -> dict[str, Any]:
    """Publish ``items`` new items one after the other; the report's figures."""
    client = redis.Redis.from_url(system.redis_url)
    layout = SnapshotLayout(system.cfg.redis.key_prefix)
    retrievable: list[float] = []
    details: list[float] = []
    rows: list[dict[str, Any]] = []
    try:
        with httpx.Client(timeout=5.0) as http:
            for n in range(items):
                system.check_alive()
                item_id = f"{system.tag}-cold{n}"
                category = f"{system.tag}-coldcat{n}"
                key = layout.item(item_id)
                t0 = time.perf_counter()
                system.send(system.catalog_item(item_id, category))
                acked = time.perf_counter() - t0
                found = written = math.inf
                deadline = t0 + timeout_s
                while time.perf_counter() < deadline:
                    if math.isinf(written) and client.exists(key):
                        written = time.perf_counter() - t0
                    status, body = http_json(
                        http, f"{system.base_url}/recommend", user_id="cold-item-probe", k=1, category=category
                    )
                    if status == 200 and any(entry["item_id"] == item_id for entry in body["items"]):
                        found = time.perf_counter() - t0
                        break
                    time.sleep(POLL_S)
                retrievable.append(found)
                details.append(written)
                rows.append(
                    {
                        "item_id": item_id,
                        "acked_s": round(acked, 4),
                        "details_written_s": round(written, 4) if math.isfinite(written) else None,
                        "retrievable_s": round(found, 4) if math.isfinite(found) else None,
                    }
                )
                log.info("cold item %d/%d: retrievable after %.3f s", n + 1, items, found)
                time.sleep(PAUSE_S)
    finally:
        client.close()
    summary = summarize_s(retrievable)
    return {
        "items": len(retrievable),
        "retrievable": {
            **summary,
            "target_s": TARGET_S,
            "meets_target": summary["max_s"] is not None and summary["max_s"] <= TARGET_S,
        },
        "details_written": summarize_s(details),
        "probes": rows,
    }


def run(opts: SystemOptions, items: int = 20, timeout_s: float = 30.0, keep_logs: Path | None = None) -> dict[str, Any]:
    """Start the system, publish the items, stop everything; the JSON report."""
    return run_on_live_system("cold-item", opts, lambda system: measure(system, items, timeout_s), keep_logs)


__all__ = ["measure", "run"]
