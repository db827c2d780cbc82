"""``bench freshness``: how soon a click changes what the retriever serves, on the live system.

One probe at a time, each by a different warm user (nobody else clicks as them):

1. ask the retriever for the user's top items **within a category the user never clicked**
   (``GET /recommend?category=c``) and take the first, ``x``: the click is a new interest;
2. produce a click (user, ``x``) to Kafka and start the clock (the broker's ack is inside
   the measured time);
3. **history path** — poll the same request until ``x`` is gone from the answer: the
   retriever has read the click from the user's recent history in Redis (it excludes
   everything there and pools it into the user vector). Also noted: when the click appears
   at the head of the Redis history list (the publisher's serving-state write).
4. **parameter path** — follow every version the publisher writes (Redis meta and parts,
   read by a :class:`VersionTracker`) until one holds a *changed* ID row for the user: the
   user clicks only here, so that change is the trainer's update for this click (the
   clicked item's vector, recomputed from its updated row, is checked to change in the same
   version and counted). The path is done when every retriever worker serves that version
   or a later one (its ``twotower_retriever_snapshot_version`` gauge). Also noted: when the
   publisher wrote that version (its ``created_ms``).

Before each probe the bench pauses for a random fraction of the trainer's checkpoint
cycle, so that clicks land at random phases of it (back-to-back probes would all start just
after a checkpoint and always wait the whole interval). The cycle is the trainer's actual
wait between checkpoint starts, from its log: ``trainer.checkpoint_interval_s``, or longer
when ``trainer.checkpoint_max_share`` stretches it for a big state.

With ``state_users`` (:class:`~bench.common.SystemOptions`) the trainer starts from a
checkpoint that already holds that many users, so that its checkpoints, the publisher's
reads and the full versions have the size of a real deployment's. The report then also
splits each probe's parameter path at the trainer's checkpoint that carried the click (its
start and end, from the trainer's log) and gives the checkpoint durations of the run.

Each path has ``timeout_s``; a probe that times out counts as infinitely slow (so a p95 that
reaches a timeout is reported as ``null``, never as a flattering number).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import (
    LiveSystem,
    Sample,
    SystemOptions,
    http_json,
    metric_sum,
    run_on_live_system,
    scrape,
    served_versions,
    summarize_s,
)
from publisher.serving_state import decode_history_entry
from twotower.blobs import unpack_rows, unpack_strings
from twotower.snapshot_parts import ITEMS, REMOVED_ITEMS, USERS
from twotower.snapshots import FULL, SnapshotLayout, SnapshotStore

log = logging.getLogger(__name__)

POLL_S = 0.01
TARGET_HISTORY_P95_S = 1.0
TARGET_PARAMS_P95_S = 5.0


@dataclass
class VersionChange:
    """What one version changed compared with the version before it on the chain."""

    version: int
    kind: str
    created_ms: int
    trainer_seq: int
    users: set[str] = field(default_factory=set)
    items: set[str] = field(default_factory=set)


class VersionTracker:
    """Replays, in order, every version the publisher writes; knows each user row and item vector.

    It starts from the current version's chain and then reads each newer version once.
    With ``watch_users``, only those users' rows are kept and compared (a full version of a
    big state holds a million rows nobody probes).
    """

    def __init__(self, store: SnapshotStore, watch_users: Iterable[str] | None = None) -> None:
        self.store = store
        self.watch = None if watch_users is None else frozenset(watch_users)
        self.users: dict[str, bytes] = {}
        self.items: dict[str, bytes] = {}
        self.last = 0
        self.seen: list[VersionChange] = []
        current = store.current_version()
        if current is not None:
            for meta in store.chain(current):
                self._apply(meta.version)
            self.last = current

    def poll(self) -> list[VersionChange]:
        """Read the versions written since the last call (oldest first) and what each changed."""
        raw = self.store.redis.zrangebyscore(self.store.layout.versions, self.last + 1, "+inf")
        out = [self._apply(int(v)) for v in raw]
        if out:
            self.last = out[-1].version
        return out

    def _apply(self, version: int) -> VersionChange:
        meta = self.store.meta(version)
        change = VersionChange(version, meta.kind, meta.created_ms, meta.trainer_seq)
        users = unpack_rows(self.store.read_part(meta, USERS))
        items = unpack_rows(self.store.read_part(meta, ITEMS))
        if meta.kind == FULL:
            new_users = _row_bytes(users.ids, users.matrix, self.watch)
            new_items = _row_bytes(items.ids, items.matrix)
            change.users = {u for u, row in new_users.items() if self.users.get(u) != row}
            change.items = {i for i, row in new_items.items() if self.items.get(i) != row}
            self.users, self.items = new_users, new_items
        else:
            for item_id in unpack_strings(self.store.read_part(meta, REMOVED_ITEMS)):
                self.items.pop(item_id, None)
            for user, row in _row_bytes(users.ids, users.matrix, self.watch).items():
                if self.users.get(user) != row:
                    change.users.add(user)
                self.users[user] = row
            for item_id, row in _row_bytes(items.ids, items.matrix).items():
                if self.items.get(item_id) != row:
                    change.items.add(item_id)
                self.items[item_id] = row
        self.seen.append(change)
        return change


def _row_bytes(ids: Iterable[str], matrix: Any, only: frozenset[str] | None = None) -> dict[str, bytes]:
    if only is None:
        return {row_id: matrix[i].tobytes() for i, row_id in enumerate(ids)}
    return {row_id: matrix[i].tobytes() for i, row_id in enumerate(ids) if row_id in only}


@dataclass
class Probe:
    user: str
    item: str
    category: str
    acked_s: float = math.nan
    """Until the broker acknowledged the click."""
    history_written_s: float = math.inf
    """Until the click was at the head of the user's history list in Redis."""
    history_s: float = math.inf
    """Until the retriever's answer no longer held the clicked item."""
    rows_published_s: float = math.inf
    """Until the publisher wrote the version holding the user's updated row (its created_ms)."""
    params_s: float = math.inf
    """Until every retriever worker served that version (or a later one)."""
    params_version: int | None = None
    item_row_in_same_version: bool | None = None
    trainer_seq: int | None = None
    """The trainer checkpoint that version was built from."""
    checkpoint_started_s: float = math.inf
    """Until that checkpoint started (from the trainer's log: its end minus its duration)."""
    checkpoint_written_s: float = math.inf
    """Until that checkpoint was on disk and its offsets committed (the trainer's log line)."""
    click_wall_s: float = math.nan
    """Unix time of the click (the clock's start)."""


