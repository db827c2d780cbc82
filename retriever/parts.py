"""Reading a full version's big parts cheaply: no whole-part copies, and once per host.

A full version's ``index``, ``items`` and ``users`` parts are hundreds of MB at 1M items.
Reading them the plain way (:meth:`~twotower.snapshots.SnapshotStore.read_part`) joins the
chunks into one bytes object (a copy of the whole part), and ``faiss.deserialize_index`` copies
the index once more into the index's own arrays; and every worker process of a host reads, checks,
copies and decodes the same bytes (measured at 1M items: 4-5 s of CPU per worker).

:class:`PartReader` reads the part in pieces (:meth:`~twotower.snapshots.SnapshotStore.iter_part`),
hashing each as it arrives, into a buffer filled piece by piece, and checks size and SHA-256
exactly as ``read_part`` does.

With a ``directory`` (host-local, ideally tmpfs such as ``/dev/shm``) the buffer is a file
named after the part's SHA-256: the first worker of the host that needs a part writes it
there (to a temporary name, renamed into place only after its checksum matched), and every
worker maps the file read-only. So the other workers skip Redis, the copy and the checksum,
the item vectors are one set of shared pages, and the index is read with
``faiss.IO_FLAG_MMAP_IFC``: its vectors and, for HNSW, its graph are mapped, not copied (1M
items: 85 MB of the process's own memory against 580 MB) — unless ``map_index`` is off, as it
is with huge pages (:mod:`retriever.malloc`) on a directory without them: then each process
reads the index from the file into its own memory. A tmpfs mounted with huge pages
(:func:`on_huge_page_tmpfs`) has both: the file's pages are 2 MB, so the mapped index is
searched as fast as the copy (measured at 1M items: p50 0.41-0.45 ms against 0.43-0.44, 4 KB
pages 0.48-0.53), loads in 0.15 s and allocates nothing at a reload. A file that is missing
(removed by another worker's cleanup in between) is simply written again; nothing read from
the directory is unpickled, and a file's name is its checksum, so only bytes that matched a
version's meta are ever used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from twotower.blobs import UNPACK_READ_SIZE
from twotower.config import RetrieverConfig
from twotower.snapshots import SnapshotError, SnapshotStore, VersionMeta

log = logging.getLogger(__name__)

SHARED_ROOT = Path("/dev/shm")
"""Where :func:`shared_directory` puts the worker processes' shared files (tmpfs: memory the
workers map, never written to a disk)."""
"""Overrides the shared directory; empty: no directory (every worker reads Redis itself)."""
STALE_TEMP_S = 600.0
"""A temporary file older than this is from a worker that died while writing it."""

Buffer = np.ndarray | mmap.mmap
"""A part's bytes: a read-only file mapping, or a uint8 array."""


def _corrupt(meta: VersionMeta, name: str) -> SnapshotError:
    return SnapshotError(f"version {meta.version} part {name!r} fails its checksum")


def shared_directory(redis_url: str, prefix: str, configured: str | None = None) -> Path | None:
    """The directory the worker processes of this host share for the snapshots of one Redis
    and key prefix: ``configured`` (``retriever.parts_dir``) if set (empty: none), else under
    ``/dev/shm`` (per user; ``None`` when there is no ``/dev/shm``)."""
    if configured is not None:
        return Path(configured) if configured else None
    if not SHARED_ROOT.is_dir():
        return None
    key = hashlib.sha256(f"{redis_url}\n{prefix}".encode()).hexdigest()[:16]
    return SHARED_ROOT / f"twotower-retriever-{os.getuid()}" / key


MOUNTS = Path("/proc/self/mounts")
HUGE_TMPFS_OPTIONS = frozenset({"huge=always", "huge=within_size"})
"""tmpfs mount options under which a file written in full is backed by 2 MB pages."""


def on_huge_page_tmpfs(path: Path, mounts: str | None = None) -> bool:
    """Whether ``path`` lies on a tmpfs mounted with huge pages (``huge=always`` or
    ``huge=within_size``): files there are backed by 2 MB pages, so an index mapped from one is
    searched as fast as one copied into huge-page memory, with one copy per host and no
    allocation at a reload.

    Args:
        mounts: the text of ``/proc/self/mounts`` (read when ``None``; no such file: ``False``).
    """
    if mounts is None:
        try:
            mounts = MOUNTS.read_text()
        except OSError:
            return False
    target = os.path.realpath(path)
    best: tuple[int, bool] = (-1, False)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best[0]:  # the innermost mount holds the path
            huge = fields[2] == "tmpfs" and not HUGE_TMPFS_OPTIONS.isdisjoint(fields[3].split(","))
            best = (len(point), huge)
    return best[1]


