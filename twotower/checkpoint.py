"""The trainer's checkpoint: its whole state, written atomically, read by the publisher.

One file, ``<state_dir>/checkpoint.pt``, holds the dense weights, both ID tables (with per-row
counts, last-seen event time and the checkpoint sequence number of the last update), the
item content features, the category vocabulary, optimizer state, the catalogue, the user
profiles, the user histories the trainer pools, the hard-negative memory, and the Kafka
offsets all of that includes. It is written to a temporary file, fsynced and renamed into
place, so a reader sees either the old or the new state, never half of one; the trainer
commits its Kafka offsets only after that rename. Between full checkpoints of a big state the
trainer writes *row updates* beside it (``row-updates/<seq>.pt``, see :func:`save_row_update`):
partial checkpoints of the rows changed since its last write, for the publisher only.

It is loaded with ``torch.load(weights_only=True)``: only tensors, numbers, strings, lists
and dicts, nothing that could execute code. Since format 2 everything bulky is a handful of
tensors (see :mod:`twotower.columns`): string lists as UTF-8 bytes, requests as ragged
string columns, profiles and the catalogue as matrices. Format 1 pickled them as Python
objects (a dict of a million tuples, a tensor per user), which made a checkpoint of 100k users
take tens of seconds each way. Format 3 (now) writes the histories' item ids as int32 codes
into a vocabulary instead of 20M strings, int64 columns as int32 offsets from a base when they
fit, and the item rows' category and content as positions into the catalogue (not a second
copy of its features): at 1M users the file shrinks by a third and nothing per history entry
is a Python object on either side. Format-1 and format-2 files still load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain, pairwise
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.columns import Ragged, pack_strings, unpack_strings

FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
FILENAME = "checkpoint.pt"
ROW_UPDATES_DIR = "row-updates"
_ROW_UPDATE = re.compile(r"[0-9]{12}\.pt")


@dataclass(eq=False)
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


@dataclass(eq=False)
class Histories:
    """Every user's pooled history, oldest first, flat: user ``users[k]`` owns the entries
    ``offsets[k]:offsets[k + 1]``; entry ``j`` is item ``vocab[codes[j]]`` at event time
    ``ts_base + ts_offsets[j]`` (:attr:`ts_ms`).

    Item ids are coded against a vocabulary (each distinct item once) so that the millions of
    entries travel as two numeric vectors: nothing per entry is a Python object on the way to
    or from disk.
    """

    users: list[str]
    offsets: torch.Tensor
    """``[len(users) + 1]`` int64, from 0 to the number of entries."""
    vocab: list[str]
    codes: torch.Tensor
    """int32 index into ``vocab`` of each entry."""
    ts_offsets: torch.Tensor
    """Event time of each entry minus ``ts_base``: int32 (the trainer keeps them so while they
    span less than 2³² ms) or int64."""
    ts_base: int = 0

    @property
    def ts_ms(self) -> torch.Tensor:
        """int64 event time of each entry."""
        return self.ts_offsets.to(torch.int64) + self.ts_base

    @classmethod
    def empty(cls) -> Histories:
        return cls([], torch.zeros(1, dtype=torch.int64), [], torch.zeros(0, dtype=torch.int32), _no_ts())

    @classmethod
    def from_dict(cls, histories: Mapping[str, Iterable[tuple[str, int]]]) -> Histories:
        """From user → (item id, ts_ms) pairs (a list or deque per user)."""
        users = list(histories)
        lists = [list(h) for h in histories.values()]
        flat = list(chain.from_iterable(lists))
        ts_ms = np.fromiter(map(itemgetter(1), flat), dtype=np.int64, count=len(flat))
        return cls._coded(users, map(len, lists), list(map(itemgetter(0), flat)), torch.from_numpy(ts_ms))

    @classmethod
    def from_ragged(cls, items: Ragged, ts_ms: torch.Tensor) -> Histories:
        """From the format-2 columns: the item ids as strings."""
        lengths = (items.offsets[1:] - items.offsets[:-1]).tolist()
        return cls._coded(items.keys, lengths, items.flat(), ts_ms)

    @classmethod
    def _coded(cls, users: list[str], lengths: Iterable[int], items: list[str], ts_ms: torch.Tensor) -> Histories:
        offsets = np.zeros(len(users) + 1, dtype=np.int64)
        offsets[1:] = np.fromiter(lengths, dtype=np.int64, count=len(users))
        np.cumsum(offsets, out=offsets)
        if int(offsets[-1]) != len(items):
            raise ValueError(f"lengths sum to {int(offsets[-1])} but there are {len(items)} entries")
        index: dict[str, int] = {}
        codes = np.fromiter((index.setdefault(i, len(index)) for i in items), dtype=np.int32, count=len(items))
        return cls(users, torch.from_numpy(offsets), list(index), torch.from_numpy(codes), ts_ms)

    def __len__(self) -> int:
        return len(self.users)

    def check(self, what: str = "histories") -> None:
        """Raises ValueError unless offsets, codes and times fit each other."""
        off, codes, n = self.offsets, self.codes, len(self.users)
        if not isinstance(off, torch.Tensor) or off.dtype != torch.int64 or off.shape != (n + 1,):
            raise ValueError(f"{what}: offsets do not fit {n} users")
        bounds = off.numpy()  # numpy for the checks: single-threaded, no hand-off on a busy machine
        entries = int(bounds[-1])
        if int(bounds[0]) != 0 or bool((bounds[1:] < bounds[:-1]).any()):
            raise ValueError(f"{what}: offsets are not ascending from 0")
        if not isinstance(codes, torch.Tensor) or codes.ndim != 1 or codes.shape[0] != entries:
            raise ValueError(f"{what}: codes are not {entries} entries")
        if entries and (int(codes.numpy().min()) < 0 or int(codes.numpy().max()) >= len(self.vocab)):
            raise ValueError(f"{what}: codes outside the vocabulary of {len(self.vocab)}")
        ts = self.ts_offsets
        if not isinstance(ts, torch.Tensor) or ts.dtype not in (torch.int32, torch.int64) or ts.shape != (entries,):
            raise ValueError(f"{what}: times are not {entries} int32 or int64 entries")

    def pairs(self) -> Iterable[tuple[str, list[tuple[str, int]]]]:
        """(user, its (item id, ts_ms) pairs), in user order."""
        vocab = self.vocab
        pairs = list(zip(map(vocab.__getitem__, self.codes.tolist()), self.ts_ms.tolist(), strict=True))
        return zip(self.users, (pairs[a:b] for a, b in pairwise(self.offsets.tolist())), strict=True)

    def as_dict(self) -> dict[str, list[tuple[str, int]]]:
        return dict(self.pairs())


def _no_ts() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.int64)


@dataclass(eq=False)
class Profiles:
    """User profile features: ``features[i]`` belongs to ``ids[i]``."""

    ids: list[str]
    features: torch.Tensor
    """``[n, profile_dim]`` float32."""

    @classmethod
    def empty(cls, dim: int = 0) -> Profiles:
        return cls([], torch.zeros(0, dim))


@dataclass(eq=False)
class Catalog:
    """Every catalogue item the trainer knows (also those without an ID row)."""

    ids: list[str]
    category: torch.Tensor
    """``[n]`` int64 category index."""
    content: torch.Tensor
    """``[n, content_dim]`` float32 content features."""

    @classmethod
    def empty(cls, dim: int = 0) -> Catalog:
        return cls([], torch.zeros(0, dtype=torch.int64), torch.zeros(0, dim))


@dataclass(eq=False)
class HardNegatives:
    """The recent requests (oldest first) with their shown and retrieved-but-not-shown items,
    and how often each item was recorded as retrieved-but-not-shown."""

    shown: Ragged
    """Request id → shown items (sorted)."""
    not_shown: Ragged
    """Request id (same keys as ``shown``) → retrieved-but-not-shown items, in insertion order."""
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> HardNegatives:
        return cls(Ragged.empty(), Ragged.empty(), {})


@dataclass(eq=False)
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
    histories: Histories = field(default_factory=Histories.empty)
    """Recent (item id, ts_ms) interactions the trainer pools per user, oldest first (a mapping
    user → pairs is converted)."""
    history_overflow: Histories = field(default_factory=Histories.empty)
    """Entries the histories no longer hold that a nightly retrain may still need, oldest first:
    clicks from before a day that later clicks pushed out (``TrainerState.history_overflow``).
    An optional key of format-3 files: those written before it load with none."""
    profiles: Profiles = field(default_factory=Profiles.empty)
    catalog: Catalog = field(default_factory=Catalog.empty)
    hard_negatives: HardNegatives = field(default_factory=HardNegatives.empty)
    extra: dict[str, Any] = field(default_factory=dict)
    """Optimizer state, category index, nightly bookkeeping and other trainer internals."""
    format: int = FORMAT
    item_catalog_row: torch.Tensor | None = None
    """``[n_items]`` int64 position in ``catalog`` of each item row's entry (-1: none), when
    ``item_category`` and ``item_content`` are exactly those entries' (zeros for -1): the file
    then holds this column instead of a second copy of the catalogue's features."""
    base_seq: int | None = None
    """Set on a *row update* (see :func:`save_row_update`): the ``seq`` of the full checkpoint it
    follows. A row update holds only the ID rows changed after the checkpoint or row update
    before it, their items' category and content, the removals after it, the dense weights and
    the category vocabulary; its histories, profiles, catalogue, hard negatives, extra and
    offsets are empty."""

    def __post_init__(self) -> None:
        if isinstance(self.histories, Mapping):
            self.histories = Histories.from_dict(self.histories)
        if isinstance(self.history_overflow, Mapping):
            self.history_overflow = Histories.from_dict(self.history_overflow)


