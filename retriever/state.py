"""What one retriever process serves: a snapshot version turned into searchable, immutable state.

A :class:`ServingState` is built once (from a full version, or from an older state plus
deltas) and never changed afterwards: request handlers read whichever state the watcher
published last, and the watcher replaces it by assigning a new object. Applying a delta
therefore builds a *new* state, so a request that still holds the old state never sees a
half-applied delta; and it does so in O(what deltas changed since the full version), never
O(catalogue): the full version's item and user ids (each an
:class:`~twotower.id_table.IdTable`: id ↔ position as arrays, no Python object per id, read
from the parts as they are) and its vector and user matrices are shared read-only by every
state derived from it, and each state adds only small layers on top (:class:`LayeredMap` of
changed ids, :class:`LayeredIds` of appended ids, the vectors of touched items, the ID rows of
changed users).

Item positions are the rows of the ``items`` part of the base full version, extended by
every new item a delta appends; Faiss ids are those positions. A removed item keeps its
position (dead) until the next full version renumbers everything.

The index is two-level, so that a delta never copies or edits the (possibly large,
possibly HNSW, which cannot remove) index of the full version:

* the **base** index of the full version, shared read-only by every state derived from it,
  searched with an ``IDSelectorBitmap`` that admits only the positions no delta has touched;
* an exact **overlay** (``IDMap2,Flat``, inner product) over the live positions deltas have
  touched (changed and new items), rebuilt by each delta (its size is the number of items
  touched since the full version).

Results of both are merged by score; with an exact base the merge is exact top-k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, cast

import faiss
import numpy as np
import torch

from retriever.parts import PartReader, deserialize_index
from twotower.blobs import BlobError, Rows, pack_rows, unpack_rows_gently
from twotower.config import ModelConfig
from twotower.id_table import IdTable, IdTableError
from twotower.index_layout import unwrapped, vector_storage
from twotower.model import (
    CONTEXT_FEATURES_KEY,
    NumpyUserTower,
    TwoTower,
    UserTower,
    context_array,
    fit_features,
    history_tensor,
    load_dense_arrays,
    pool_history,
)
from twotower.snapshot_parts import (
    INDEX,
    ITEMS,
    MODEL_CONFIG,
    REMOVED_ITEMS,
    USERS,
    WEIGHTS,
    DeltaSnapshot,
    FullSnapshot,
    decode_delta,
    decode_full,
)
from twotower.snapshots import DELTA, FULL, SnapshotError, SnapshotStore, VersionMeta

CategoryLookup = Callable[[Sequence[str]], Sequence[str | None]]
"""Batch lookup of item categories: ids → category (``None`` when unknown), same order."""

FILTER_OVERFETCH = 4
"""With a category filter or a per-category cap, the first search asks for this many times
the candidates it needs, then doubles while too few qualify."""
MAX_FILTER_CANDIDATES = 10_000
"""A category filter or cap never examines more candidates than this (a rare category can
then yield fewer than ``k`` items)."""


def _frozen(array: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(array, dtype=np.float32)
    out.setflags(write=False)
    return out


def _scores_from_codes(index: faiss.Index) -> bool:
    """Whether ``index`` scores from compressed codes rather than the float vectors (HNSW over
    float16 or quantized storage, IVF-PQ, scalar quantizers): its scores are then near, not
    equal to, the cosines."""
    inner = unwrapped(index)
    if isinstance(inner, faiss.IndexHNSW):
        return not isinstance(vector_storage(index), faiss.IndexFlat)
    return isinstance(
        inner, (faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer, faiss.IndexScalarQuantizer, faiss.IndexPQ)
    )


def _params_factory(index: faiss.Index) -> Callable[[faiss.IDSelector], faiss.SearchParameters]:
    """Search parameters carrying a selector, keeping the index's own efSearch / nprobe
    (typed parameters would otherwise reset them to faiss's defaults)."""
    inner = unwrapped(index)
    if isinstance(inner, faiss.IndexHNSW):
        ef_search = inner.hnsw.efSearch
        return lambda sel: faiss.SearchParametersHNSW(sel=sel, efSearch=ef_search)
    if isinstance(inner, faiss.IndexIVF):
        nprobe = inner.nprobe
        return lambda sel: faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
    return lambda sel: faiss.SearchParameters(sel=sel)


@dataclass(frozen=True, eq=False)
class _BaseFilter:
    """Admits the base-index positions no delta touched (keeps the bitmap alive for faiss)."""

    bitmap: np.ndarray
    selector: faiss.IDSelectorBitmap

    @staticmethod
    def build(n_base: int, touched: Iterable[int]) -> _BaseFilter | None:
        blocked = np.fromiter((p for p in touched if p < n_base), dtype=np.int64)
        if blocked.size == 0:
            return None
        allowed = np.ones(n_base, dtype=bool)
        allowed[blocked] = False
        bitmap = np.packbits(allowed, bitorder="little")
        return _BaseFilter(bitmap, faiss.IDSelectorBitmap(n_base, faiss.swig_ptr(bitmap)))


class LayeredMap(Mapping[str, int]):
    """A read-only ``str → int`` map: the full version's ids (an :class:`IdTable`, id → its
    position) shared by every state of one full version, plus the changes deltas made since
    (``None``: removed). Applying a delta copies only the changes (O(ids changed since the full
    version)), never the base."""

    __slots__ = ("_base", "_changes", "_len")

    def __init__(self, base: IdTable, changes: dict[str, int | None] | None = None, length: int | None = None):
        self._base = base
        self._changes: dict[str, int | None] = changes if changes is not None else {}
        self._len = len(base) if length is None else length

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        value = self.get_many([key])[0]
        return default if value is None else value

    def get_many(self, keys: Sequence[str]) -> list[int | None]:
        """The value of each key (``None`` where absent), the base searched once for all."""
        changes = self._changes
        if not changes:
            return self._base.positions(keys)
        out: list[int | None] = [None] * len(keys)
        rest: list[int] = []
        for i, key in enumerate(keys):
            if key in changes:
                out[i] = changes[key]
            else:
                rest.append(i)
        if rest:
            for i, value in zip(rest, self._base.positions([keys[i] for i in rest]), strict=True):
                out[i] = value
        return out

    def __getitem__(self, key: str) -> int:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        changes = self._changes
        for key in self._base:
            if key not in changes:
                yield key
        for key, value in changes.items():
            if value is not None:
                yield key

    @property
    def n_changes(self) -> int:
        """Ids changed since the base (what a delta copies)."""
        return len(self._changes)

    @property
    def table(self) -> IdTable:
        """The full version's ids (shared by every state derived from it)."""
        return self._base

    def edited(self) -> _MapEdit:
        """A private copy of the changes to apply a delta to (see :class:`_MapEdit`)."""
        return _MapEdit(self._base, dict(self._changes), self._len)


class _MapEdit:
    """The changes of a :class:`LayeredMap` being edited by one delta (not shared yet)."""

    def __init__(self, base: IdTable, changes: dict[str, int | None], length: int) -> None:
        self.view = LayeredMap(base, changes, length)

    def get(self, key: str) -> int | None:
        return self.view.get(key)

    def set(self, key: str, value: int) -> None:
        view = self.view
        if key not in view:
            view._len += 1
        view._changes[key] = value

    def pop(self, key: str) -> int | None:
        view = self.view
        value = view.get(key)
        if value is not None:
            view._len -= 1
            view._changes[key] = None
        return value

    def done(self) -> LayeredMap:
        return self.view


class LayeredIds(Sequence[str]):
    """Position → item id: the full version's ids (shared) followed by the ids deltas appended."""

    __slots__ = ("_base", "_extra")

    def __init__(self, base: IdTable, extra: tuple[str, ...] = ()) -> None:
        self._base = base
        self._extra = extra

    def __len__(self) -> int:
        return len(self._base) + len(self._extra)

    def __getitem__(self, pos: int) -> str:  # type: ignore[override]
        if not isinstance(pos, int):
            raise TypeError("positions are integers")
        if pos < 0:
            pos += len(self)
        if not 0 <= pos < len(self):
            raise IndexError(pos)
        return self.ids_at([pos])[0]

    def ids_at(self, positions: Sequence[int]) -> list[str]:
        """The ids at ``positions`` (each in ``0..len-1``), the base read once for all."""
        n = len(self._base)
        if not self._extra or all(pos < n for pos in positions):
            return self._base.ids_at(positions)
        return [self._base[pos] if pos < n else self._extra[pos - n] for pos in positions]

    def appended(self, ids: Sequence[str]) -> LayeredIds:
        return LayeredIds(self._base, self._extra + tuple(ids)) if ids else self


@dataclass(frozen=True, eq=False)
class ServingState:
    """One snapshot version, ready to answer requests; never mutated once built.

    Attributes:
        version: the snapshot version this state reflects.
        base: the full version it was built from.
        created_ms: when the publisher wrote ``version`` (wall clock, ms).
        model_config: the model configuration of the snapshot's weights.
        model: the towers in eval mode (only ``model.user`` runs here; with MIND it gives one
            vector per interest and a request queries the index once per interest).
        user_rows: user id → row (a row of ``user_matrix`` for the full version's users; users a
            delta changed or added have their row in ``user_overrides`` instead).
        user_matrix: ``[U, id_dim]`` the full version's user ID-embedding rows (read-only, shared).
        user_overrides: user id → ID row, for the users deltas changed or added.
        item_ids: position → item id (dead positions keep their old id).
        item_pos: live item id → position.
        base_vectors: ``[n_base, dim]`` the full version's unit item vectors (read-only, shared).
        touched_vectors: position → vector of every item deltas changed or added (read-only rows).
        index: the base Faiss index of the full version (ids = positions; shared, never edited).
        n_base: items in the full version (the base index's positions are ``0..n_base-1``).
        touched: positions deltas changed, added or removed since the full version.
        removed: positions that are dead (removed, or superseded by a re-added item).
        overlay: exact index over the live touched positions (``None`` when there are none).
        changed_items: item ids (changed, new or removed) of the deltas that turned the state
            this one was derived from into this one; ``None`` for a state built from a full
            version (anything may have changed). Caches of item details key off it.
        numpy_user: the ``mean`` user tower's weights for :meth:`user_vector` (it runs in numpy;
            ``None`` with MIND, which runs in torch).
        rescore: the base index scores from compressed codes (float16 HNSW, IVF-PQ): the hits it
            returns are scored again against ``base_vectors``, so a result's score is its cosine
            whatever the index stores, and the results are ordered by it.
    """

    version: int
    base: int
    created_ms: int
    model_config: ModelConfig
    model: TwoTower
    user_rows: LayeredMap
    user_matrix: np.ndarray
    user_overrides: dict[str, np.ndarray]
    item_ids: LayeredIds
    item_pos: LayeredMap
    base_vectors: np.ndarray
    touched_vectors: dict[int, np.ndarray]
    index: faiss.Index
    n_base: int
    touched: frozenset[int]
    removed: frozenset[int]
    overlay: faiss.Index | None
    base_filter: _BaseFilter | None
    search_params: Callable[[faiss.IDSelector], faiss.SearchParameters]
    changed_items: frozenset[str] | None = None
    rescore: bool = False
    numpy_user: NumpyUserTower | None = None

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def from_full(cls, meta: VersionMeta, snap: FullSnapshot, index: faiss.Index | None = None) -> ServingState:
        """Build the state of a full version.

        Args:
            index: the index ``snap.index`` holds, when the caller read it already (then
                ``snap.index`` is not looked at).

        Raises:
            SnapshotError: the parts do not fit together (shapes, duplicate ids, index size).
        """
        cfg = snap.model_config
        if snap.users.matrix.shape[1] != cfg.id_dim:
            raise SnapshotError(
                f"version {meta.version}: user rows have width {snap.users.matrix.shape[1]}, id_dim is {cfg.id_dim}"
            )
        if snap.items.matrix.shape[1] != cfg.dim:
            raise SnapshotError(
                f"version {meta.version}: item vectors have width {snap.items.matrix.shape[1]}, dim is {cfg.dim}"
            )
        try:  # the ids as read from a part already are tables (no Python object per id)
            item_ids, user_ids = IdTable.of(snap.items.ids), IdTable.of(snap.users.ids)
        except IdTableError as exc:
            raise SnapshotError(f"version {meta.version}: {exc}") from None
        if index is None:
            index = deserialize_index(snap.index)
        if index.d != cfg.dim or index.ntotal != len(snap.items.ids):
            raise SnapshotError(
                f"version {meta.version}: index has {index.ntotal} vectors of dim {index.d}, "
                f"expected {len(snap.items.ids)} of dim {cfg.dim}"
            )
        model = TwoTower(cfg)
        try:
            load_dense_arrays(model, snap.weights)
        except RuntimeError as exc:
            raise SnapshotError(f"version {meta.version}: weights do not fit the model: {exc}") from None
        model.eval()
        model.requires_grad_(False)
        return cls(
            version=meta.version,
            base=meta.base,
            created_ms=meta.created_ms,
            model_config=cfg,
            model=model,
            user_rows=LayeredMap(user_ids),
            user_matrix=_frozen(snap.users.matrix),
            user_overrides={},
            item_ids=LayeredIds(item_ids),
            item_pos=LayeredMap(item_ids),
            base_vectors=_frozen(snap.items.matrix),
            touched_vectors={},
            index=index,
            n_base=len(snap.items.ids),
            touched=frozenset(),
            removed=frozenset(),
            overlay=None,
            base_filter=None,
            search_params=_params_factory(index),
            numpy_user=None if model.multi_interest else NumpyUserTower(cast(UserTower, model.user)),
            rescore=_scores_from_codes(index),
        )

    def apply_delta(self, delta: DeltaSnapshot, version: int, created_ms: int | None = None) -> ServingState:
        """A new state with ``delta`` applied on top of this one (which stays unchanged).

        Within a delta, ``removed_items`` are applied before ``items``: an id in both lists
        was removed and came back, so it is live afterwards (at a new position).

        Raises:
            SnapshotError: the delta's row widths do not match this state.
        """
        return self.apply_deltas([delta], version, created_ms)

    def apply_deltas(
        self, deltas: Sequence[DeltaSnapshot], version: int, created_ms: int | None = None
    ) -> ServingState:
        """Apply consecutive deltas (oldest first) in one pass: one copy of the arrays, one
        overlay build; the base index is shared, never copied."""
        cfg = self.model_config
        for delta in deltas:
            if delta.users.matrix.shape[1] != cfg.id_dim or delta.items.matrix.shape[1] != cfg.dim:
                raise SnapshotError(
                    f"version {version}: delta rows have widths {delta.users.matrix.shape[1]}/"
                    f"{delta.items.matrix.shape[1]}, expected {cfg.id_dim}/{cfg.dim}"
                )
        user_rows, user_overrides = self._merged_users(deltas)
        created_ms = self.created_ms if created_ms is None else created_ms
        changed = frozenset(item_id for d in deltas for item_id in (*d.items.ids, *d.removed_items))
        same_items = replace(
            self,
            version=version,
            created_ms=created_ms,
            user_rows=user_rows,
            user_overrides=user_overrides,
            changed_items=changed,
        )
        if not changed:
            return same_items
        item_ids, item_pos, touched_vectors, touched, removed = self._merged_items(deltas)
        live = sorted(touched - removed)
        overlay = None
        if live:
            overlay = faiss.index_factory(self.model_config.dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
            overlay.add_with_ids(np.stack([touched_vectors[p] for p in live]), np.array(live, dtype=np.int64))
        return replace(
            same_items,
            item_ids=item_ids,
            item_pos=item_pos,
            touched_vectors=touched_vectors,
            touched=touched,
            removed=removed,
            overlay=overlay,
            base_filter=_BaseFilter.build(self.n_base, touched),
        )

    def _merged_users(self, deltas: Sequence[DeltaSnapshot]) -> tuple[LayeredMap, dict[str, np.ndarray]]:
        """O(users changed since the full version): the base rows are never copied."""
        if not any(d.users.ids for d in deltas):
            return self.user_rows, self.user_overrides
        self.user_rows.table.remember([user_id for d in deltas for user_id in d.users.ids])
        rows = self.user_rows.edited()
        overrides = dict(self.user_overrides)
        n_base_users = self.user_matrix.shape[0]
        for delta in deltas:
            matrix = _frozen(delta.users.matrix)
            for i, user_id in enumerate(delta.users.ids):
                if rows.get(user_id) is None:
                    rows.set(user_id, n_base_users + len(overrides))
                overrides[user_id] = matrix[i]
        return rows.done(), overrides

    def _merged_items(
        self, deltas: Sequence[DeltaSnapshot]
    ) -> tuple[LayeredIds, LayeredMap, dict[int, np.ndarray], frozenset[int], frozenset[int]]:
        """O(items changed since the full version): the base ids, map and vectors are shared."""
        self.item_pos.table.remember([item_id for d in deltas for item_id in (*d.removed_items, *d.items.ids)])
        n_ids = len(self.item_ids)
        appended: list[str] = []
        item_pos = self.item_pos.edited()
        touched = set(self.touched)
        removed = set(self.removed)
        vectors = dict(self.touched_vectors)
        for delta in deltas:
            for item_id in delta.removed_items:
                pos = item_pos.pop(item_id)
                if pos is not None:
                    removed.add(pos)
                    touched.add(pos)
            matrix = _frozen(delta.items.matrix)
            for i, item_id in enumerate(delta.items.ids):
                pos = item_pos.get(item_id)
                if pos is None:
                    pos = n_ids + len(appended)
                    appended.append(item_id)
                    item_pos.set(item_id, pos)
                vectors[pos] = matrix[i]
                touched.add(pos)
        return (
            self.item_ids.appended(appended),
            item_pos.done(),
            vectors,
            frozenset(touched),
            frozenset(removed),
        )

    @classmethod
    def load(cls, store: SnapshotStore, version: int) -> ServingState:
        """Read ``version`` and its chain (base full version + deltas) from the store.

        Raises:
            SnapshotError: a version is missing, incomplete or corrupt.
        """
        return cls.from_chain(store, store.chain(version))

    @classmethod
    def from_chain(
        cls, store: SnapshotStore, chain: Sequence[VersionMeta], parts: PartReader | None = None
    ) -> ServingState:
        """Read a chain as :meth:`SnapshotStore.chain` gives it (full version first) and build its state.

        Args:
            parts: reads the full version's big parts (default: from Redis into memory).

        Raises:
            SnapshotError: the chain does not start with a full version, or a part is missing or corrupt.
        """
        if not chain or chain[0].kind != FULL:
            raise SnapshotError("a snapshot chain must start with a full version")
        state = cls.from_full(chain[0], *read_full(store, chain[0], parts))
        return state.extend(store, chain[1:])

    def extend(self, store: SnapshotStore, metas: Sequence[VersionMeta]) -> ServingState:
        """Read the delta versions ``metas`` (oldest first, the first one's parent being this
        state's version) and apply them in one pass; ``self`` when ``metas`` is empty."""
        if not metas:
            return self
        parent = self.version
        deltas = []
        for meta in metas:
            if meta.kind != DELTA or meta.parent != parent:
                raise SnapshotError(f"version {meta.version} is not a delta of version {parent}")
            deltas.append(read_delta(store, meta))
            parent = meta.version
        return self.apply_deltas(deltas, metas[-1].version, metas[-1].created_ms)

    # --- serving ----------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        """Live items."""
        return len(self.item_pos)

    @cached_property
    def item_vectors(self) -> np.ndarray:
        """``[N, dim]`` unit item vectors by position (read-only). Materialised on first use
        (O(catalogue)) when deltas touched items; the request path uses :meth:`item_rows`."""
        if not self.touched_vectors:
            return self.base_vectors
        vectors = np.zeros((len(self.item_ids), self.model_config.dim), dtype=np.float32)
        vectors[: self.n_base] = self.base_vectors
        positions = np.fromiter(self.touched_vectors, dtype=np.int64)
        vectors[positions] = np.stack(list(self.touched_vectors.values()))
        return _frozen(vectors)

    def item_rows(self, positions: Sequence[int]) -> np.ndarray:
        """``[len(positions), dim]`` the vectors at ``positions`` (a new array)."""
        touched = self.touched_vectors
        if not touched:
            return self.base_vectors[list(positions)]
        out = np.empty((len(positions), self.model_config.dim), dtype=np.float32)
        for i, pos in enumerate(positions):
            vector = touched.get(pos)
            out[i] = vector if vector is not None else self.base_vectors[pos]
        return out

    def user_id_row(self, user_id: str) -> np.ndarray | None:
        """The user's ID-embedding row, ``None`` when the user has none."""
        vector = self.user_overrides.get(user_id) if self.user_overrides else None
        if vector is not None:
            return vector
        row = self.user_rows.get(user_id)
        return self.user_matrix[row] if row is not None and row < self.user_matrix.shape[0] else None

    def user_vector(
        self,
        user_id: str,
        history: Sequence[tuple[str, int]],
        profile: Sequence[float] | None,
        now_ms: int,
        context: Sequence[float] | None = None,
    ) -> np.ndarray:
        """The user tower's output for a request: a unit vector ``[dim]``, or with the MIND tower
        (``model.user_tower = "mind"``) one unit vector per active interest, ``[K', dim]``.

        :meth:`search` takes either shape (several interests: one index query each, merged).
        The example-age input, if the model has one, is 0 here (serving is "now").

        Args:
            user_id: the user; an id without a row gets an all-zero ID row.
            history: ``(item_id, ts_ms)`` interactions, newest first; the newest
                ``history_len`` are pooled, skipping items this state has no vector for (the
                trainer holds the same newest ``history_len``).
            profile: profile features (cut or zero-padded), or ``None`` for zeros.
            now_ms: the time the history decays towards (event-time ms); also the request time
                of the context's time features.
            context: the request's dense context vector (cut or zero-padded to
                ``model.context_dim``), or ``None`` for zeros.
        """
        cfg = self.model_config
        recent = history[: cfg.history_len]
        found = self.item_pos.get_many([item_id for item_id, _ in recent])
        positions = [pos for pos in found if pos is not None]
        stamps = [ts_ms for pos, (_, ts_ms) in zip(found, recent, strict=True) if pos is not None]
        id_row = self.user_id_row(user_id)
        if id_row is None:
            id_row = np.zeros(cfg.id_dim, dtype=np.float32)
        ctx_row = context_array(cfg, [now_ms], [{CONTEXT_FEATURES_KEY: list(context)} if context is not None else None])
        if self.model.multi_interest:
            features = torch.from_numpy(fit_features(profile, cfg.profile_dim)).unsqueeze(0)
            ctx = torch.from_numpy(ctx_row)
            seq, mask = history_tensor(self.item_rows(positions), [range(len(positions))], cfg.history_len)
            with torch.inference_mode():
                interests, active = self.model.user(torch.tensor(id_row).unsqueeze(0), features, seq, mask, None, ctx)
            return interests[0][active[0]].numpy()
        pooled = pool_history(  # oldest first, as the trainer keeps histories
            self.item_rows(positions[::-1]), np.asarray(stamps[::-1], dtype=np.int64), now_ms, cfg
        )
        # the mean tower's forward pass in numpy, without torch's per-op overhead (built with the state)
        assert self.numpy_user is not None
        return self.numpy_user(id_row, fit_features(profile, cfg.profile_dim), pooled, ctx_row[0])

    def _search_one(
        self,
        index: faiss.Index,
        query: np.ndarray,
        fetch: int,
        params: faiss.SearchParameters | None,
        vectors: np.ndarray | None = None,
    ) -> dict[int, float]:
        """Position → best cosine over the query rows (``[Q, dim]``), ``fetch`` per row; with
        ``vectors`` (indexed by position) the hits' scores are computed from them instead."""
        fetch = min(fetch, index.ntotal)
        if fetch <= 0:
            return {}
        distances, ids = index.search(query, fetch, params=params)
        if vectors is not None:  # [Q, fetch, dim] @ [Q, dim, 1]; a missing hit (-1) is dropped below
            distances = np.matmul(vectors[np.maximum(ids, 0)], query[:, :, None])[..., 0]
        elif index.metric_type == faiss.METRIC_L2:  # unit vectors: |u - v|^2 = 2 - 2 cos
            distances = 1.0 - distances / 2.0
        best: dict[int, float] = {}
        for row_ids, row_scores in zip(ids.tolist(), distances.tolist(), strict=True):
            for pos, score in zip(row_ids, row_scores, strict=True):
                if pos >= 0 and score > best.get(pos, -np.inf):
                    best[pos] = score
        return best

    def _raw_search(self, query: np.ndarray, fetch: int) -> list[tuple[int, float]]:
        """The best ``fetch`` (position, cosine) pairs of base and overlay merged, best first.

        With several query rows (MIND interests) each row is searched for ``fetch`` items and an
        item's score is its best cosine over the rows; the merged top ``fetch`` is exact for exact
        indexes (an item in the true top ``fetch`` is in the top ``fetch`` of its best row).
        """
        # a fresh parameter object per call: IndexIDMap swaps its selector during a search
        params = self.search_params(self.base_filter.selector) if self.base_filter is not None else None
        best = self._search_one(self.index, query, fetch, params, self.base_vectors if self.rescore else None)
        if self.overlay is not None:
            for pos, score in self._search_one(self.overlay, query, fetch, None).items():
                if score > best.get(pos, -np.inf):
                    best[pos] = score
        hits = sorted(best.items(), key=lambda pair: -pair[1])
        return hits[:fetch]

    def search(
        self,
        vec: np.ndarray,
        k: int,
        exclude: Iterable[str] = (),
        category_filter: set[str] | None = None,
        item_category: CategoryLookup | None = None,
        max_per_category: int | None = None,
    ) -> list[tuple[str, float]]:
        """The top ``k`` live items for a user vector, best first, as ``(item_id, cosine)``.

        Args:
            vec: ``[dim]`` user vector, or ``[K, dim]`` interest vectors (MIND): the index is queried
                once per interest and an item scores its best cosine over the interests.
            k: how many items to return (fewer when too few qualify).
            exclude: item ids never returned.
            category_filter: if given, only items whose category is in it.
            item_category: batch category lookup; required with a filter or a cap.
            max_per_category: diversity cap: at most this many items of one category; items
                of unknown category are not capped. The cap is soft: when the examined
                candidates cannot fill ``k`` under it, the best capped-out items fill the rest.

        Raises:
            ValueError: a filter or cap without ``item_category``, or a wrong vector shape.
        """
        dim = self.model_config.dim
        if not (vec.shape == (dim,) or (vec.ndim == 2 and vec.shape[0] >= 1 and vec.shape[1] == dim)):
            raise ValueError(f"user vector has shape {vec.shape}, expected ({dim},) or (K, {dim})")
        needs_categories = category_filter is not None or max_per_category is not None
        ntotal = self.n_items
        if k <= 0 or ntotal == 0:
            return []
        exclude = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        n_excluded = sum(1 for pos in self.item_pos.get_many(list(exclude)) if pos is not None)
        query = np.ascontiguousarray(vec, dtype=np.float32).reshape(-1, dim)
        if not needs_categories:
            # an exact index can lose at most n_excluded slots to exclusions
            fetch = min(ntotal, k + n_excluded)
            return [hit for hit in self._live_hits(query, fetch) if hit[0] not in exclude][:k]
        if item_category is None:
            raise ValueError("a category filter or cap needs an item_category lookup")
        categories: dict[str, str | None] = {}
        limit = min(ntotal, MAX_FILTER_CANDIDATES)
        fetch = min(limit, (k + n_excluded) * FILTER_OVERFETCH)
        while True:
            candidates = [hit for hit in self._live_hits(query, fetch) if hit[0] not in exclude]
            unknown = [item_id for item_id, _ in candidates if item_id not in categories]
            if unknown:
                categories.update(zip(unknown, item_category(unknown), strict=True))
            picked, spilled = _select(candidates, categories, k, category_filter, max_per_category)
            if len(picked) >= k or fetch >= limit:
                break
            fetch = min(limit, fetch * 2)
        if len(picked) < k and spilled:
            picked = sorted(picked + spilled[: k - len(picked)], key=lambda pair: -pair[1])
        return picked

    def _live_hits(self, query: np.ndarray, fetch: int) -> list[tuple[str, float]]:
        """:meth:`_raw_search` as ``(item_id, cosine)``, dead positions dropped (the base filter
        and the overlay already keep them out; checked anyway)."""
        hits = self._raw_search(query, fetch)
        n, removed = len(self.item_ids), self.removed
        hits = [(pos, score) for pos, score in hits if 0 <= pos < n and pos not in removed]
        item_ids = self.item_ids.ids_at([pos for pos, _ in hits])
        return [(item_id, score) for item_id, (_, score) in zip(item_ids, hits, strict=True)]


def _select(
    candidates: Sequence[tuple[str, float]],
    categories: dict[str, str | None],
    k: int,
    category_filter: set[str] | None,
    max_per_category: int | None,
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Walk ranked candidates: those passing the filter and cap (up to k), and those capped out."""
    picked: list[tuple[str, float]] = []
    spilled: list[tuple[str, float]] = []
    counts: dict[str, int] = {}
    for item_id, score in candidates:
        category = categories.get(item_id)
        if category_filter is not None and category not in category_filter:
            continue
        if max_per_category is not None and category:
            if counts.get(category, 0) >= max_per_category:
                spilled.append((item_id, score))
                continue
            counts[category] = counts.get(category, 0) + 1
        picked.append((item_id, score))
        if len(picked) == k:
            break
    return picked, spilled


_EMPTY_ROWS = pack_rows(Rows.empty(1))
BIG_PARTS = (USERS, ITEMS, INDEX)
"""The parts of a full version read through a :class:`~retriever.parts.PartReader` (the rest are
a few KB)."""


def read_full(
    store: SnapshotStore, meta: VersionMeta, parts: PartReader | None = None
) -> tuple[FullSnapshot, faiss.Index]:
    """Read and decode a full version's parts (checksums verified): the snapshot (its ``index``
    left empty) and the index. The big parts (rows and index) go through ``parts`` (see
    :mod:`retriever.parts`: no whole-part copy, once per host with a shared directory); the
    rows parts are decoded with :func:`~twotower.blobs.unpack_rows_gently`: their ids and
    matrices stay read-only views of the part's buffer.

    Raises:
        SnapshotError: a part is missing or corrupt.
    """
    parts = parts if parts is not None else PartReader()
    small = {name: store.read_part(meta, name) for name in (MODEL_CONFIG, WEIGHTS)}
    users, items = parts.read(store, meta, USERS), parts.read(store, meta, ITEMS)
    index = parts.read_index(store, meta, INDEX)
    try:
        snap = decode_full({**small, USERS: _EMPTY_ROWS, ITEMS: _EMPTY_ROWS, INDEX: b""})
        snap = replace(snap, users=unpack_rows_gently(users), items=unpack_rows_gently(items))
    except BlobError as exc:
        raise SnapshotError(f"version {meta.version}: {exc}") from None
    return snap, index


def read_delta(store: SnapshotStore, meta: VersionMeta) -> DeltaSnapshot:
    """Read and decode a delta version's parts (checksums verified).

    Raises:
        SnapshotError: a part is missing or corrupt.
    """
    parts = {name: store.read_part(meta, name) for name in (USERS, ITEMS, REMOVED_ITEMS)}
    try:
        return decode_delta(parts)
    except BlobError as exc:
        raise SnapshotError(f"version {meta.version}: {exc}") from None