def _top_in_category(http: httpx.Client, base_url: str, user: str, category: str) -> list[str]:
    status, body = http_json(http, f"{base_url}/recommend", user_id=user, k=10, category=category)
    if status != 200:
        raise RuntimeError(f"GET /recommend for {user} answered {status}: {body}")
    return [entry["item_id"] for entry in body["items"]]


def wait_for_warm_rows(system: LiveSystem, tracker: VersionTracker, timeout_s: float) -> None:
    """Until every warm user has a published row and no warm user's row has changed for a while.

    The warm-up clicks must all be trained and published before the probes start, or a
    probe would take a late warm-up update for its own.
    """
    cfg = system.cfg.trainer
    users = {f"user{i}" for i in range(system.opts.users)}
    deadline = time.monotonic() + timeout_s
    last_change = time.monotonic()
    missing = users
    while time.monotonic() < deadline:
        system.check_alive()
        # two of the trainer's actual checkpoint cycles (stretched for a big state) in quiet
        quiet_s = 2 * system.checkpoint_cycle_s() + cfg.out_of_order_ms / 1000 + 1.0
        for change in tracker.poll():
            if change.users & users:
                last_change = time.monotonic()
        missing = users - set(tracker.users)
        if not missing and time.monotonic() - last_change >= quiet_s:
            return
        time.sleep(0.5)
    raise TimeoutError(f"warm-up not settled after {timeout_s:.0f} s ({len(missing)} users without a row)")