def path_in(state_dir: str | Path) -> Path:
    return Path(state_dir) / FILENAME


def save(state_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write atomically (temp file + fsync + rename, then fsync of the directory)."""
    target = path_in(state_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.tmp.{os.getpid()}")  # the pattern _remove_temp_files removes
    data = encode(ckpt)
    try:
        with open(tmp, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    prune_row_updates(state_dir)  # one writer: every row update on disk predates this state
    _remove_temp_files(state_dir)
    return target


def _remove_temp_files(state_dir: str | Path) -> None:
    """Delete the temporary files of writers that died before renaming them (a forced exit):
    with one writer, any left beside a checkpoint just written is one of those."""
    left = [*Path(state_dir).glob(f"{Path(FILENAME).stem}.tmp.*"), *row_updates_dir(state_dir).glob(".*.tmp.*")]
    for path in left:
        path.unlink(missing_ok=True)


def load(state_dir: str | Path) -> Checkpoint | None:
    """The checkpoint in ``state_dir``, or ``None`` if there is none yet.

    Raises:
        ValueError: the file exists but is of an unknown format or inconsistent.
    """
    target = path_in(state_dir)
    if not target.exists():
        return None
    return _read(target)


def _read(target: Path) -> Checkpoint:
    data = torch.load(target, map_location="cpu", weights_only=True)
    fmt = data.get("format") if isinstance(data, dict) else None
    try:
        if fmt in (2, FORMAT):
            return decode(data)
        if fmt == 1:
            return _from_format_1(data)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{target}: malformed checkpoint of format {fmt}: {exc!r}") from None
    raise ValueError(f"{target}: checkpoint format {fmt!r}, expected one of {READABLE_FORMATS}")


# --- row updates --------------------------------------------------------------------------------
# A full checkpoint of a million users takes seconds to write and as long to read, so the streaming
# trainer spaces them out (``trainer.checkpoint_max_share``). In between it writes *row updates*:
# partial checkpoints (``base_seq`` set) of only the rows changed since the previous write, named
# by their ``seq`` in ``<state_dir>/row-updates/``, which the publisher turns into delta versions.
# They are not a resume point: a restart resumes from the full checkpoint and its offsets (Kafka
# replays what came after), so they are written without fsync, and a full checkpoint deletes them
# all (one writer holds the state dir: every row update on disk predates the full state).


def row_updates_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / ROW_UPDATES_DIR


def save_row_update(state_dir: str | Path, update: Checkpoint) -> Path:
    """Write a row update (temp file + rename: a reader sees all of it or nothing)."""
    if update.base_seq is None:
        raise ValueError("a row update needs the base_seq of the full checkpoint it follows")
    folder = row_updates_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{update.seq:012d}.pt"
    tmp = folder / f".{update.seq:012d}.tmp.{os.getpid()}"  # the pattern _remove_temp_files removes
    try:
        torch.save(encode(update), tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def row_updates(state_dir: str | Path) -> list[tuple[int, Path]]:
    """``(seq, path)`` of the row updates on disk, oldest first."""
    try:
        names = os.listdir(row_updates_dir(state_dir))
    except FileNotFoundError:
        return []
    found = [(int(name[:-3]), row_updates_dir(state_dir) / name) for name in names if _ROW_UPDATE.fullmatch(name)]
    return sorted(found)


def load_row_update(path: Path) -> Checkpoint | None:
    """A row update, or ``None`` if it is gone (a full checkpoint superseded it meanwhile).

    Raises:
        ValueError: the file is not a row update.
    """
    try:
        update = _read(path)
    except FileNotFoundError:
        return None
    if update.base_seq is None:
        raise ValueError(f"{path}: not a row update (no base_seq)")
    return update


def prune_row_updates(state_dir: str | Path) -> int:
    """Delete every row update; how many there were."""
    found = row_updates(state_dir)
    for _, path in found:
        path.unlink(missing_ok=True)
    return len(found)


# --- format 2 ---------------------------------------------------------------------------------
def _encode_counts(counts: Mapping[str, int]) -> dict[str, Any]:
    return {
        "ids": pack_strings(list(counts)),
        "counts": torch.from_numpy(np.fromiter(counts.values(), dtype=np.int64, count=len(counts))),
    }


def _decode_counts(data: Any, what: str) -> dict[str, int]:
    ids = unpack_strings(data["ids"], f"{what}.ids")
    counts = _tensor(data["counts"], what, rows=len(ids))
    return dict(zip(ids, counts.tolist(), strict=True))


def _tensor(value: Any, what: str, rows: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what}: not a tensor")
    if rows is not None and (value.ndim == 0 or value.shape[0] != rows):
        raise ValueError(f"{what}: {tuple(value.shape)} does not have {rows} rows")
    return value


def encode(ckpt: Checkpoint) -> dict[str, Any]:
    """The dict written to disk: tensors, numbers, short strings and small containers only."""

    def table(t: TableState) -> dict[str, Any]:
        return {
            "ids": pack_strings(t.ids),
            "emb": t.emb,
            "accum": t.accum,
            "count": _encode_int64(t.count),
            "last_seen_ms": _encode_int64(t.last_seen_ms),
            "updated_seq": _encode_int64(t.updated_seq),
            "pending": _encode_counts(t.pending),
        }

    removed_seq = np.fromiter((s for s, _ in ckpt.removed_items), dtype=np.int64, count=len(ckpt.removed_items))
    hard = ckpt.hard_negatives
    return {
        "format": FORMAT,
        "seq": ckpt.seq,
        "dense_version": ckpt.dense_version,
        "model_config": ckpt.model_config,
        "dense": ckpt.dense,
        "users": table(ckpt.users),
        "items": table(ckpt.items),
        **_encode_item_side(ckpt),
        "categories": pack_strings(ckpt.categories),
        "removed_items": {
            "seq": torch.from_numpy(removed_seq),
            "ids": pack_strings([item for _, item in ckpt.removed_items]),
        },
        "offsets": ckpt.offsets,
        "event_time_ms": ckpt.event_time_ms,
        "histories": _encode_histories(ckpt.histories),
        "history_overflow": _encode_histories(ckpt.history_overflow),
        "profiles": {"ids": pack_strings(ckpt.profiles.ids), "features": ckpt.profiles.features},
        "catalog": {
            "ids": pack_strings(ckpt.catalog.ids),
            "category": ckpt.catalog.category,
            "content": ckpt.catalog.content,
        },
        "hard_negatives": {
            "shown": hard.shown.encode(),
            "not_shown": hard.not_shown.encode(),
            "counts": _encode_counts(hard.counts),
        },
        "extra": ckpt.extra,
        **({} if ckpt.base_seq is None else {"base_seq": ckpt.base_seq}),
    }


def decode(data: dict[str, Any]) -> Checkpoint:
    """A :class:`Checkpoint` from what :func:`encode` wrote, its columns checked for consistency.

    Raises:
        ValueError: a column is missing, of the wrong kind or does not fit its ids.
    """

    def table(d: Any, what: str) -> TableState:
        ids = unpack_strings(d["ids"], f"{what}.ids")
        n = len(ids)
        cols = {name: _decode_int64(d[name], f"{what}.{name}", n) for name in TABLE_COLUMNS}
        return TableState(ids=ids, **cols, pending=_decode_counts(d["pending"], f"{what}.pending"))

    users, items = table(data["users"], "users"), table(data["items"], "items")
    removed = data["removed_items"]
    removed_ids = unpack_strings(removed["ids"], "removed_items.ids")
    removed_seq = _tensor(removed["seq"], "removed_items.seq", len(removed_ids)).tolist()
    profile_ids = unpack_strings(data["profiles"]["ids"], "profiles.ids")
    catalog = Catalog(
        unpack_strings(data["catalog"]["ids"], "catalog.ids"),
        _tensor(data["catalog"]["category"], "catalog.category"),
        _tensor(data["catalog"]["content"], "catalog.content"),
    )
    for name in ("category", "content"):
        _tensor(getattr(catalog, name), f"catalog.{name}", len(catalog.ids))
    item_category, item_content, item_catalog_row = _decode_item_side(data, catalog, len(items.ids))
    hard = data["hard_negatives"]
    shown, not_shown = Ragged.decode(hard["shown"], "shown"), Ragged.decode(hard["not_shown"], "not_shown")
    if shown.keys != not_shown.keys:
        raise ValueError("hard_negatives: shown and not_shown name different requests")
    return Checkpoint(
        seq=int(data["seq"]),
        dense_version=int(data["dense_version"]),
        model_config=dict(data["model_config"]),
        dense=dict(data["dense"]),
        users=users,
        items=items,
        item_category=item_category,
        item_content=item_content,
        categories=unpack_strings(data["categories"], "categories"),
        removed_items=list(zip(removed_seq, removed_ids, strict=True)),
        offsets=dict(data["offsets"]),
        event_time_ms=int(data["event_time_ms"]),
        histories=_decode_histories(data["histories"], data["format"]),
        history_overflow=(
            _decode_histories(data["history_overflow"], data["format"], "history_overflow")
            if "history_overflow" in data
            else Histories.empty()
        ),
        profiles=Profiles(profile_ids, _tensor(data["profiles"]["features"], "profiles.features", len(profile_ids))),
        catalog=catalog,
        hard_negatives=HardNegatives(shown, not_shown, _decode_counts(hard["counts"], "hard_negatives.counts")),
        extra=dict(data["extra"]),
        item_catalog_row=item_catalog_row,
        base_seq=None if data.get("base_seq") is None else int(data["base_seq"]),
    )


TABLE_COLUMNS = ("emb", "accum", "count", "last_seen_ms", "updated_seq")

INT32_SPAN = 2**32


def _encode_int64(column: torch.Tensor) -> torch.Tensor | dict[str, Any]:
    """An int64 column as int32 offsets from a base when its values span less than 2³²
    (event times within 49 days, counts, sequence numbers): half the bytes; else as it is."""
    values = column.numpy()  # numpy: single-threaded, no thread-pool hand-off on a busy machine
    if values.size:
        low = int(values.min())
        if int(values.max()) - low < INT32_SPAN:
            base = low + INT32_SPAN // 2
            return {"base": base, "int32": torch.from_numpy((values - base).astype(np.int32))}
    return column


def _decode_int64(value: Any, what: str, rows: int | None = None, widen: bool = True) -> torch.Tensor:
    """The column :func:`_encode_int64` wrote, as int64 (``widen=False``: only checked; the
    int32 offsets are returned)."""
    if isinstance(value, dict):
        base, narrow = value.get("base"), value.get("int32")
        if set(value) != {"base", "int32"} or not isinstance(base, int):
            raise ValueError(f"{what}: not an int32-offset column")
        narrow = _tensor(narrow, what, rows)
        if narrow.dtype != torch.int32:
            raise ValueError(f"{what}: offsets are not int32")
        return torch.from_numpy(narrow.numpy().astype(np.int64) + base) if widen else narrow
    return _tensor(value, what, rows)


def _encode_item_side(ckpt: Checkpoint) -> dict[str, Any]:
    if ckpt.item_catalog_row is None:
        return {"item_category": ckpt.item_category, "item_content": ckpt.item_content}
    return {"item_catalog_row": ckpt.item_catalog_row.to(torch.int32)}


def _decode_item_side(
    data: dict[str, Any], catalog: Catalog, n_items: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Category and content of each item row: as written, or gathered from the catalogue."""
    if "item_catalog_row" not in data:
        return _tensor(data["item_category"], "item_category"), _tensor(data["item_content"], "item_content"), None
    rows = _tensor(data["item_catalog_row"], "item_catalog_row", n_items)
    if rows.dtype != torch.int32 or (
        n_items and (int(rows.numpy().min()) < -1 or int(rows.numpy().max()) >= len(catalog.ids))
    ):
        raise ValueError(f"item_catalog_row: not int32 positions in a catalogue of {len(catalog.ids)}")
    rows = rows.to(torch.int64)
    category, content = gather_rows(catalog, rows)
    return category, content, rows


def gather_rows(catalog: Catalog, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Category and content of the catalogue entries at ``rows`` (zeros where -1)."""
    known = rows >= 0
    if bool(known.all()):
        return catalog.category.index_select(0, rows), catalog.content.index_select(0, rows)
    category = torch.zeros(rows.shape[0], dtype=catalog.category.dtype)
    content = torch.zeros((rows.shape[0], *catalog.content.shape[1:]), dtype=catalog.content.dtype)
    category[known] = catalog.category[rows[known]]
    content[known] = catalog.content[rows[known]]
    return category, content


def _encode_histories(hist: Histories) -> dict[str, Any]:
    out: dict[str, Any] = {
        "users": pack_strings(hist.users),
        "offsets": hist.offsets,
        "vocab": pack_strings(hist.vocab),
        "codes": hist.codes.to(torch.int32),
    }
    if hist.ts_offsets.dtype == torch.int32:
        out["ts_ms"] = {"base": hist.ts_base, "int32": hist.ts_offsets}
    else:
        out["ts_ms"] = _encode_int64(hist.ts_ms)
    return out


def _decode_histories(data: Any, fmt: int, what: str = "histories") -> Histories:
    if fmt == 2:  # the item ids as a ragged string column
        items = Ragged.decode(data["items"], f"{what}.items")
        return Histories.from_ragged(items, _tensor(data["ts_ms"], f"{what}.ts_ms", len(items.values)))
    ts, base = data["ts_ms"], 0
    if isinstance(ts, dict):  # kept narrow: the publisher never reads the times
        _decode_int64(ts, f"{what}.ts_ms", rows=None, widen=False)
        ts, base = ts["int32"], ts["base"]
    codes = _tensor(data["codes"], f"{what}.codes")
    if codes.dtype != torch.int32:
        raise ValueError(f"{what}: codes are not int32")
    hist = Histories(
        unpack_strings(data["users"], f"{what}.users"),
        _tensor(data["offsets"], f"{what}.offsets"),
        unpack_strings(data["vocab"], f"{what}.vocab"),
        codes,
        _tensor(ts, f"{what}.ts_ms"),
        base,
    )
    hist.check(what)
    return hist


# --- format 1 ---------------------------------------------------------------------------------
def _from_format_1(data: dict[str, Any]) -> Checkpoint:
    """A format-1 checkpoint (everything pickled as Python objects, profiles, catalogue and hard
    negatives inside ``extra``) in today's form."""
    extra = dict(data["extra"])
    profiles = extra.pop("profiles", {})
    profile_dim = int(data["model_config"].get("profile_dim", 0))
    content_dim = int(data["model_config"].get("content_dim", 0))
    catalog_ids = list(extra.pop("catalog_ids", []))
    catalog_category = extra.pop("catalog_category", torch.zeros(0, dtype=torch.int64))
    catalog_content = extra.pop("catalog_content", torch.zeros(0, content_dim))
    requests = extra.pop("hard_negative_requests", {})
    keys = list(requests)
    hard = HardNegatives(
        Ragged.from_lists(keys, [list(v[0]) for v in requests.values()]),
        Ragged.from_lists(keys, [list(v[1]) for v in requests.values()]),
        dict(extra.pop("hard_negative_counts", {})),
    )
    return Checkpoint(
        seq=data["seq"],
        dense_version=data["dense_version"],
        model_config=data["model_config"],
        dense=data["dense"],
        users=TableState(**data["users"]),
        items=TableState(**data["items"]),
        item_category=data["item_category"],
        item_content=data["item_content"],
        categories=list(data["categories"]),
        removed_items=[(int(s), i) for s, i in data["removed_items"]],
        offsets=data["offsets"],
        event_time_ms=data["event_time_ms"],
        histories=Histories.from_dict({u: [(i, int(t)) for i, t in h] for u, h in data["histories"].items()}),
        profiles=Profiles(
            list(profiles),
            torch.stack([p.float() for p in profiles.values()]) if profiles else torch.zeros(0, profile_dim),
        ),
        catalog=Catalog(catalog_ids, catalog_category, catalog_content),
        hard_negatives=hard,
        extra=extra,
    )


def stat_seq(state_dir: str | Path) -> float | None:
    """Modification time of the checkpoint file (cheap change detection), or None."""
    try:
        return path_in(state_dir).stat().st_mtime
    except FileNotFoundError:
        return None
