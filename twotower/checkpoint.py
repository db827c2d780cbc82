"""The trainer's checkpoint: its whole state, written atomically, read by the publisher.

One file, ``<state_dir>/checkpoint.pt``, holds the dense weights, both ID tables (with per-row
counts, last-seen event time and the checkpoint sequence number of the last update), the
item content features, the category vocabulary, optimizer state, the user histories the
trainer pools, and the Kafka offsets all of that includes. It is written to a temporary file
and renamed into place, so a reader sees either the old or the new state, never half of
one; the trainer commits its Kafka offsets only after that rename.

It is loaded with ``torch.load(weights_only=True)``: only tensors, numbers, strings, lists
and dicts, nothing that could execute code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
FILENAME = "checkpoint.pt"


@dataclass
class TableState:
    """The live rows of an ID table, in row order."""

    ids: list[str]
    emb: torch.Tensor
    """``[n, id_dim]`` float32 rows."""
    accum: torch.Tensor
    """``[n]`` row-wise Adagrad accumulators."""
    count: torch.Tensor
    """``[n]`` int64 times seen."""
    last_seen_ms: torch.Tensor
    """``[n]`` int64 event time last seen."""
    updated_seq: torch.Tensor
    """``[n]`` int64 checkpoint sequence number of the last change to the row."""
    pending: dict[str, int] = field(default_factory=dict)
    """IDs seen but not admitted yet, with their counts."""


@dataclass
class Checkpoint:
    seq: int
    """Increments at every write."""
    dense_version: int
    """Increments whenever the dense weights change (a nightly retrain)."""
    model_config: dict[str, Any]
    dense: dict[str, torch.Tensor]
    users: TableState
    items: TableState
    item_category: torch.Tensor
    """``[n_items]`` category index of each item row (0 = unknown)."""
    item_content: torch.Tensor
    """``[n_items, content_dim]`` content features of each item row."""
    categories: list[str]
    """Category vocabulary: ``categories[i]`` has index ``i + 1``."""
    removed_items: list[tuple[int, str]]
    """(seq, item id) of items expired, newest last; the publisher turns them into deltas."""
    offsets: dict[str, int]
    """``"topic:partition"`` → next offset to read, covering everything in this state."""
    event_time_ms: int
    """Event-time watermark of the state."""
    histories: dict[str, list[tuple[str, int]]]
    """user id → recent (item id, ts_ms) interactions the trainer pools, oldest first."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Optimizer state, item frequency estimates and other trainer internals."""
    format: int = FORMAT


def path_in(state_dir: str | Path) -> Path:
    return Path(state_dir) / FILENAME


def save(state_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write atomically (temp file + fsync + rename)."""
    target = path_in(state_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp.{os.getpid()}")
    data = asdict(ckpt)
    with open(tmp, "wb") as fh:
        torch.save(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target


def load(state_dir: str | Path) -> Checkpoint | None:
    """The checkpoint in ``state_dir``, or ``None`` if there is none yet.

    Raises:
        ValueError: the file exists but is of another format.
    """
    target = path_in(state_dir)
    if not target.exists():
        return None
    data = torch.load(target, map_location="cpu", weights_only=True)
    if data.get("format") != FORMAT:
        raise ValueError(f"{target}: checkpoint format {data.get('format')!r}, expected {FORMAT}")
    data["users"] = TableState(**data["users"])
    data["items"] = TableState(**data["items"])
    data["removed_items"] = [tuple(x) for x in data["removed_items"]]
    data["histories"] = {u: [tuple(x) for x in h] for u, h in data["histories"].items()}
    return Checkpoint(**data)


def stat_seq(state_dir: str | Path) -> float | None:
    """Modification time of the checkpoint file (cheap change detection), or None."""
    try:
        return path_in(state_dir).stat().st_mtime
    except FileNotFoundError:
        return None