def is_private(directory: Path) -> bool:
    """Whether no other user (root aside) can put or replace a file in ``directory``: it is a
    real directory of this user that no one else may write to, and each directory above it
    belongs to this user or root and is writable by others only with the sticky bit (as
    ``/dev/shm`` and ``/tmp`` are). A file found there is trusted on its name and size, so a
    directory another local user made first (say under ``/dev/shm``) must not be used."""
    uid = os.getuid()
    path = directory.absolute()
    for level, current in enumerate([path, *path.parents]):
        try:
            st = os.lstat(current)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):  # a symlink included
            return False
        others_write = st.st_mode & 0o022
        if level == 0 and (st.st_uid != uid or others_write):
            return False
        if level > 0 and (st.st_uid not in (uid, 0) or (others_write and not st.st_mode & stat.S_ISVTX)):
            return False
    return True


def host_part_reader(redis_url: str, prefix: str, cfg: RetrieverConfig) -> PartReader:
    """The reader a retriever worker uses for the snapshots of one Redis and key prefix: through
    the host's shared directory (``retriever.parts_dir``, :func:`shared_directory`), the index
    mapped from it unless it is to be copied into the process's own huge pages
    (``retriever.index_huge_pages``) and the directory has none of its own
    (:func:`on_huge_page_tmpfs`)."""
    directory = shared_directory(redis_url, prefix, cfg.parts_dir)
    huge_directory = directory is not None and on_huge_page_tmpfs(directory)
    return PartReader(directory, map_index=huge_directory or not cfg.index_huge_pages)


