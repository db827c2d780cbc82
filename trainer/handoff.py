"""Hand-over of a nightly retrain to a streaming trainer that kept running meanwhile.

The nightly job trains a copy of the state. When it finishes while the streaming trainer
holds the state directory, it writes ``nightly-handoff.pt``: the new dense weights and, per
ID row it trained, the *change* it made to that row. The streaming trainer adds those
changes to its own rows (which kept learning from today's events meanwhile) and takes the
new dense weights, so neither side's learning is lost.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from trainer.id_table import IdTable
from trainer.state import TrainerState

log = logging.getLogger(__name__)
FILENAME = "nightly-handoff.pt"


def row_changes(before: IdTable, after: IdTable) -> tuple[list[str], torch.Tensor]:
    """IDs whose rows differ between two tables and ``after - before`` for each (new IDs: the row)."""
    ids, deltas = [], []
    for key, row in after.index.items():
        old = before.row(key)
        delta = after.emb[row] - (before.emb[old] if old >= 0 else 0.0)
        if bool(delta.abs().sum() > 0):
            ids.append(key)
            deltas.append(delta)
    return ids, torch.stack(deltas) if deltas else torch.zeros(0, after.dim)


def write(state_dir: Path, date: str, before: TrainerState, after: TrainerState) -> Path:
    """Write the handoff file atomically."""
    users, user_deltas = row_changes(before.users, after.users)
    items, item_deltas = row_changes(before.items, after.items)
    payload = {
        "date": date,
        "dense": {k: v.detach().clone() for k, v in after.model.state_dict().items()},
        "dense_optimizer": after.dense_optimizer.state_dict(),
        "users": users,
        "user_deltas": user_deltas,
        "items": items,
        "item_deltas": item_deltas,
    }
    target = state_dir / FILENAME
    tmp = target.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, target)
    return target


def apply(state: TrainerState, payload: dict) -> None:
    """Merge a handoff into a running state (pure with respect to files)."""
    seq = state.next_seq
    state.model.load_state_dict(payload["dense"], strict=True)
    state.model.requires_grad_(False)
    state.dense_optimizer.load_state_dict(payload["dense_optimizer"])
    for table, keys, deltas in (
        (state.users, payload["users"], payload["user_deltas"]),
        (state.items, payload["items"], payload["item_deltas"]),
    ):
        for key, delta in zip(keys, deltas, strict=True):
            row = table.row(key)
            if row < 0:
                row = table.add(key, state.event_time_ms, seq)
            table.emb[row] += delta
            table.updated_seq[row] = seq
    state.dense_version += 1
    state.nightly_done.append(payload["date"])


def merge_pending(state: TrainerState, state_dir: Path) -> bool:
    """Apply a waiting handoff file, if any; True if one was applied."""
    path = state_dir / FILENAME
    if not path.exists():
        return False
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["date"] in state.nightly_done:
        log.info("nightly %s already merged; discarding its handoff", payload["date"])
    else:
        apply(state, payload)
        log.info("merged nightly retrain of %s (dense version %d)", payload["date"], state.dense_version)
    os.replace(path, path.with_suffix(".applied"))
    return True
