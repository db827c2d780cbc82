"""What a snapshot version holds: the parts the publisher writes and the retriever reads.

A **full** version has every part below except ``removed_items``; a **delta** has
``users`` and ``items`` (only the changed or new rows) and ``removed_items``.
Retrievers read only the parts they serve from; ``withheld_items`` is the publisher's.

* ``model_config``: the :class:`~twotower.config.ModelConfig` the weights belong to (msgpack map).
* ``weights``: the dense weights of both towers (:func:`twotower.blobs.pack_arrays`).
* ``users``: user ID-embedding rows (the retriever runs the user tower with them).
* ``items``: item vectors, i.e. item-tower outputs, unit length.

  Both rows parts are :func:`twotower.blobs.pack_rows` maps: the ids as an
  :class:`~twotower.id_table.IdTable` (sorted fixed-width UTF-8 bytes and their positions,
  read by the retriever without a Python object per id) and a float32 matrix.
* ``index``: ``faiss.serialize_index`` bytes of an index over ``items`` whose ids are
  the row positions in ``items``.
* ``removed_items``: ids of items gone since the parent version.
* ``withheld_items``: catalogue items a full version leaves out because the trainer expired
  them (and no catalogue event listed them again since): a restarted publisher reads them
  back, so that it does not serve them again from the catalogue topic it replays. Optional
  (full versions written before it existed have none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

from twotower.blobs import BlobError, Rows, pack_arrays, pack_rows, pack_strings, unpack_arrays, unpack_rows
from twotower.blobs import unpack_strings as _unpack_strings
from twotower.config import ModelConfig, stored_model_config

MODEL_CONFIG = "model_config"
WEIGHTS = "weights"
USERS = "users"
ITEMS = "items"
INDEX = "index"
REMOVED_ITEMS = "removed_items"
WITHHELD_ITEMS = "withheld_items"


@dataclass(frozen=True)
class FullSnapshot:
    model_config: ModelConfig
    weights: dict[str, np.ndarray]
    users: Rows
    items: Rows
    index: bytes
    withheld_items: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DeltaSnapshot:
    users: Rows
    items: Rows
    removed_items: list[str]


def encode_full(snap: FullSnapshot) -> dict[str, bytes]:
    return {
        MODEL_CONFIG: msgpack.packb(snap.model_config.model_dump(), use_bin_type=True),
        WEIGHTS: pack_arrays(snap.weights),
        USERS: pack_rows(snap.users),
        ITEMS: pack_rows(snap.items),
        INDEX: snap.index,
        WITHHELD_ITEMS: pack_strings(snap.withheld_items),
    }


def decode_full(parts: dict[str, bytes]) -> FullSnapshot:
    """Raises BlobError on a corrupt or incomplete set of parts."""
    missing = {MODEL_CONFIG, WEIGHTS, USERS, ITEMS, INDEX} - set(parts)
    if missing:
        raise BlobError(f"full snapshot lacks parts {sorted(missing)}")
    try:
        cfg = stored_model_config(msgpack.unpackb(parts[MODEL_CONFIG], raw=False))
    except Exception as exc:
        raise BlobError(f"bad model_config part: {exc}") from None
    return FullSnapshot(
        model_config=cfg,
        weights=unpack_arrays(parts[WEIGHTS]),
        users=unpack_rows(parts[USERS]),
        items=unpack_rows(parts[ITEMS]),
        index=parts[INDEX],
        withheld_items=_unpack_strings(parts[WITHHELD_ITEMS]) if WITHHELD_ITEMS in parts else [],
    )


def encode_delta(snap: DeltaSnapshot) -> dict[str, bytes]:
    return {
        USERS: pack_rows(snap.users),
        ITEMS: pack_rows(snap.items),
        REMOVED_ITEMS: pack_strings(snap.removed_items),
    }


def decode_delta(parts: dict[str, bytes]) -> DeltaSnapshot:
    """Raises BlobError on a corrupt or incomplete set of parts."""
    missing = {USERS, ITEMS, REMOVED_ITEMS} - set(parts)
    if missing:
        raise BlobError(f"delta snapshot lacks parts {sorted(missing)}")
    return DeltaSnapshot(
        users=unpack_rows(parts[USERS]),
        items=unpack_rows(parts[ITEMS]),
        removed_items=_unpack_strings(parts[REMOVED_ITEMS]),
    )
