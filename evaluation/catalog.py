"""Item side information for the replay: what the catalogue topic would carry for each item.

Where a log comes with item features, the two-tower policies receive them as
:class:`twotower.events.CatalogItem` records, as the live trainer reads the catalogue topic, so
the item tower sees a category and a content vector beside the ID row (and a new item's first
vector comes from content). Which logs have side information:

* ``movielens-100k``: ``u.item`` beside ``u.data`` (first genre as the category, the 19 genre
  flags as content; ``u.genre`` beside it names the genres), as ``producers replay`` sends them;
* ``csv`` with a category column (``--category-col``): that column as the category, no content.

An item's record becomes known when the item first appears in the log (the replay cannot know
an item before anyone interacted with it without learning about the future), at the same time
for every policy that uses it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from producers.replay_formats import normalize_id, read_movielens_items
from twotower.events import CatalogItem


@dataclass(frozen=True)
class ItemSide:
    """The catalogue record of one item, without a time."""

    category: str
    features: tuple[float, ...] = ()

    def record(self, item_id: str, ts_ms: int) -> CatalogItem:
        """The catalogue record the producers would have written at ``ts_ms``."""
        return CatalogItem(item_id, self.category, list(self.features), ts_ms)


def movielens_100k_side(data_path: Path) -> dict[str, ItemSide]:
    """Side information from ``u.item`` beside a MovieLens-100K ``u.data`` (empty if absent)."""
    item_file = Path(data_path).with_name("u.item")
    if not item_file.exists():
        return {}
    return {item.item_id: ItemSide(item.category, tuple(item.features)) for item in read_movielens_items(item_file)}


def csv_category_side(
    path: Path,
    item_col: str,
    category_col: str,
    has_header: bool = True,
    columns: list[str] | None = None,
    delimiter: str = ",",
) -> dict[str, ItemSide]:
    """Each item's category from a column of a delimited log (the first value seen for an item).

    ``item_col`` and ``category_col`` are column names (header or ``columns``) or 0-based numbers.

    Raises:
        ValueError: a column is missing.
    """
    out: dict[str, ItemSide] = {}
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        names = [c.strip() for c in columns] if columns is not None else None
        if has_header:
            header = next((r for r in reader if any(f.strip() for f in r)), None)
            if names is None and header is not None:
                names = [c.strip() for c in header]

        def resolve(spec: str) -> int:
            if names is not None and spec in names:
                return names.index(spec)
            if spec.isdigit():
                return int(spec)
            raise ValueError(f"{path}: column {spec!r} not found; columns are {names}")

        ii, ci = resolve(item_col), resolve(category_col)
        rows = short = 0
        for row in reader:
            if not any(f.strip() for f in row):
                continue
            rows += 1
            if len(row) <= max(ii, ci):
                short += 1
                continue
            if not row[ii].strip():
                continue
            item = normalize_id(row[ii])
            if item not in out:
                out[item] = ItemSide(row[ci].strip() or "unknown")
    if rows and short == rows:
        raise ValueError(f"{path}: column {max(ii, ci)} is beyond the fields of every row")
    return out
