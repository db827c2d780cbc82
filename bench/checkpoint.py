"""``bench checkpoint``: the cost of one trainer checkpoint at a given state size.

Builds a :class:`~trainer.state.TrainerState` directly (no Kafka, no training): ``users``
user rows, each with a profile and a full history of ``model.history_len`` clicks,
``items`` item rows with their catalogue entries, the hard-negative memory filled to
``trainer.hard_negative_requests`` requests. Then, in the order the system does it:

* ``to_checkpoint_s``: the trainer's conversion of its state to a :class:`Checkpoint`;
* ``save_s``: :func:`twotower.checkpoint.save` (write, fsync, rename);
* ``load_s``: :func:`twotower.checkpoint.load` (what the publisher and a restart read);
* ``publish_delta_s``: what the publisher does with it on a delta (the towers from the
  checkpoint, the delta of the rows changed since the previous sequence number);
* ``resume_s``: :meth:`TrainerState.from_checkpoint` (a trainer restart);
* ``row_update_s``: what the trainer writes between full checkpoints of a big state
  (:meth:`TrainerState.to_row_update` + :func:`twotower.checkpoint.save_row_update`: the rows
  changed since the previous write, here the ``UPDATED_SHARE`` of users);
* ``publish_row_update_s``: the publisher's read of that row update and its delta.

Each phase is timed ``repeat`` times; the report gives every run and the median.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import provenance
from twotower.config import ModelConfig, TrainerConfig
from twotower.events import CatalogItem

UPDATED_SHARE = 0.01
"""Share of user rows changed since the previous checkpoint (the delta the publisher builds)."""
SHOWN_PER_REQUEST = 10
RETRIEVED_PER_REQUEST = 30


def random_table(
    ids: list[str], rng: np.random.Generator, mcfg: ModelConfig, tcfg: TrainerConfig, now_ms: int, seq: int
) -> Any:
    """An :class:`~trainer.id_table.IdTable` holding ``ids`` with random small rows, Adagrad
    accumulators, counts, last-seen times within the day before ``now_ms`` and update sequence
    numbers below ``seq``."""
    from trainer.id_table import IdTable
    from twotower.checkpoint import TableState

    n = len(ids)
    return IdTable.from_state(
        TableState(
            ids=ids,
            emb=torch.from_numpy(rng.standard_normal((n, mcfg.id_dim), dtype=np.float32) * 0.01),
            accum=torch.from_numpy(rng.random(n, dtype=np.float32)),
            count=torch.from_numpy(rng.integers(1, 100, n)),
            last_seen_ms=torch.from_numpy(now_ms - rng.integers(0, 86_400_000, n)),
            updated_seq=torch.from_numpy(rng.integers(1, seq, n)),
        ),
        tcfg.admission_min_count,
    )


def fill_user_side(state: Any, user_ids: list[str], item_ids: list[str], rng: np.random.Generator, now_ms: int) -> None:
    """Give ``state`` a random profile and a full history (``model.history_len`` clicks on
    ``item_ids``, within the 30 days before ``now_ms``, oldest first) for each of ``user_ids``,
    replacing its profiles and histories."""
    from trainer.state import HistoryColumns, ProfileColumns
    from twotower.checkpoint import Histories, Profiles

    mcfg = state.model_cfg
    users, items = len(user_ids), len(item_ids)
    profiles = rng.random((users, mcfg.profile_dim), dtype=np.float32)
    state.profiles = ProfileColumns.from_columns(Profiles(user_ids, torch.from_numpy(profiles)), mcfg.profile_dim)
    length = mcfg.history_len
    clicked = rng.integers(0, items, (users, length)).astype(np.int32)  # codes into item_ids
    times = np.sort(now_ms - rng.integers(0, 30 * 86_400_000, (users, length)), axis=1)
    offsets = torch.arange(0, users * length + 1, length, dtype=torch.int64)
    state.histories = HistoryColumns.from_columns(
        Histories(user_ids, offsets, item_ids, torch.from_numpy(clicked.ravel()), torch.from_numpy(times.ravel())),
        length,
    )


def build_state(users: int, items: int, seed: int = 0) -> Any:
    """A trainer state of the given size (random rows, full histories, profiles, catalogue)."""
    from trainer.state import CatalogColumns, RequestNegatives, TrainerState
    from twotower.checkpoint import Catalog

    mcfg, tcfg = ModelConfig(), TrainerConfig()
    state = TrainerState(mcfg, tcfg)
    rng = np.random.default_rng(seed)
    now_ms = 1_700_000_000_000
    user_ids = [f"u{i:07d}" for i in range(users)]
    item_ids = [f"i{i:07d}" for i in range(items)]
    seq = 100
    state.users = random_table(user_ids, rng, mcfg, tcfg, now_ms, seq)
    state.items = random_table(item_ids, rng, mcfg, tcfg, now_ms, seq)
    state.users.updated_seq[: max(1, int(users * UPDATED_SHARE))] = seq  # changed since seq - 1
    state.seq = seq
    for c in range(min(mcfg.n_categories, 50)):
        state.category_index(f"cat{c}")
    cats = rng.integers(1, len(state.categories) + 1, items)
    content = rng.random((items, mcfg.content_dim), dtype=np.float32)
    state.catalog = CatalogColumns.from_columns(
        Catalog(item_ids, torch.from_numpy(cats), torch.from_numpy(content)), mcfg.content_dim
    )
    fill_user_side(state, user_ids, item_ids, rng, now_ms)
    state.requests = OrderedDict()
    for r in range(tcfg.hard_negative_requests):
        picked = rng.integers(0, items, SHOWN_PER_REQUEST + RETRIEVED_PER_REQUEST).tolist()
        shown = {item_ids[j] for j in picked[:SHOWN_PER_REQUEST]}
        not_shown = dict.fromkeys(item_ids[j] for j in picked[SHOWN_PER_REQUEST:] if item_ids[j] not in shown)
        state.requests[f"req{r:08d}"] = RequestNegatives(shown, not_shown)
        for item in not_shown:
            state.hard_counts[item] = state.hard_counts.get(item, 0) + 1
            state.hard_total += 1
    state.event_time_ms = now_ms
    return state


SEEDED_USER_PREFIX = "seeded"
"""User ids of a :func:`seeded_checkpoint`: ``seeded0000000`` … (no bench user is called so)."""


def seeded_user(i: int) -> str:
    return f"{SEEDED_USER_PREFIX}{i:07d}"


def seeded_checkpoint(
    users: int, catalog: Sequence[CatalogItem], mcfg: ModelConfig, tcfg: TrainerConfig, seed: int = 0
) -> Any:
    """A checkpoint for a trainer to resume from, as if it had already learned ``users`` users.

    The catalogue items get what the trainer gives them when their records arrive (a zero ID
    row, category and content; categories indexed in catalogue order), the users what
    :func:`build_state` gives its users (a random row, a profile and a full history of
    ``model.history_len`` clicks over the catalogue's items, within the 30 days before now).
    No Kafka offsets: the trainer reads every partition from the beginning. No hard-negative
    memory (the live benchmarks' traffic records none either). Sequence number 1.
    """
    from trainer.state import TrainerState

    state = TrainerState(mcfg, tcfg)
    for item in catalog:
        state.apply_catalog(item)
    state.seq = state.next_seq
    now_ms = int(time.time() * 1000)
    if users:
        rng = np.random.default_rng(seed)
        user_ids = [seeded_user(i) for i in range(users)]
        state.users = random_table(user_ids, rng, mcfg, tcfg, now_ms, state.seq + 1)
        fill_user_side(state, user_ids, [item.item_id for item in catalog], rng, now_ms)
    state.event_time_ms = now_ms
    return state.to_checkpoint({})


def _timed(fn: Callable[[], Any], profile: cProfile.Profile | None) -> tuple[float, Any]:
    started = time.perf_counter()
    if profile is not None:
        profile.enable()
    try:
        out = fn()
    finally:
        if profile is not None:
            profile.disable()
    return time.perf_counter() - started, out


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(
    users: int,
    items: int,
    repeat: int = 3,
    state_dir: Path | None = None,
    profile_phase: str | None = None,
    profile_lines: int = 25,
) -> dict[str, Any]:
    """Build the state, then time each phase ``repeat`` times; the report.

    Args:
        profile_phase: one of the phase names: print its cProfile (cumulative, first run) to stderr.
    """
    from publisher.build import delta_snapshot, model_from_checkpoint
    from trainer.state import TrainerState
    from twotower import checkpoint

    run_info = provenance()
    load_before = _load_average()
    started = time.perf_counter()
    state = build_state(users, items)
    build_s = time.perf_counter() - started
    runs: dict[str, list[float]] = {
        name: []
        for name in (
            "to_checkpoint_s",
            "save_s",
            "load_s",
            "publish_delta_s",
            "resume_s",
            "row_update_s",
            "publish_row_update_s",
        )
    }
    size = update_size = 0
    delta_users = 0
    with tempfile.TemporaryDirectory(dir=state_dir) as tmp:
        for attempt in range(repeat):

            def prof(name: str, attempt: int = attempt) -> cProfile.Profile | None:
                return cProfile.Profile() if name == profile_phase and attempt == 0 else None

            profiles = {name: prof(name) for name in runs}
            took, ckpt = _timed(lambda: state.to_checkpoint({"events:0": 1}), profiles["to_checkpoint_s"])
            runs["to_checkpoint_s"].append(took)
            took, _ = _timed(lambda ckpt=ckpt: checkpoint.save(tmp, ckpt), profiles["save_s"])
            runs["save_s"].append(took)
            del ckpt
            size = checkpoint.path_in(tmp).stat().st_size
            took, loaded = _timed(lambda: checkpoint.load(tmp), profiles["load_s"])
            runs["load_s"].append(took)

            def publish(loaded: Any = loaded) -> Any:
                return delta_snapshot(loaded, loaded.seq - 1, model=model_from_checkpoint(loaded))

            took, delta = _timed(publish, profiles["publish_delta_s"])
            runs["publish_delta_s"].append(took)
            delta_users = len(delta.users.ids)
            took, _ = _timed(
                lambda loaded=loaded: TrainerState.from_checkpoint(loaded, state.tcfg), profiles["resume_s"]
            )
            runs["resume_s"].append(took)
            owned = set(loaded.items.ids)
            del loaded

            def row_update() -> Path:  # between full checkpoints: only the rows stamped since the last write
                return checkpoint.save_row_update(tmp, state.to_row_update(state.seq - 1, state.seq - 1))

            took, path = _timed(row_update, profiles["row_update_s"])
            runs["row_update_s"].append(took)
            update_size = path.stat().st_size

            def publish_update(path: Path = path, owned: set[str] = owned) -> Any:
                update = checkpoint.load_row_update(path)
                assert update is not None
                return delta_snapshot(update, update.seq - 1, model=model_from_checkpoint(update), owned=owned)

            took, _ = _timed(publish_update, profiles["publish_row_update_s"])
            runs["publish_row_update_s"].append(took)
            for name, profile in profiles.items():
                if profile is not None:
                    print(f"--- cProfile of {name} (first run) ---", file=sys.stderr)
                    pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(profile_lines)
    return {
        "provenance": run_info,
        "users": users,
        "items": items,
        "history_len": state.model_cfg.history_len,
        "history_entries": state.histories.entries(),
        "hard_negative_requests": len(state.requests),
        "delta_users": delta_users,
        "file_bytes": size,
        "file_mb": round(size / 1e6, 1),
        "build_state_s": round(build_s, 2),
        "median": {name: round(statistics.median(values), 3) for name, values in runs.items()},
        "runs": {name: [round(v, 3) for v in values] for name, values in runs.items()},
        "checkpoint_cycle_s": round(statistics.median(runs["to_checkpoint_s"]) + statistics.median(runs["save_s"]), 3),
        "row_update_bytes": update_size,
        "row_update_path_s": round(
            statistics.median(runs["row_update_s"]) + statistics.median(runs["publish_row_update_s"]), 3
        ),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
    }
