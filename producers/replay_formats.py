"""Readers of interaction logs for replay: pure functions from a file to rows sorted by time.

Every reader yields ``(user_id, item_id, ts_ms)`` tuples in event-time order (a stable sort:
rows with equal times keep their file order). The whole file is read into memory to sort it
(about 100-200 bytes per row; ids are interned). :func:`read_rows` gives the same rows with
their source line numbers, which the replayer uses for deterministic event ids.

Formats:

* ``movielens-100k``: ``u.data``, tab-separated ``user item rating unix_seconds``, no header.
* ``movielens-csv``: ``ratings.csv`` of the later MovieLens releases, header
  ``userId,movieId,rating,timestamp`` (seconds).
* ``csv``: any delimited file with a column mapping (``user_col``, ``item_col``,
  ``time_col``), with a header or without one (then ``columns`` names the fields, or the
  mapping gives 0-based column numbers). Column order is free and extra columns are ignored.
  Without a mapping, common names (``user_id``, ``userId``, ``item_id``, ``movieId``,
  ``timestamp``, ...) are recognised in the header.

IDs: surrounding whitespace is stripped and float-formatted integers lose their fraction
(``"12.0"`` → ``"12"``, as spreadsheets and pandas exports write them); other text is kept.

Timestamps (``time_unit="auto"``): an ISO 8601 date or date-time (naive ones are UTC), or a
number of seconds or milliseconds since the epoch, told apart by magnitude: values of at
least ``1e11`` (:data:`MS_THRESHOLD`) are milliseconds, smaller ones seconds. ``1e11`` seconds
is the year 5138 and ``1e11`` ms is March 1973, so the rule is only wrong for
millisecond times before March 1973; pass ``time_unit="ms"`` (or ``"s"``/``"iso"``) to force one.
A number below ``1e8`` (:data:`AMBIGUOUS_SECONDS`), seconds before March 1973, is refused unless
the unit is given: it is far more likely a date written as digits (``20200101``).
Times after the year 9999 are rejected: microseconds and nanoseconds must be converted to ms.
Fractional seconds are kept to the millisecond. Negative times are rejected.

Errors are :class:`ValueError` naming the file and, for a bad row, its line number.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from twotower.events import MAX_TS_MS, check_id

FORMATS = ("movielens-100k", "movielens-csv", "csv")
TIME_UNITS = ("auto", "s", "ms", "iso")
AMBIGUOUS_SECONDS = 100_000_000
"""Below this, a number is not read as seconds unless the unit says so: 1e8 s is March 1973, and
what is smaller is more likely a date written as digits (20200101 read as seconds is August
1970) or a spreadsheet's day number than an interaction logged in 1970."""


class TimeUnit(StrEnum):
    """How a csv log's time column is read (the command-line choice of :data:`TIME_UNITS`)."""

    auto = "auto"
    s = "s"
    ms = "ms"
    iso = "iso"


def delimiter_arg(text: str) -> str:
    """A ``--delimiter`` value: the character itself, or ``tab`` (also ``\\t``) for a tab."""
    return "\t" if text.lower() in ("tab", "\\t") else text


MS_THRESHOLD = 100_000_000_000
"""Numeric timestamps at or above this are milliseconds, below it seconds (``time_unit="auto"``)."""
MOVIELENS_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
"""The 19 genre flags of ``u.item``, in order (``u.genre`` says the same)."""

_USER_NAMES = ("userid", "user", "uid", "customerid", "visitorid", "reviewerid")
_ITEM_NAMES = ("itemid", "item", "movieid", "productid", "iid", "asin", "movie", "product")
_TIME_NAMES = ("timestamp", "time", "ts", "datetime", "date", "eventtime", "unixtimestamp", "unixreviewtime")
_FLOAT_INT = re.compile(r"^([+-]?\d+)\.0*$")

ColumnSpec = str | int
"""A column given by name, or by 0-based position (an int or a string of digits)."""


