"""Growing ID-embedding tables: one row per admitted ID, no hashing, no collisions.

An ID gets a row once it has been seen ``admission_min_count`` times (one-off IDs stay out);
new rows start at zero, so a new item's vector comes from its content and a new user's from
profile and history until training moves the row. Rows unseen for a while expire and their
slots are reused. Row-wise Adagrad state lives beside the rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from twotower.checkpoint import TableState


class IdTable:
    """String ID → row of a growable ``[capacity, dim]`` float32 tensor.

    Args:
        dim: row width.
        admission_min_count: observations needed before an ID gets a row.
        capacity: initial number of slots (doubles when full).
        max_pending: IDs seen but not admitted yet that are remembered; beyond it the ones
            seen least recently are forgotten (a stream of one-off IDs must not grow memory
            without bound, which admission is there to save).
    """

    def __init__(
        self, dim: int, admission_min_count: int = 1, capacity: int = 1024, max_pending: int = 1_000_000
    ) -> None:
        if admission_min_count < 1:
            raise ValueError("admission_min_count must be >= 1")
        self.dim = dim
        self.admission_min_count = admission_min_count
        self.max_pending = max_pending
        self.ids: list[str | None] = []
        self.index: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.free: list[int] = []
        capacity = max(capacity, 1)
        self.emb = torch.zeros(capacity, dim)
        self.accum = torch.zeros(capacity)
        self.count = torch.zeros(capacity, dtype=torch.int64)
        self.last_seen_ms = torch.zeros(capacity, dtype=torch.int64)
        self.updated_seq = torch.zeros(capacity, dtype=torch.int64)

    # --- size ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.index

    @property
    def capacity(self) -> int:
        return self.emb.shape[0]

    def memory_bytes(self) -> int:
        """Bytes held by the row storage and its per-row state."""
        tensors = (self.emb, self.accum, self.count, self.last_seen_ms, self.updated_seq)
        return sum(t.element_size() * t.nelement() for t in tensors)

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((new_cap, *t.shape[1:]), dtype=t.dtype)
            out[: t.shape[0]] = t
            return out

        self.emb, self.accum = grow(self.emb), grow(self.accum)
        self.count, self.last_seen_ms, self.updated_seq = (
            grow(self.count),
            grow(self.last_seen_ms),
            grow(self.updated_seq),
        )

    # --- lookup and admission ----------------------------------------------------------
    def row(self, key: str) -> int:
        """The row of ``key``, or -1."""
        return self.index.get(key, -1)

    def rows(self, keys: list[str]) -> torch.Tensor:
        """Rows of ``keys`` as int64, -1 where unknown."""
        get = self.index.get
        return torch.tensor([get(k, -1) for k in keys], dtype=torch.int64)

    def add(self, key: str, ts_ms: int = 0, seq: int = 0) -> int:
        """Give ``key`` a row now (no admission check); returns the row."""
        row = self.index.get(key)
        if row is not None:
            return row
        if self.free:
            row = self.free.pop()
        else:
            row = len(self.ids)
            self._grow(row + 1)
            self.ids.append(None)
        self.ids[row] = key
        self.index[key] = row
        self.emb[row] = 0.0
        self.accum[row] = 0.0
        self.count[row] = self.pending.pop(key, 0)
        self.last_seen_ms[row] = ts_ms
        self.updated_seq[row] = seq
        return row

    def sightings(self, key: str) -> int:
        """How many times :meth:`observe` counted ``key`` (since its row was last freed; 0 for a key
        it does not know, or one forgotten before admission)."""
        row = self.index.get(key)
        return int(self.count[row]) if row is not None else self.pending.get(key, 0)

    def observe(self, key: str, ts_ms: int, seq: int) -> int:
        """Count one sighting of ``key``; admit it when it reaches the threshold.

        Returns:
            Its row, or -1 while it is not admitted.
        """
        row = self.index.get(key)
        if row is None:
            seen = self.pending.pop(key, 0) + 1  # popped and put back: the dict is in order of last sighting
            if seen < self.admission_min_count:
                self.pending[key] = seen
                if len(self.pending) > self.max_pending:
                    del self.pending[next(iter(self.pending))]
                return -1
            self.pending[key] = seen - 1
            row = self.add(key, ts_ms, seq)
        self.count[row] += 1
        if ts_ms > self.last_seen_ms[row]:
            self.last_seen_ms[row] = ts_ms
        return row

    def expire(self, now_ms: int, ttl_ms: int, seq: int) -> list[str]:
        """Free the rows unseen since ``now_ms - ttl_ms``; returns their IDs."""
        n = len(self.ids)
        if n == 0:
            return []
        # no pass over the ids: free slots (id None) among the stale rows are skipped below
        stale = (self.last_seen_ms[:n] < now_ms - ttl_ms).nonzero().flatten().tolist()
        gone = []
        for row in stale:
            key = self.ids[row]
            if key is None:
                continue
            gone.append(key)
            del self.index[key]
            self.ids[row] = None
            self.emb[row] = 0.0
            self.accum[row] = 0.0
            self.count[row] = 0
            self.updated_seq[row] = seq
            self.free.append(row)
        return gone

    # --- updates -----------------------------------------------------------------------
    def adagrad_update(self, rows: torch.Tensor, grads: torch.Tensor, lr: float, seq: int, eps: float = 1e-8) -> None:
        """Row-wise Adagrad on ``rows`` (unique, >= 0) with their summed gradients ``[n, dim]``."""
        if rows.numel() == 0:
            return
        self.accum[rows] += grads.pow(2).mean(dim=1)
        self.emb[rows] -= lr * grads / (self.accum[rows].sqrt().unsqueeze(1) + eps)
        self.updated_seq[rows] = seq

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Copies of ``rows`` (zeros where the row is -1)."""
        out = torch.zeros(rows.shape[0], self.dim)
        known = rows >= 0
        if known.any():
            out[known] = self.emb[rows[known]]
        return out

    # --- persistence -------------------------------------------------------------------
    def live_rows(self) -> tuple[list[str], torch.Tensor]:
        """IDs and row numbers of the live rows, in row order."""
        keys, rows = [], []
        for row, key in enumerate(self.ids):
            if key is not None:
                keys.append(key)
                rows.append(row)
        return keys, torch.tensor(rows, dtype=torch.int64)

    def to_state(self) -> tuple[TableState, torch.Tensor]:
        """The compacted live rows, and the row numbers they came from (to align side tables)."""
        compact = bool(self.free)  # a freed slot: gather the live rows (advanced indexing copies)
        keys, rows = self.live_rows() if compact else (list(self.ids), torch.arange(len(self.ids)))

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[rows] if compact else t[: len(keys)].clone()

        return self._state(keys, take, dict(self.pending)), rows

    def changed_since(self, seq: int) -> TableState:
        """The live rows whose ``updated_seq`` is above ``seq``, in row order (``pending`` empty):
        what a row update carries."""
        n = len(self.ids)
        rows = [r for r in (self.updated_seq[:n] > seq).nonzero().flatten().tolist() if self.ids[r] is not None]
        index = torch.tensor(rows, dtype=torch.int64)
        return self._state([self.ids[r] for r in rows], lambda t: t[index], {})  # type: ignore[misc]

    def _state(
        self, keys: list[str], take: Callable[[torch.Tensor], torch.Tensor], pending: dict[str, int]
    ) -> TableState:
        """The rows ``take`` selects from every column, as ``keys``."""
        return TableState(
            ids=keys,
            emb=take(self.emb),
            accum=take(self.accum),
            count=take(self.count),
            last_seen_ms=take(self.last_seen_ms),
            updated_seq=take(self.updated_seq),
            pending=pending,
        )

    @classmethod
    def from_state(cls, state: TableState, admission_min_count: int, max_pending: int = 1_000_000) -> IdTable:
        """Rebuild a table whose rows are in ``state`` order (row i = ``state.ids[i]``)."""
        n = len(state.ids)
        dim = state.emb.shape[1] if state.emb.ndim == 2 else 0
        table = cls(dim, admission_min_count, capacity=max(n, 1024), max_pending=max_pending)
        if state.emb.shape != (n, dim):
            raise ValueError(f"table state has {n} ids but rows of shape {tuple(state.emb.shape)}")
        table.ids = list(state.ids)
        table.index = dict(zip(state.ids, range(n), strict=True))
        table.pending = dict(state.pending)
        table.emb[:n] = state.emb
        table.accum[:n] = state.accum
        table.count[:n] = state.count
        table.last_seen_ms[:n] = state.last_seen_ms
        table.updated_seq[:n] = state.updated_seq
        return table