def probe_once(
    system: LiveSystem,
    tracker: VersionTracker,
    client: redis.Redis,
    http: httpx.Client,
    user: str,
    category: str,
    timeout_s: float,
) -> Probe:
    """One click and both of its paths (see the module docstring)."""
    base_url = system.base_url
    layout = SnapshotLayout(system.cfg.redis.key_prefix)
    ranked = _top_in_category(http, base_url, user, category)
    if not ranked:
        raise RuntimeError(f"no items of category {category} served to {user}")
    probe = Probe(user, ranked[0], category)
    tracker.poll()  # baseline: rows as of now; any later change of this user's row is this click's
    history_key = layout.history(user)
    t0 = time.perf_counter()
    system.send(system.click(user, probe.item))
    probe.acked_s = time.perf_counter() - t0
    wall0_ms = time.time() * 1000 - probe.acked_s * 1000
    probe.click_wall_s = wall0_ms / 1000
    deadline = t0 + timeout_s
    while time.perf_counter() < deadline:
        if math.isinf(probe.history_written_s):
            head = client.lindex(history_key, 0)
            if head is not None and decode_history_entry(head)[0] == probe.item:
                probe.history_written_s = time.perf_counter() - t0
        if math.isinf(probe.history_s) and probe.item not in _top_in_category(http, base_url, user, category):
            probe.history_s = time.perf_counter() - t0
        if probe.params_version is None:
            for change in tracker.poll():
                if user in change.users:
                    probe.params_version = change.version
                    probe.trainer_seq = change.trainer_seq
                    probe.item_row_in_same_version = probe.item in change.items
                    probe.rows_published_s = max(0.0, (change.created_ms - wall0_ms) / 1000)
                    break
        if probe.params_version is not None and math.isinf(probe.params_s):
            served = list(served_versions(f"{base_url}/metrics").values())
            if served and min(served) >= probe.params_version:
                probe.params_s = time.perf_counter() - t0
        if math.isfinite(probe.history_s) and math.isfinite(probe.params_s):
            break
        time.sleep(POLL_S)
    return probe


def measure(system: LiveSystem, clicks: int, timeout_s: float) -> dict[str, Any]:
    """Run ``clicks`` probes one after the other on a ready system; the report's figures."""
    client = redis.Redis.from_url(system.redis_url)
    store = SnapshotStore(client, SnapshotLayout(system.cfg.redis.key_prefix))
    try:
        tracker = VersionTracker(store, watch_users=system.user_homes)
        wait_for_warm_rows(system, tracker, system.opts.ready_timeout_s)
        probes: list[Probe] = []
        users = sorted(system.user_homes, key=lambda u: int(u[4:]))
        categories = sorted(system.category_items)
        phase = random.Random(system.opts.seed + 2)
        metrics_before = _daemon_metrics(system)
        probes_started = time.time()
        with httpx.Client(timeout=5.0) as http:
            for n in range(clicks):
                # A probe starts right after the previous one was served, i.e. just after a
                # checkpoint: a random pause puts each click at a random phase of the
                # trainer's checkpoint cycle, as real clicks are.
                time.sleep(phase.uniform(0.0, system.checkpoint_cycle_s()))
                system.check_alive()
                user = users[n % len(users)]
                fresh = [c for c in categories if c not in system.user_homes[user]]
                category = fresh[n % len(fresh)]
                probe = probe_once(system, tracker, client, http, user, category, timeout_s)
                probes.append(probe)
                log.info(
                    "probe %d/%d: history %.3f s, params %.3f s (version %s)",
                    n + 1,
                    clicks,
                    probe.history_s,
                    probe.params_s,
                    probe.params_version,
                )
        probes_ended = time.time()
        metrics_after = _daemon_metrics(system)
    finally:
        client.close()
    system.read_logs()
    _attribute_checkpoints(system, probes)
    history = summarize_s([p.history_s for p in probes])
    params = summarize_s([p.params_s for p in probes])
    same = [p.item_row_in_same_version for p in probes if p.item_row_in_same_version is not None]
    return {
        "clicks": len(probes),
        "history_path": {
            **history,
            "target_p95_s": TARGET_HISTORY_P95_S,
            "meets_target": history["p95_s"] is not None and history["p95_s"] <= TARGET_HISTORY_P95_S,
            "redis_history_written": summarize_s([p.history_written_s for p in probes]),
        },
        "parameter_path": {
            **params,
            "target_p95_s": TARGET_PARAMS_P95_S,
            "meets_target": params["p95_s"] is not None and params["p95_s"] <= TARGET_PARAMS_P95_S,
            "version_published": summarize_s([p.rows_published_s for p in probes]),
            "item_row_in_same_version": f"{sum(same)}/{len(same)}",
            "checkpoint_started": summarize_s([p.checkpoint_started_s for p in probes]),
            "checkpoint_written": summarize_s([p.checkpoint_written_s for p in probes]),
        },
        "trainer_checkpoints": _checkpoint_figures(system, probes_started, probes_ended),
        "daemon_metrics_during_probes": _metrics_delta(metrics_before, metrics_after),
        "kafka_ack": summarize_s([p.acked_s for p in probes]),
        "probes": [_probe_json(p) for p in probes],
    }


