"""Pure functions from a trainer :class:`~twotower.checkpoint.Checkpoint` to snapshots.

Nothing here touches Redis, Kafka or the file system: the daemon loads a checkpoint, calls
these, and writes what they return through :class:`~twotower.snapshots.SnapshotStore`.

* Item vectors are item-tower outputs over ``[ID row | category | content]`` (unit length).
* A **full** snapshot carries the model config, the dense weights, every user ID row, every
  item vector and a Faiss index over the item vectors whose ids are row positions in ``items``.
* A **delta** carries the user rows and item vectors changed after a trainer sequence number,
  plus the items removed after it.
* Items the trainer has no ID row for (brand-new catalogue items) get a **content-only**
  vector: zero ID row, their category, their content features. The daemon passes them as
  ``extra_items`` so that they survive full snapshots until the trainer admits them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from publisher.index import build_index, serialize
from twotower.blobs import Rows
from twotower.checkpoint import Checkpoint
from twotower.config import stored_model_config
from twotower.events import CatalogItem
from twotower.model import UNKNOWN_CATEGORY, TwoTower, dense_arrays, fit_features, load_dense_state
from twotower.snapshot_parts import DeltaSnapshot, FullSnapshot

DEFAULT_BATCH = 4096


def model_from_checkpoint(ckpt: Checkpoint) -> TwoTower:
    """The two towers with the checkpoint's config and dense weights, in eval mode.

    Raises:
        ValueError: the config or the weights do not fit the model.
    """
    try:
        cfg = stored_model_config(ckpt.model_config)
    except Exception as exc:
        raise ValueError(f"checkpoint {ckpt.seq}: bad model_config: {exc}") from None
    model = TwoTower(cfg)
    try:
        load_dense_state(model, ckpt.dense)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {ckpt.seq}: dense weights do not fit the model: {exc}") from None
    return model.eval()


def _check_items(ckpt: Checkpoint) -> None:
    n = len(ckpt.items.ids)
    shapes = {
        "items.emb": ckpt.items.emb.shape[0],
        "items.updated_seq": ckpt.items.updated_seq.shape[0],
        "item_category": ckpt.item_category.shape[0],
        "item_content": ckpt.item_content.shape[0],
    }
    bad = {name: rows for name, rows in shapes.items() if rows != n}
    if bad:
        raise ValueError(f"checkpoint {ckpt.seq}: {n} item ids but {bad} rows")
    if len(ckpt.users.ids) != ckpt.users.emb.shape[0] or len(ckpt.users.ids) != ckpt.users.updated_seq.shape[0]:
        raise ValueError(f"checkpoint {ckpt.seq}: user ids and user rows differ in length")


@torch.no_grad()
def _item_tower(
    model: TwoTower, id_rows: torch.Tensor, category: torch.Tensor, content: torch.Tensor, batch_size: int
) -> np.ndarray:
    n = id_rows.shape[0]
    out = np.zeros((n, model.cfg.dim), dtype=np.float32)
    for start in range(0, n, batch_size):
        stop = start + batch_size
        vec = model.item(id_rows[start:stop].float(), category[start:stop].long(), content[start:stop].float())
        out[start:stop] = vec.cpu().numpy()
    return out


def item_vectors(
    model: TwoTower, ckpt: Checkpoint, rows: Sequence[int] | np.ndarray | None = None, batch_size: int = DEFAULT_BATCH
) -> np.ndarray:
    """Item-tower outputs for item table rows of ``ckpt``.

    Args:
        model: the towers (see :func:`model_from_checkpoint`).
        ckpt: the checkpoint whose item table is read.
        rows: row positions in ``ckpt.items``; ``None`` means every row.
        batch_size: rows per forward pass.

    Returns:
        ``[len(rows), dim]`` float32 unit vectors.

    Raises:
        ValueError: the checkpoint's item arrays disagree in length, or a category index is
            outside the model's vocabulary.
    """
    _check_items(ckpt)
    index = torch.arange(len(ckpt.items.ids)) if rows is None else torch.as_tensor(np.asarray(rows, dtype=np.int64))
    category = ckpt.item_category[index].long()
    if category.numel() and (int(category.min()) < 0 or int(category.max()) > model.cfg.n_categories):
        raise ValueError(f"checkpoint {ckpt.seq}: item category index outside 0..{model.cfg.n_categories}")
    return _item_tower(model, ckpt.items.emb[index], category, ckpt.item_content[index], batch_size)


def category_indices(categories: Sequence[str], n_categories: int) -> dict[str, int]:
    """Category name → embedding index: ``categories[i]`` has ``i + 1``.

    Names whose index would not fit the model's ``n_categories`` are left out (they map to
    the unknown category 0, like names not in the vocabulary).
    """
    return {name: i + 1 for i, name in enumerate(categories) if i + 1 <= n_categories}


def content_only_vectors(
    model: TwoTower,
    categories: Sequence[str] | Mapping[str, int],
    items: Iterable[CatalogItem],
    batch_size: int = DEFAULT_BATCH,
) -> Rows:
    """Vectors of items without an ID row: zero ID row + category + content features.

    Args:
        model: the towers with the dense weights currently served.
        categories: the trainer's category vocabulary (``categories[i]`` has index ``i + 1``),
            or an already built name → index map (:func:`category_indices`).
        items: catalogue items; for a repeated id the last one wins.
        batch_size: rows per forward pass.

    Returns:
        Rows of unit vectors, in first-seen id order.
    """
    cfg = model.cfg
    vocab = categories if isinstance(categories, Mapping) else category_indices(categories, cfg.n_categories)
    latest: dict[str, CatalogItem] = {}
    for item in items:
        latest[item.item_id] = item
    if not latest:
        return Rows.empty(cfg.dim)
    chosen = list(latest.values())
    category = torch.tensor([vocab.get(it.category, UNKNOWN_CATEGORY) for it in chosen], dtype=torch.long)
    content = torch.from_numpy(np.stack([fit_features(it.features, cfg.content_dim) for it in chosen]))
    id_rows = torch.zeros((len(chosen), cfg.id_dim), dtype=torch.float32)
    return Rows([it.item_id for it in chosen], _item_tower(model, id_rows, category, content, batch_size))


def _extras(owned: set[str], extra_items: Iterable[CatalogItem]) -> list[CatalogItem]:
    """Extra catalogue items that the trainer has no row for (``owned`` are the trainer's)."""
    return [it for it in extra_items if it.item_id not in owned]


def _concat(first: Rows, second: Rows) -> Rows:
    if not second.ids:
        return first
    return Rows(first.ids + second.ids, np.concatenate([first.matrix, second.matrix]).astype(np.float32))


def full_snapshot(
    ckpt: Checkpoint,
    *,
    extra_items: Iterable[CatalogItem] = (),
    withheld_items: Iterable[str] = (),
    model: TwoTower | None = None,
    index_kind: str = "auto",
    index_options: Mapping[str, Any] | None = None,
) -> FullSnapshot:
    """Everything a retriever needs to serve the checkpoint.

    Args:
        ckpt: the trainer checkpoint.
        extra_items: catalogue items to serve with content-only vectors; ids the checkpoint
            has a row for are ignored.
        withheld_items: catalogue items left out as expired, recorded in the snapshot for a
            restarted publisher (see :data:`twotower.snapshot_parts.WITHHELD_ITEMS`).
        model: the towers built from ``ckpt`` (built here when ``None``).
        index_kind: passed to :func:`publisher.index.build_index`.
        index_options: further keyword arguments of ``build_index``.

    Returns:
        The snapshot; ``items`` holds the checkpoint's items in row order, then the extras,
        and the index ids are row positions in ``items``.
    """
    model = model if model is not None else model_from_checkpoint(ckpt)
    cfg = model.cfg
    trained = Rows(list(ckpt.items.ids), item_vectors(model, ckpt))
    extras = content_only_vectors(model, ckpt.categories, _extras(set(ckpt.items.ids), extra_items))
    items = _concat(trained, extras)
    index = build_index(items.matrix, np.arange(len(items.ids), dtype=np.int64), index_kind, **(index_options or {}))
    users = Rows(list(ckpt.users.ids), ckpt.users.emb.detach().cpu().numpy().astype(np.float32).reshape(-1, cfg.id_dim))
    return FullSnapshot(
        model_config=cfg,
        weights=dense_arrays(model),
        users=users,
        items=items,
        index=serialize(index),
        withheld_items=list(withheld_items),
    )


def delta_snapshot(
    ckpt: Checkpoint,
    since_seq: int,
    *,
    extra_items: Iterable[CatalogItem] = (),
    model: TwoTower | None = None,
    owned: set[str] | None = None,
) -> DeltaSnapshot:
    """What changed in ``ckpt`` after trainer sequence number ``since_seq``.

    Args:
        ckpt: the trainer checkpoint.
        since_seq: the trainer ``seq`` the parent version reflects.
        extra_items: catalogue items to add with content-only vectors (ids the checkpoint
            has a row for are ignored).
        model: the towers built from ``ckpt`` (built here when ``None``).
        owned: every item id the trainer has an ID row for; default ``ckpt``'s items (a row
            update holds only the changed ones).

    Returns:
        Users and items whose ``updated_seq > since_seq``, the extras, and the items removed
        after ``since_seq`` that are not live again.
    """
    model = model if model is not None else model_from_checkpoint(ckpt)
    cfg = model.cfg
    _check_items(ckpt)
    user_rows = np.flatnonzero(ckpt.users.updated_seq.cpu().numpy() > since_seq)
    item_rows = np.flatnonzero(ckpt.items.updated_seq.cpu().numpy() > since_seq)
    users_emb = ckpt.users.emb[torch.as_tensor(user_rows, dtype=torch.long)]  # only the changed rows
    users = Rows(
        [ckpt.users.ids[i] for i in user_rows],
        users_emb.detach().cpu().numpy().astype(np.float32).reshape(-1, cfg.id_dim),
    )
    trained = Rows([ckpt.items.ids[i] for i in item_rows], item_vectors(model, ckpt, item_rows))
    owned = set(ckpt.items.ids) if owned is None else owned
    items = _concat(trained, content_only_vectors(model, ckpt.categories, _extras(owned, extra_items)))
    live = owned | set(items.ids)
    removed = list(dict.fromkeys(item for seq, item in ckpt.removed_items if seq > since_seq and item not in live))
    return DeltaSnapshot(users=users, items=items, removed_items=removed)


def is_empty(delta: DeltaSnapshot) -> bool:
    """True when a delta changes nothing (it need not be published)."""
    return not delta.users.ids and not delta.items.ids and not delta.removed_items


__all__ = [
    "category_indices",
    "content_only_vectors",
    "delta_snapshot",
    "full_snapshot",
    "is_empty",
    "item_vectors",
    "model_from_checkpoint",
]
