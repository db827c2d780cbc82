"""Hand-over of a nightly retrain to a streaming trainer that kept running meanwhile.

The nightly job trains a copy of the state. When it finishes while the streaming trainer
holds the state directory, it writes ``nightly-handoff.pt``: the new dense weights and, per
ID row it trained, the *change* it made to that row (and to the row's Adagrad accumulator).
The streaming trainer adds those changes to its own rows (which kept learning from today's
events meanwhile) and takes the new dense weights, so neither side's learning is lost.

**The nightly base** (``trainer.nightly_from_base``). The streaming trainer learns every click
once as it arrives; the nightly retrain learns the day again. Started from the streaming state,
the nightly would teach each ID row the day's clicks twice (on logs with day-level timestamps,
where no streaming update is visible before the day ends, that is all streaming adds). So the
nightly job keeps the rows it produced, ``nightly-base.pt`` (rows and accumulators, tagged with
the date retrained), and the next night starts from them: every row is reset to its base value
(a row the base does not hold to a new row's zeros) before the retrain. The hand-over is the
same ``after - before`` change, so the merged rows are *the nightly's result plus what streaming
learned after the nightly read its start state*: each click is learned once by the nightly, and
streaming is the within-day correction on top of it. Streaming changes made between midnight and
the nightly's start are dropped with yesterday's (those clicks are in tomorrow's retrain).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from trainer.id_table import IdTable
from trainer.state import TrainerState

log = logging.getLogger(__name__)
FILENAME = "nightly-handoff.pt"
BASE_FILENAME = "nightly-base.pt"
PREVIOUS_BASE_FILENAME = "nightly-base.previous.pt"


def row_changes(before: IdTable, after: IdTable) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """IDs whose rows (or accumulators) differ between two tables, with ``after - before`` of the
    rows and of the accumulators (an ID new in ``after``: its row and accumulator)."""
    keys, rows_after = after.live_rows()
    if not keys:
        return [], torch.zeros(0, after.dim), torch.zeros(0)
    rows_before = before.rows(keys)
    known = rows_before >= 0
    emb = after.emb[rows_after].clone()
    accum = after.accum[rows_after].clone()
    emb[known] -= before.emb[rows_before[known]]
    accum[known] -= before.accum[rows_before[known]]
    changed = (emb.abs().sum(dim=1) > 0) | (accum != 0)
    picked = changed.nonzero().flatten()
    return [keys[i] for i in picked.tolist()], emb[picked], accum[picked]


def write(state_dir: Path, date: str, before: TrainerState, after: TrainerState) -> Path:
    """Write the handoff file atomically."""
    users, user_deltas, user_accum = row_changes(before.users, after.users)
    items, item_deltas, item_accum = row_changes(before.items, after.items)
    payload = {
        "date": date,
        "base_dense_version": before.dense_version,
        "dense": {k: v.detach().clone() for k, v in after.model.state_dict().items()},
        "dense_optimizer": after.dense_optimizer.state_dict(),
        "users": users,
        "user_deltas": user_deltas,
        "user_accum_deltas": user_accum,
        "items": items,
        "item_deltas": item_deltas,
        "item_accum_deltas": item_accum,
    }
    return _save(state_dir / FILENAME, payload)


def _save(target: Path, payload: dict[str, Any]) -> Path:
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
    for table, keys, deltas, accum in (
        (state.users, payload["users"], payload["user_deltas"], payload.get("user_accum_deltas")),
        (state.items, payload["items"], payload["item_deltas"], payload.get("item_accum_deltas")),
    ):
        if not keys:
            continue
        rows = torch.tensor([table.add(key, state.event_time_ms, seq) for key in keys], dtype=torch.int64)
        table.emb[rows] += deltas
        if accum is not None:  # handoffs written before accumulators were handed over have none
            table.accum[rows] = (table.accum[rows] + accum).clamp_(min=0.0)
        table.updated_seq[rows] = seq
    state.dense_version += 1
    state.nightly_trained(payload["date"])


def merge_pending(state: TrainerState, state_dir: Path) -> bool:
    """Apply a waiting handoff file, if any; True if one was handled (merged or discarded).

    The file stays until :func:`retire`, which the caller calls once a checkpoint holding the
    merge is saved: a crash in between merges it again from the older checkpoint, where renaming
    it first lost the retrain for good.

    A handoff is discarded when its date is already merged, or when the state's dense weights
    are no longer those the nightly started from (``base_dense_version``): a later retrain owned
    the state meanwhile (:func:`trainer.nightly.run_nightly` merges a waiting handoff before it
    retrains, so this is a handoff written after that), and merging would put older dense
    weights over newer ones and add row changes the state already holds."""
    path = state_dir / FILENAME
    if not path.exists():
        return False
    payload = torch.load(path, map_location="cpu", weights_only=True)
    base = payload.get("base_dense_version", state.dense_version)  # older handoffs have none
    if payload["date"] in state.nightly_done:
        log.info("nightly %s already merged; discarding its handoff", payload["date"])
    elif base != state.dense_version:
        log.warning(
            "nightly %s retrained dense version %d but the state is at %d; discarding its handoff",
            payload["date"],
            base,
            state.dense_version,
        )
    else:
        apply(state, payload)
        log.info("merged nightly retrain of %s (dense version %d)", payload["date"], state.dense_version)
    return True


def retire(state_dir: Path) -> None:
    """Set the handoff aside (``.applied``) once a checkpoint holds what :func:`merge_pending` did
    with it; a nightly run beside a streaming trainer waits for this (:func:`pending`)."""
    path = state_dir / FILENAME
    if path.exists():
        os.replace(path, path.with_suffix(".applied"))


def pending(state_dir: Path) -> bool:
    """Whether a handoff waits to be merged and checkpointed."""
    return (state_dir / FILENAME).exists()


# --- the nightly base ------------------------------------------------------------------------------


def base_of(state: TrainerState, date: str) -> dict[str, Any]:
    """The rows and accumulators of ``state`` (a nightly's result), tagged with the date it retrained."""
    out: dict[str, Any] = {"date": date}
    for name, table in (("users", state.users), ("items", state.items)):
        keys, rows = table.live_rows()
        out[name] = {"ids": keys, "emb": table.emb[rows].clone(), "accum": table.accum[rows].clone()}
    return out


def write_base(state_dir: Path, base: dict[str, Any]) -> Path:
    """Keep ``base`` as the newest base; the one it replaces stays as the previous base, so that a
    rerun of the same date (a crash before its hand-over, or ``--force``) starts from the base before it."""
    current = state_dir / BASE_FILENAME
    tmp = current.with_suffix(".tmp")
    torch.save(base, tmp)
    if current.exists():
        os.replace(current, state_dir / PREVIOUS_BASE_FILENAME)
    os.replace(tmp, current)
    return current


def load_base(state_dir: Path, before_date: str) -> dict[str, Any] | None:
    """The newest stored base of a date before ``before_date`` (ISO dates compare as strings), or None."""
    for name in (BASE_FILENAME, PREVIOUS_BASE_FILENAME):
        path = state_dir / name
        if not path.exists():
            continue
        base = torch.load(path, map_location="cpu", weights_only=True)
        if base["date"] < before_date:
            return base
    return None


def rebase(state: TrainerState, base: dict[str, Any]) -> int:
    """Reset every live row of ``state`` to its value in ``base`` (a row the base does not hold:
    to a new row's zeros, accumulator too); returns how many rows changed."""
    changed = 0
    seq = state.next_seq
    for table, part in ((state.users, base["users"]), (state.items, base["items"])):
        keys, rows = table.live_rows()
        if not keys:
            continue
        position = {key: i for i, key in enumerate(part["ids"])}
        where = torch.tensor([position.get(key, -1) for key in keys], dtype=torch.int64)
        known = where >= 0
        emb = torch.zeros(len(keys), table.dim)
        accum = torch.zeros(len(keys))
        emb[known] = part["emb"][where[known]]
        accum[known] = part["accum"][where[known]]
        moved = ((table.emb[rows] != emb).any(dim=1) | (table.accum[rows] != accum)).nonzero().flatten()
        if moved.numel():
            target = rows[moved]
            table.emb[target] = emb[moved]
            table.accum[target] = accum[moved]
            table.updated_seq[target] = seq
            changed += int(moved.numel())
    return changed