class SourceRow(NamedTuple):
    """One interaction with the (1-based) line it came from."""

    line: int
    user_id: str
    item_id: str
    ts_ms: int


def normalize_id(text: str) -> str:
    """An ID as written, stripped, with a float-formatted integer's fraction removed (``"12.0"`` → ``"12"``).

    Raises:
        ValueError: the ID is empty, or one the event schema refuses (too long, NUL): found while
            reading, before any event of the file is sent.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty id")
    match = _FLOAT_INT.match(text)
    return sys.intern(check_id(match.group(1) if match else text, "id"))


def parse_timestamp(text: str, unit: str = "auto") -> int:
    """Milliseconds since the epoch of a timestamp field (see the module docstring for the rules).

    Args:
        text: the field.
        unit: ``auto`` (detect), ``s``, ``ms`` or ``iso``.

    Raises:
        ValueError: unparseable, not finite, or before 1970.
    """
    if unit not in TIME_UNITS:
        raise ValueError(f"time unit must be one of {TIME_UNITS}, got {unit!r}")
    text = text.strip()
    if not text:
        raise ValueError("empty timestamp")
    value: float | None = None
    if unit != "iso":
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = None
    if value is None:
        if unit in ("s", "ms"):
            raise ValueError(f"bad timestamp {text!r} (expected a number of {'seconds' if unit == 's' else 'ms'})")
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"bad timestamp {text!r} (expected unix seconds, unix milliseconds or an ISO 8601 date)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ms = round(moment.timestamp() * 1000)
    else:
        if not math.isfinite(value):
            raise ValueError(f"bad timestamp {text!r} (not a finite number)")
        is_ms = unit == "ms" or (unit == "auto" and abs(value) >= MS_THRESHOLD)
        ms = round(value) if is_ms else round(value * 1000)
    if ms < 0:
        raise ValueError(f"timestamp {text!r} is before 1970")
    if unit == "auto" and value is not None and abs(value) < AMBIGUOUS_SECONDS:
        raise ValueError(
            f"timestamp {text!r} read as seconds is {datetime.fromtimestamp(ms / 1000, UTC):%Y-%m-%d}: a date "
            "written as digits (YYYYMMDD) or a spreadsheet's day number? Give the time unit (s: they are "
            "seconds after all)"
        )
    if ms > MAX_TS_MS:
        raise ValueError(
            f"timestamp {text!r} is after the year 9999 as {'ms' if unit != 's' else 'seconds'}"
            " (microseconds or nanoseconds? convert them to ms)"
        )
    return int(ms)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "").replace("-", "").replace(" ", "")


def guess_columns(names: Sequence[str]) -> tuple[str, str, str]:
    """The user, item and time columns among ``names``, by common spellings (case and ``_`` ignored).

    Raises:
        ValueError: one of the three cannot be recognised.
    """
    keyed: dict[str, list[str]] = {}
    for n in names:
        keyed.setdefault(_key(n), []).append(n)
    found = []
    for role, candidates in (("user", _USER_NAMES), ("item", _ITEM_NAMES), ("time", _TIME_NAMES)):
        matches = next((keyed[c] for c in candidates if c in keyed), None)
        if matches is not None and len(matches) > 1:
            raise ValueError(
                f"columns {matches} could each hold the {role}; give the mapping (--user-col/--item-col/--time-col)"
            )
        match = matches[0] if matches else None
        if match is None:
            raise ValueError(
                f"cannot tell which column holds the {role}; columns are {list(names)}; "
                f"give the mapping (--user-col/--item-col/--time-col)"
            )
        found.append(match)
    return found[0], found[1], found[2]


def _resolve(spec: ColumnSpec, names: Sequence[str] | None, where: str) -> int:
    """0-based index of a column given by name or position."""
    if names is not None and isinstance(spec, str) and spec in names:
        if list(names).count(spec) > 1:
            raise ValueError(
                f"{where}: there are {list(names).count(spec)} columns named {spec!r}; give its 0-based number"
            )
        return list(names).index(spec)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        if names is not None and index >= len(names):
            raise ValueError(f"{where}: column number {index} is out of range; there are {len(names)} columns")
        return index
    if names is None:
        raise ValueError(
            f"{where}: column {spec!r} cannot be found in a file without a header; "
            "name the columns (columns=[...] / --columns) or give 0-based column numbers"
        )
    raise ValueError(f"{where}: column {spec!r} not found; columns are {list(names)}")


def read_csv_rows(
    path: str | Path,
    *,
    user_col: ColumnSpec | None = None,
    item_col: ColumnSpec | None = None,
    time_col: ColumnSpec | None = None,
    has_header: bool = True,
    columns: Sequence[str] | None = None,
    delimiter: str = ",",
    time_unit: str = "auto",
    encoding: str = "utf-8-sig",
) -> list[SourceRow]:
    """All interactions of a delimited file, sorted by time (stable), with their line numbers.

    Args:
        path: the file.
        user_col: column of the user id (name or 0-based number); guessed from the names if omitted.
        item_col: column of the item id.
        time_col: column of the timestamp.
        has_header: whether the first non-empty line names the columns.
        columns: names of the columns (overriding the header if there is one); needed to map
            by name in a file without a header.
        delimiter: field separator.
        time_unit: ``auto``, ``s``, ``ms`` or ``iso`` (see the module docstring).
        encoding: text encoding (the default also drops a UTF-8 byte-order mark).

    Raises:
        ValueError: a column is missing or a row is bad (the message names the line).
    """
    path = Path(path)
    if time_unit not in TIME_UNITS:
        raise ValueError(f"time unit must be one of {TIME_UNITS}, got {time_unit!r}")
    if len(delimiter) != 1:
        raise ValueError(f"the delimiter must be one character, got {delimiter!r}")
    with path.open(newline="", encoding=encoding) as handle:
        # strict: a quote left open is an error, not the rest of the file read into one field
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            rows = _read_csv(path, reader, user_col, item_col, time_col, has_header, columns, time_unit)
        except UnicodeDecodeError as exc:
            line = _first_undecodable_line(path, encoding)
            raise ValueError(f"{path}:{line}: not {encoding} text ({exc.reason}); convert the file to UTF-8") from None
        except csv.Error as exc:
            raise ValueError(f"{path}:{reader.line_num}: {exc} (a quote left open?)") from None
    rows.sort(key=lambda r: r.ts_ms)
    return rows


def _is_timestamp(text: str, unit: str) -> bool:
    """Whether a header's field reads as a time (then the header is a line of data)."""
    try:
        parse_timestamp(text, unit)
    except ValueError:
        return False
    return True


