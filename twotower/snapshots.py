"""Snapshots in Redis: the one module that owns every key name and how versions are stored.

Layout (``p`` is the configured key prefix):

====================================  ==========================================================
``p:snap:seq``                        counter that hands out version numbers
``p:snap:current``                    the version retrievers serve (moves in one MULTI/EXEC)
``p:snap:tip``                        the newest version a writer made current (a rollback
                                      moves ``current`` only)
``p:snap:versions``                   sorted set of stored versions (score = version)
``p:snap:pending``                    sorted set of versions being written and not listed yet
                                      (score = when the write began, Unix seconds)
``p:snap:v:<n>:meta``                 hash: kind (full/delta), parent, base, created_ms,
                                      trainer_seq, and per part ``sha256:<part>``,
                                      ``size:<part>``, ``chunks:<part>``
``p:snap:v:<n>:part:<name>:<i>``      the i-th chunk of a part's bytes
``p:snap:notify``                     pub/sub channel; the message is the new version number
``p:hist:<user>``                     the user's recent interactions, newest first (msgpack)
``p:serving:offsets``                 hash ``<topic>:<partition>`` → the next offset the serving
                                      state holds (written in each batch's transaction)
``p:item:<item>``                     hash of item details (category, title, ts_ms)
``p:profile:<user>``                  the user's profile features (msgpack list of floats)
====================================  ==========================================================

A version is written completely (chunks and meta) before the pointer moves, and the pointer
never moves backwards except through an explicit rollback (which leaves ``tip`` at the newest
version the writer made current: what the publisher knew last). A delta names its parent; a
reader applies the chain from the nearest full version. A writer may store several versions
before moving the pointer once, to the last of them (``write(current=False)``, then
``make_current``): the publisher's chain compaction does, so that retrievers never serve its
new full version before the deltas copied onto it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import redis

from twotower.blobs import BlobError, checksum

log = logging.getLogger(__name__)

FULL = "full"
DELTA = "delta"
DEFAULT_CHUNK_BYTES = 8 << 20
PENDING_MAX_AGE_S = 3600.0
"""A version still pending this long after its write began was abandoned (its writer died
between storing parts and listing it): :meth:`SnapshotStore.trim` deletes it. No write of a
version takes that long; one that did would have its parts deleted and fail to list them."""
_SHA256_HEX = re.compile("[0-9a-f]{64}")
READ_PIECE_BYTES = 1 << 20
"""Bytes of a part read per round trip. Redis builds a reply whole before it serves another
client, so a big read holds up every other client, the retrievers' request path among them:
at 1M items an MGET of two 8 MB chunks did so for 10-75 ms (its slow log); reading 256 MB in
1 MB GETRANGEs, no command took 2 ms."""


@dataclass(frozen=True)
class SnapshotLayout:
    """Key names under a prefix; pure functions, tested byte for byte."""

    prefix: str

    @property
    def seq(self) -> str:
        return f"{self.prefix}:snap:seq"

    @property
    def current(self) -> str:
        return f"{self.prefix}:snap:current"

    @property
    def tip(self) -> str:
        return f"{self.prefix}:snap:tip"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:snap:versions"

    @property
    def pending(self) -> str:
        return f"{self.prefix}:snap:pending"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:snap:notify"

    def meta(self, version: int) -> str:
        return f"{self.prefix}:snap:v:{version}:meta"

    def chunk(self, version: int, part: str, index: int) -> str:
        return f"{self.prefix}:snap:v:{version}:part:{part}:{index}"

    def version_keys(self, version: int) -> str:
        """A ``SCAN MATCH`` pattern of every key of one version (the prefix's glob characters escaped)."""
        prefix = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return f"{prefix}:snap:v:{version}:*"

    @property
    def serving_offsets(self) -> str:
        return f"{self.prefix}:serving:offsets"

    def history(self, user_id: str) -> str:
        return f"{self.prefix}:hist:{user_id}"

    def item(self, item_id: str) -> str:
        return f"{self.prefix}:item:{item_id}"

    def profile(self, user_id: str) -> str:
        return f"{self.prefix}:profile:{user_id}"


class SnapshotError(RuntimeError):
    """A missing, incomplete or corrupt version."""


class MissingVersionError(SnapshotError):
    """A version with no meta hash in Redis: never written, trimmed, or lost with Redis's data."""

    def __init__(self, version: int) -> None:
        super().__init__(f"version {version} does not exist")
        self.version = version


@dataclass(frozen=True)
class VersionMeta:
    """What the meta hash of a version says."""

    version: int
    kind: str
    parent: int | None
    base: int
    created_ms: int
    trainer_seq: int
    parts: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    """part name → (sha256, size in bytes, chunk count)."""

    @staticmethod
    def from_hash(version: int, raw: Mapping[bytes, bytes]) -> VersionMeta:
        """Parse and check a meta hash: what a reader does with it must stay within the version.

        Raises:
            SnapshotError: a field is missing or out of its range. A delta's parent must be an
                older version (so a chain always ends), a full version is its own base, a
                checksum is 64 hex digits (a reader names files by it), a size and a chunk
                count are what the writer can have written.
        """
        try:
            data = {k.decode(): v.decode() for k, v in raw.items()}
            parts = {
                name: (data[f"sha256:{name}"], int(data[f"size:{name}"]), int(data[f"chunks:{name}"]))
                for name in filter(None, data["parts"].split(","))
            }
            meta = VersionMeta(
                version=version,
                kind=data["kind"],
                parent=int(data["parent"]) if data["parent"] else None,
                base=int(data["base"]),
                created_ms=int(data["created_ms"]),
                trainer_seq=int(data["trainer_seq"]),
                parts=parts,
            )
        except (KeyError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise SnapshotError(f"version {version} has an incomplete meta hash ({exc})") from None
        problem = meta._problem()
        if problem:
            raise SnapshotError(f"version {version} has a bad meta hash: {problem}")
        return meta

    def _problem(self) -> str | None:
        if self.kind == FULL:
            if self.parent is not None or self.base != self.version:
                return f"a full version with parent {self.parent} and base {self.base}"
        elif self.kind == DELTA:
            if self.parent is None or not 0 < self.parent < self.version or not 0 < self.base <= self.parent:
                return f"a delta with parent {self.parent} and base {self.base}"
        else:
            return f"kind {self.kind!r}"
        for name, (sha, size, chunks) in self.parts.items():
            if not _SHA256_HEX.fullmatch(sha):
                return f"part {name!r} has checksum {sha[:80]!r}, not 64 hex digits"
            if size < 0 or not 1 <= chunks <= max(1, size):
                return f"part {name!r} has size {size} in {chunks} chunks"
        return None


class SnapshotStore:
    """Writes and reads versions; shared by the publisher (writer) and the retrievers (readers)."""

    def __init__(
        self,
        client: redis.Redis,
        layout: SnapshotLayout,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        read_piece_bytes: int = READ_PIECE_BYTES,
    ) -> None:
        self.redis = client
        self.layout = layout
        self.chunk_bytes = chunk_bytes
        self.read_piece_bytes = read_piece_bytes

    # --- writing -------------------------------------------------------------------------
    def write(
        self, kind: str, parts: Mapping[str, bytes], parent: int | None, trainer_seq: int, *, current: bool = True
    ) -> int:
        """Store a version fully, then move the pointer to it and announce it.

        Args:
            kind: ``full`` or ``delta``.
            parts: part name → bytes.
            parent: the version a delta applies to (required for a delta).
            trainer_seq: the trainer checkpoint sequence number the version reflects.
            current: move the pointer; ``False`` stores the version (listed, so :meth:`trim`
                deletes it in time) for a later :meth:`make_current` of it or of a delta on it.

        Returns:
            The new version number.
        """
        if kind not in (FULL, DELTA):
            raise ValueError(f"kind must be {FULL!r} or {DELTA!r}")
        if kind == DELTA and parent is None:
            raise ValueError("a delta needs a parent")
        lay = self.layout
        base = 0
        if kind == DELTA:
            assert parent is not None
            base = self.meta(parent).base
        version = int(self.redis.incr(lay.seq))
        if kind == FULL:
            base = version
        # pending before anything of it is stored: a writer that dies before listing it leaves
        # what a trim can find (see PENDING_MAX_AGE_S)
        self.redis.zadd(lay.pending, {str(version): time.time()})
        meta: dict[str, str | int] = {
            "kind": kind,
            "parent": "" if parent is None else parent,
            "base": base,
            "created_ms": int(time.time() * 1000),
            "trainer_seq": trainer_seq,
            "parts": ",".join(parts),
        }
        pipe = self.redis.pipeline(transaction=False)
        for name, data in parts.items():
            if ":" in name or "," in name:
                raise ValueError(f"bad part name {name!r}")
            chunks = [data[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)] or [b""]
            for i, chunk in enumerate(chunks):
                pipe.set(lay.chunk(version, name, i), chunk)
            meta[f"sha256:{name}"] = checksum(data)
            meta[f"size:{name}"] = len(data)
            meta[f"chunks:{name}"] = len(chunks)
        pipe.hset(lay.meta(version), mapping=meta)
        if not current:
            pipe.zadd(lay.versions, {str(version): version})
            pipe.zrem(lay.pending, str(version))
        try:
            pipe.execute()
            if current:
                self._point_to(version, forward_only=True)
        except BaseException:
            self._forget(version)
            raise
        return version

    def _forget(self, version: int) -> None:
        """After a write failed: delete what it stored of ``version``, unless it got listed or
        made current (then a trim deletes it in its turn). Unlisted, no trim would ever see it,
        and each retry of a full version would leave hundreds of MB behind."""
        try:
            if self.current_version() == version or self.redis.zscore(self.layout.versions, str(version)) is not None:
                return
            self._unlink_version_keys(version)
            self.redis.zrem(self.layout.pending, str(version))
        except redis.RedisError as exc:
            log.warning("version %d failed to write, and what it stored could not be deleted: %s", version, exc)

    def make_current(self, version: int) -> None:
        """Move the pointer to a version stored with ``current=False`` (never back to an older one)."""
        self._point_to(version, forward_only=True)

    def read_parts(self, meta: VersionMeta) -> dict[str, bytes]:
        """Every part of a version, each checked (:meth:`read_part`)."""
        return {name: self.read_part(meta, name) for name in meta.parts}

    def _point_to(self, version: int, forward_only: bool) -> None:
        lay = self.layout
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(lay.current, lay.tip)
                    current = pipe.get(lay.current)
                    tip = pipe.get(lay.tip)
                    if forward_only and current is not None and int(current) > version:
                        pipe.unwatch()
                        # a newer version is already current; never go back silently (listed,
                        # so that a trim deletes it in its turn)
                        with self.redis.pipeline(transaction=True) as listing:
                            listing.zadd(lay.versions, {str(version): version})
                            listing.zrem(lay.pending, str(version))
                            listing.execute()
                        return
                    pipe.multi()
                    pipe.set(lay.current, version)
                    if forward_only and (tip is None or int(tip) < version):
                        pipe.set(lay.tip, version)
                    pipe.zadd(lay.versions, {str(version): version})
                    pipe.zrem(lay.pending, str(version))
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        try:
            self.redis.publish(lay.channel, str(version))
        except redis.RedisError as exc:  # the pointer has moved: retrievers also poll it
            log.warning("version %d is current, but its notice was not sent (%s)", version, exc)

    def rollback(self, version: int) -> None:
        """Point retrievers back to a stored version (checked complete first); ``tip`` stays."""
        for meta in self.chain(version):
            self.read_parts(meta)
        self._point_to(version, forward_only=False)

    def trim(self, keep_full: int, pending_max_age_s: float = PENDING_MAX_AGE_S) -> list[int]:
        """Delete every version older than the ``keep_full``-th newest full version, and every
        version left pending for ``pending_max_age_s`` (a writer died while storing it).

        Returns:
            The deleted version numbers.
        """
        abandoned = [
            int(v) for v in self.redis.zrangebyscore(self.layout.pending, "-inf", time.time() - pending_max_age_s)
        ]
        for v in abandoned:
            log.warning("version %d was never listed (its writer stopped while storing it): deleting its keys", v)
            self._unlink_version_keys(v)
            self.redis.zrem(self.layout.pending, str(v))
        return abandoned + self._trim_listed(keep_full)

    def _trim_listed(self, keep_full: int) -> list[int]:
        versions = [int(v) for v in self.redis.zrange(self.layout.versions, 0, -1)]
        metas: dict[int, VersionMeta] = {}
        for v in versions:
            try:
                metas[v] = self.meta(v)
            except SnapshotError:  # listed without its meta: a trim stopped half-way, finish it
                self._delete_leftovers(v)
        fulls = [v for v, meta in metas.items() if meta.kind == FULL]
        if len(fulls) <= keep_full:
            return []
        cutoff = fulls[-keep_full]
        current = self.current_version()
        current_base = None if current is None else (metas.get(current) or self.meta(current)).base
        doomed = [v for v in metas if v < cutoff and (current_base is None or v < current_base)]
        for v in doomed:
            meta = metas[v]
            keys = [self.layout.chunk(v, n, i) for n, (_, _, c) in meta.parts.items() for i in range(c)]
            # one key per command: freeing a value takes Redis time, during which it serves no
            # other client (one DEL of a 1M-item version's chunks held them all for 30-70 ms;
            # an UNLINK frees big strings in place too); one 8 MB chunk took under 1 ms alone,
            # though on a busy machine some still take tens of ms
            for key in keys:
                self.redis.unlink(key)
            self.redis.unlink(self.layout.meta(v))  # then the listing: stopped before it, the next
            self.redis.zrem(self.layout.versions, str(v))  # trim finds the version without meta
        return doomed

    def _delete_leftovers(self, version: int) -> None:
        """Delete what is left of a listed version whose meta is gone, then unlist it."""
        log.warning("version %d is listed without its meta (a trim was interrupted): deleting its keys", version)
        self._unlink_version_keys(version)
        self.redis.zrem(self.layout.versions, str(version))

    def _unlink_version_keys(self, version: int) -> None:
        """Delete every key of ``version`` found by name (for a version whose meta, which lists
        its chunks, may be missing); one key per command, as :meth:`trim` does."""
        for key in self.redis.scan_iter(match=self.layout.version_keys(version), count=1000):
            self.redis.unlink(key)

    # --- reading -------------------------------------------------------------------------
    def current_version(self) -> int | None:
        raw = self.redis.get(self.layout.current)
        return int(raw) if raw is not None else None

    def tip_version(self) -> int | None:
        """The newest version a writer made current (``None`` if none did, or the store predates
        the key): the current one, unless a rollback moved the pointer since."""
        raw = self.redis.get(self.layout.tip)
        return int(raw) if raw is not None else None

    def meta(self, version: int) -> VersionMeta:
        raw = self.redis.hgetall(self.layout.meta(version))
        if not raw:
            raise MissingVersionError(version)
        return VersionMeta.from_hash(version, raw)

    def read_part(self, meta: VersionMeta, name: str) -> bytes:
        """A part's bytes, checked against its size and checksum.

        Raises:
            SnapshotError: the part is missing or corrupt.
        """
        if name not in meta.parts:
            raise SnapshotError(f"version {meta.version} has no part {name!r}")
        sha, size, _ = meta.parts[name]
        data = b"".join(self.iter_part(meta, name))
        if len(data) != size or checksum(data) != sha:
            raise SnapshotError(f"version {meta.version} part {name!r} fails its checksum")
        return data

    def iter_part(self, meta: VersionMeta, name: str) -> Iterator[bytes]:
        """A part's bytes in order, unchecked, in pieces of at most ``read_piece_bytes``, one
        per round trip (``GETRANGE``), so that reading a big part never holds Redis up for long
        (see :data:`READ_PIECE_BYTES`).

        Raises:
            SnapshotError: the part or one of its chunks is missing.
        """
        if name not in meta.parts:
            raise SnapshotError(f"version {meta.version} has no part {name!r}")
        _, size, chunks = meta.parts[name]
        step = self.read_piece_bytes
        for i in range(chunks):
            key = self.layout.chunk(meta.version, name, i)
            pipe = self.redis.pipeline(transaction=False)
            pipe.strlen(key)
            pipe.getrange(key, 0, step - 1)
            length, piece = pipe.execute()
            if length == 0 and size > 0:  # only an empty part has an empty chunk
                raise SnapshotError(f"version {meta.version} part {name!r} is missing chunks")
            yield piece
            for start in range(len(piece), length, step):
                piece = self.redis.getrange(key, start, min(start + step, length) - 1)
                if not piece:
                    raise SnapshotError(f"version {meta.version} part {name!r} is missing chunks")
                yield piece

    def chain(self, version: int) -> list[VersionMeta]:
        """The versions to apply, oldest first: the base full version, then each delta to ``version``."""
        out = [self.meta(version)]
        while out[-1].kind == DELTA:
            parent = out[-1].parent
            if parent is None:
                raise SnapshotError(f"delta {out[-1].version} has no parent")
            out.append(self.meta(parent))
        return out[::-1]


__all__ = [
    "DELTA",
    "FULL",
    "BlobError",
    "MissingVersionError",
    "SnapshotError",
    "SnapshotLayout",
    "SnapshotStore",
    "VersionMeta",
]