def _attribute_checkpoints(system: LiveSystem, probes: list[Probe]) -> None:
    """Each probe's trainer checkpoint (the one its version was built from), from the trainer's log."""
    by_seq = {c.seq: c for c in system.checkpoints}
    for probe in probes:
        ckpt = by_seq.get(probe.trainer_seq) if probe.trainer_seq is not None else None
        if ckpt is not None:
            probe.checkpoint_started_s = max(0.0, ckpt.started - probe.click_wall_s)
            probe.checkpoint_written_s = max(0.0, ckpt.ts - probe.click_wall_s)


def _checkpoint_figures(system: LiveSystem, since: float, until: float) -> dict[str, Any]:
    """The trainer's checkpoints (its log) while the probes ran, and over the whole run so far."""
    during = [c for c in system.checkpoints if since <= c.ts <= until]
    cycles = [b.started - a.started for a, b in pairwise(during)]
    full = [c for c in during if c.kind == "checkpoint"]
    return {
        "source": "trainer log (DEBUG line per write: a full checkpoint or a row update)",
        "during_probes": {
            **summarize_s([c.took_s for c in during]),
            "wait_to_next_start": summarize_s([c.next_s for c in during]),
            "observed_cycle": summarize_s(cycles),
            "full_checkpoints": summarize_s([c.took_s for c in full]),
            "full_cycle": summarize_s([b.started - a.started for a, b in pairwise(full)]),
            "row_updates": summarize_s([c.took_s for c in during if c.kind == "row update"]),
        },
        "whole_run": summarize_s([c.took_s for c in system.checkpoints]),
        "versions_published_during_probes": {
            kind: sum(1 for v in system.publishes if v.kind == kind and since <= v.ts <= until)
            for kind in sorted({v.kind for v in system.publishes})
        },
    }


def _daemon_metrics(system: LiveSystem) -> dict[str, float]:
    """Counters of the trainer's checkpoints, the publisher's versions and the retriever's swaps."""
    out: dict[str, float] = {}
    trainer = scrape(system.trainer_metrics_url)
    out["trainer_checkpoints"] = metric_sum(trainer, "twotower_trainer_checkpoint_seconds_count")
    out["trainer_checkpoint_s"] = metric_sum(trainer, "twotower_trainer_checkpoint_seconds_sum")
    publisher = scrape(system.publisher_metrics_url)
    retriever: list[Sample] = scrape(f"{system.base_url}/metrics")
    for kind in ("full", "delta"):
        out[f"publisher_{kind}_versions"] = metric_sum(publisher, "twotower_publisher_publish_seconds_count", kind=kind)
        out[f"publisher_{kind}_s"] = metric_sum(publisher, "twotower_publisher_publish_seconds_sum", kind=kind)
        out[f"retriever_{kind}_swaps"] = metric_sum(retriever, "twotower_retriever_swaps_total", kind=kind)
    out["retriever_swaps"] = metric_sum(retriever, "twotower_retriever_swap_seconds_count")
    out["retriever_swap_s"] = metric_sum(retriever, "twotower_retriever_swap_seconds_sum")
    return out


def _metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Counts and mean durations between two :func:`_daemon_metrics` scrapes."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}

    def mean(total: str, count: str) -> float | None:
        return round(d[total] / d[count], 3) if d[count] > 0 else None

    return {
        "source": "the daemons' Prometheus metrics, scraped before and after the probes",
        "trainer_checkpoints": int(d["trainer_checkpoints"]),
        "trainer_checkpoint_mean_s": mean("trainer_checkpoint_s", "trainer_checkpoints"),
        "publisher_full_versions": int(d["publisher_full_versions"]),
        "publisher_full_mean_s": mean("publisher_full_s", "publisher_full_versions"),
        "publisher_delta_versions": int(d["publisher_delta_versions"]),
        "publisher_delta_mean_s": mean("publisher_delta_s", "publisher_delta_versions"),
        "retriever_full_swaps": int(d["retriever_full_swaps"]),
        "retriever_delta_swaps": int(d["retriever_delta_swaps"]),
        "retriever_swap_mean_s": mean("retriever_swap_s", "retriever_swaps"),
    }


def _probe_json(probe: Probe) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in asdict(probe).items():
        out[key] = (round(value, 4) if math.isfinite(value) else None) if isinstance(value, float) else value
    return out


def run(
    opts: SystemOptions, clicks: int = 50, timeout_s: float = 30.0, keep_logs: Path | None = None
) -> dict[str, Any]:
    """Start the system, run the probes, stop everything; the JSON report."""
    return run_on_live_system("freshness", opts, lambda system: measure(system, clicks, timeout_s), keep_logs)


__all__ = ["Probe", "VersionTracker", "measure", "probe_once", "run"]