class PartReader:
    """Reads big parts of full versions, through ``directory`` when given (see the module doc).

    Args:
        directory: host-local directory the worker processes of a host share (created with
            mode 0700); ``None``: each process reads every part from Redis into memory.
        map_index: map the index's vectors from the shared file (one copy per host); ``False``
            copies them into the process's own memory, which can be backed by huge pages
            (``retriever.index_huge_pages``, :mod:`retriever.malloc`).
    """

    def __init__(self, directory: Path | None = None, map_index: bool = True) -> None:
        self.directory = directory
        self.map_index = map_index
        if directory is not None:
            for missing in reversed([d for d in (directory, *directory.parents) if not d.exists()]):
                missing.mkdir(mode=0o700, exist_ok=True)  # parents too: whatever the umask, only ours
            if not is_private(directory):
                log.warning("%s is not private to this user: every part is read from Redis instead", directory)
                self.directory = None

    def _path(self, meta: VersionMeta, name: str) -> Path:
        assert self.directory is not None
        sha, size, _ = meta.parts[name]
        return self.directory / f"{name}-{size}-{sha}"

    def read(self, store: SnapshotStore, meta: VersionMeta, name: str) -> Buffer:
        """The part's bytes (size and checksum verified), read-only.

        Raises:
            SnapshotError: the part is missing or corrupt.
        """
        if self.directory is None:
            return self._read_memory(store, meta, name)
        try:
            return self._map(self._file(store, meta, name))
        except OSError as exc:
            self._not_shared(name, exc)
            return self._read_memory(store, meta, name)

    def read_index(self, store: SnapshotStore, meta: VersionMeta, name: str) -> faiss.Index:
        """The Faiss index stored in the part (its vectors mapped from the shared file, when
        there is a directory, ``map_index`` is set and the index kind allows it).

        Raises:
            SnapshotError: the part is missing, corrupt or not a Faiss index.
        """
        if self.directory is None:
            return deserialize_index(self._read_memory(store, meta, name))
        try:
            path = self._file(store, meta, name)
        except OSError as exc:
            self._not_shared(name, exc)
            return deserialize_index(self._read_memory(store, meta, name))
        if self.map_index:
            try:
                return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError as exc:
                log.debug("cannot map index %s (%s); reading it whole", path, str(exc).splitlines()[0])
        # straight from the file into the index's own arrays: one copy, against two through a
        # serialized buffer (1M items: 0.37 s against 1.08 s, measured)
        try:
            return faiss.read_index(str(path))
        except RuntimeError as exc:
            raise _not_an_index(exc) from None

    def keep_only(self, metas: Iterable[VersionMeta]) -> None:
        """Delete the shared files of every part but those of ``metas`` (mappings of deleted
        files stay valid; a worker that needs a deleted file writes it again), and temporary
        files a dead writer left behind. ``keep_only([])`` when a worker stops: nothing stays
        behind in memory after the service is stopped."""
        if self.directory is None:
            return
        keep = {self._path(meta, name).name for meta in metas for name in meta.parts}
        now = time.time()
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:  # nothing was ever written (or another worker removed it)
            return
        except OSError as exc:
            log.warning("cannot list %s: %s", self.directory, exc)
            return
        for entry in entries:
            try:
                if entry.name in keep:
                    continue
                if entry.name.startswith(".tmp-") and now - entry.stat().st_mtime < STALE_TEMP_S:
                    continue  # another worker is writing it
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s: %s", entry.path, exc)
        if not keep:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # a worker writing meanwhile recreates it

    def _not_shared(self, name: str, exc: OSError) -> None:
        """A part the directory cannot hold or give back (full, unwritable, the file removed by
        another worker's cleanup between two calls) is read into this process instead."""
        log.warning("cannot share part %s through %s (%s): reading it into this process", name, self.directory, exc)

    # --- the two buffers ----------------------------------------------------------------------
    def _read_memory(self, store: SnapshotStore, meta: VersionMeta, name: str) -> np.ndarray:
        sha, size, _ = meta.parts.get(name, ("", 0, 0))
        # np.empty: no zero-filling pass (bytearray(n) is a memset that holds the GIL)
        out = np.empty(size, dtype=np.uint8)
        hasher = hashlib.sha256()
        filled = 0
        for chunk in store.iter_part(meta, name):
            if filled + len(chunk) > size:
                raise _corrupt(meta, name)
            src = np.frombuffer(chunk, dtype=np.uint8)
            for i in range(0, len(src), UNPACK_READ_SIZE):  # 1 MiB per copy: short GIL holds
                end = min(i + UNPACK_READ_SIZE, len(src))
                out[filled + i : filled + end] = src[i:end]
            hasher.update(chunk)  # releases the GIL
            filled += len(chunk)
        if filled != size or hasher.hexdigest() != sha:
            raise _corrupt(meta, name)
        out.setflags(write=False)
        return out

    def _file(self, store: SnapshotStore, meta: VersionMeta, name: str) -> Path:
        """The shared file of the part, written first if no worker has yet."""
        path = self._path(meta, name)
        sha, size, _ = meta.parts[name]
        try:
            if path.stat().st_size == size:
                return path
        except FileNotFoundError:
            pass
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        hasher = hashlib.sha256()
        written = 0
        try:
            with _create(tmp) as f:
                for chunk in store.iter_part(meta, name):
                    hasher.update(chunk)
                    f.write(chunk)  # releases the GIL
                    written += len(chunk)
            if written != size or hasher.hexdigest() != sha:
                raise _corrupt(meta, name)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def _map(self, path: Path) -> Buffer:
        with open(path, "rb") as f:  # the mapping outlives the file object (and the file's name)
            size = os.fstat(f.fileno()).st_size
            if size == 0:  # mmap cannot map nothing
                return np.empty(0, dtype=np.uint8)
            return mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)


def _create(path: Path) -> BinaryIO:
    """``path`` opened for writing, its directory made again if a stopping worker removed it."""
    for _ in range(3):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return open(path, "wb")
        except FileNotFoundError:
            continue
    return open(path, "wb")


def deserialize_index(data: Buffer | bytes) -> faiss.Index:
    """A Faiss index from ``faiss.serialize_index`` bytes.

    Raises:
        SnapshotError: the bytes are not a Faiss index.
    """
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise _not_an_index(exc) from None


def _not_an_index(exc: RuntimeError) -> SnapshotError:
    return SnapshotError(f"index part is not a faiss index: {str(exc).splitlines()[0]}")