def _first_undecodable_line(path: Path, encoding: str) -> int:
    """The number of the first line of ``path`` that does not decode (text is decoded in blocks,
    so the reader's own line count is no guide). Lines end as the reader's do (``\n``, ``\r\n``
    or ``\r``): read as Latin-1, which decodes any byte, each line is its bytes again."""
    with path.open(encoding="latin-1", newline=None) as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.encode("latin-1").decode(encoding)
            except UnicodeDecodeError:
                return number
    return 0


def _read_csv(
    path: Path,
    reader: Any,
    user_col: ColumnSpec | None,
    item_col: ColumnSpec | None,
    time_col: ColumnSpec | None,
    has_header: bool,
    columns: Sequence[str] | None,
    time_unit: str,
) -> list[SourceRow]:
    rows: list[SourceRow] = []
    names: list[str] | None = [c.strip() for c in columns] if columns is not None else None
    header: list[str] | None = None
    if has_header:
        header = next((r for r in reader if any(f.strip() for f in r)), None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header line")
        if names is None:
            names = [c.strip() for c in header]
    if user_col is None or item_col is None or time_col is None:
        if names is None:
            raise ValueError(
                f"{path}: without a header, give the user, item and time columns (names with columns=[...] "
                "or 0-based numbers)"
            )
        try:
            guessed = guess_columns(names)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        user_col = guessed[0] if user_col is None else user_col
        item_col = guessed[1] if item_col is None else item_col
        time_col = guessed[2] if time_col is None else time_col
    where = str(path)
    ui, ii, ti = (_resolve(c, names, where) for c in (user_col, item_col, time_col))
    named = isinstance(time_col, str) and time_col.strip() in [c.strip() for c in header or ()]
    if header is not None and not named and len(header) > ti and _is_timestamp(header[ti], time_unit):
        raise ValueError(
            f"{path}: the first line looks like data (its time field is {header[ti].strip()!r}), not column "
            "names; say the file has no header (--no-header)"
        )
    need = max(ui, ii, ti) + 1
    for row in reader:
        if not row or not any(f.strip() for f in row):
            continue
        line = reader.line_num
        if len(row) < need:
            raise ValueError(f"{path}:{line}: expected at least {need} fields, got {len(row)}: {row!r}")
        try:
            rows.append(
                SourceRow(line, normalize_id(row[ui]), normalize_id(row[ii]), parse_timestamp(row[ti], time_unit))
            )
        except ValueError as exc:
            raise ValueError(f"{path}:{line}: {exc}") from None
    return rows


def read_rows(path: str | Path, fmt: str, **mapping: object) -> list[SourceRow]:
    """Rows of ``path`` in format ``fmt`` (one of :data:`FORMATS`); ``mapping`` is for ``csv`` only.

    Raises:
        ValueError: unknown format, a mapping given for a fixed format, or a bad file.
    """
    if fmt == "movielens-100k":
        _no_mapping(fmt, mapping)
        return read_csv_rows(path, user_col=0, item_col=1, time_col=3, has_header=False, delimiter="\t", time_unit="s")
    if fmt == "movielens-csv":
        _no_mapping(fmt, mapping)
        return read_csv_rows(path, user_col="userId", item_col="movieId", time_col="timestamp", time_unit="s")
    if fmt == "csv":
        return read_csv_rows(path, **mapping)  # type: ignore[arg-type]
    raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


@dataclass(frozen=True)
class LogSpec:
    """How to read an interaction log: its format (one of :data:`FORMATS`) and, for ``csv``,
    where its columns are and how its fields read (see :func:`read_csv_rows`)."""

    fmt: str
    user_col: ColumnSpec | None = None
    item_col: ColumnSpec | None = None
    time_col: ColumnSpec | None = None
    has_header: bool = True
    columns: Sequence[str] | None = None
    delimiter: str = ","
    time_unit: str = "auto"

    @classmethod
    def of(cls, spec: LogSpec | str) -> LogSpec:
        """``spec``, or for a format name alone the spec of that format with every default."""
        return cls(spec) if isinstance(spec, str) else spec

    def read(self, path: str | Path) -> list[SourceRow]:
        """The log's rows (:func:`read_rows`); a fixed format refuses an option set away from its
        default rather than ignoring it.

        Raises:
            ValueError: as :func:`read_rows`.
        """
        mapping = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fmt"}
        mapping["columns"] = self.columns or None
        if self.fmt != "csv":  # None: left at the default, so not "given"
            defaults = {f.name: f.default for f in fields(self)}
            mapping = {k: None if v == defaults[k] else v for k, v in mapping.items()}
        return read_rows(path, self.fmt, **mapping)


OPTION_NAMES = {
    "user_col": "--user-col", "item_col": "--item-col", "time_col": "--time-col", "columns": "--columns",
    "has_header": "--no-header", "delimiter": "--delimiter", "time_unit": "--time-unit",
}  # fmt: skip
"""The command-line option of each :class:`LogSpec` field, for messages."""


def _no_mapping(fmt: str, mapping: dict[str, object]) -> None:
    given = sorted(OPTION_NAMES.get(k, k) for k, v in mapping.items() if v is not None)
    if given:
        raise ValueError(f"format {fmt} has fixed columns; {', '.join(given)} apply to format csv only")


def _triples(rows: list[SourceRow]) -> Iterator[tuple[str, str, int]]:
    for row in rows:
        yield row.user_id, row.item_id, row.ts_ms


def read_movielens_100k(path: str | Path) -> Iterator[tuple[str, str, int]]:
    """``(user_id, item_id, ts_ms)`` of a MovieLens-100K ``u.data``, sorted by time."""
    return _triples(read_rows(path, "movielens-100k"))


def read_movielens_csv(path: str | Path) -> Iterator[tuple[str, str, int]]:
    """``(user_id, item_id, ts_ms)`` of a MovieLens ``ratings.csv`` (userId,movieId,rating,timestamp)."""
    return _triples(read_rows(path, "movielens-csv"))


def read_csv(path: str | Path, **mapping: object) -> Iterator[tuple[str, str, int]]:
    """``(user_id, item_id, ts_ms)`` of a delimited file; keyword arguments as :func:`read_csv_rows`."""
    return _triples(read_csv_rows(path, **mapping))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- MovieLens-100K items


def movielens_genres(path: str | Path) -> list[str]:
    """Genre names of a MovieLens-100K ``u.genre`` (``name|index`` lines), ordered by index.

    Raises:
        ValueError: a malformed line or indices that are not ``0..n-1``.
    """
    path = Path(path)
    by_index: dict[int, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, index = line.rpartition("|")
        if not sep or not index.strip().isdigit():
            raise ValueError(f"{path}:{line_no}: expected 'name|index', got {line!r}")
        by_index[int(index)] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"{path}: genre indices are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


class MovieLensItem(NamedTuple):
    """One movie of ``u.item``."""

    item_id: str
    title: str
    category: str
    features: list[float]


def read_movielens_items(path: str | Path, genres: Sequence[str] | None = None) -> Iterator[MovieLensItem]:
    """Every movie of a MovieLens-100K ``u.item`` with its title (arguments as :func:`movielens_items`)."""
    path = Path(path)
    if genres is None:
        genre_file = path.with_name("u.genre")
        genres = movielens_genres(genre_file) if genre_file.exists() else MOVIELENS_100K_GENRES
    n = len(genres)
    with path.open(encoding="latin-1") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) != 5 + n:
                raise ValueError(f"{path}:{line_no}: expected {5 + n} '|'-separated fields, got {len(fields)}")
            flags = fields[5:]
            if any(f not in ("0", "1") for f in flags):
                raise ValueError(f"{path}:{line_no}: genre flags must be 0 or 1, got {flags}")
            try:
                item_id = normalize_id(fields[0])
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from None
            features = [float(f) for f in flags]
            first = next((genres[i] for i, f in enumerate(flags) if f == "1"), "unknown")
            yield MovieLensItem(item_id, fields[1], first, features)


def movielens_items(path: str | Path, genres: Sequence[str] | None = None) -> Iterator[tuple[str, str, list[float]]]:
    """``(item_id, category, genre_flags)`` per movie of a MovieLens-100K ``u.item``.

    ``category`` is the name of the movie's first genre (``"unknown"`` if none is set) and
    ``genre_flags`` the multi-hot genre vector (19 floats). The file is latin-1 and
    ``|``-separated.

    Args:
        path: the ``u.item`` file.
        genres: genre names in flag order; default: ``u.genre`` beside ``path``, else the
            standard 19 names.

    Raises:
        ValueError: a malformed line (the message names it).
    """
    for item in read_movielens_items(path, genres):
        yield item.item_id, item.category, item.features


def movielens_titles(path: str | Path) -> dict[str, str]:
    """Movie titles of a MovieLens-100K ``u.item``, by item id."""
    return {item.item_id: item.title for item in read_movielens_items(path)}
