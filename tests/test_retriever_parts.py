"""retriever.parts: big parts read chunk by chunk and shared by the workers of a host."""

from __future__ import annotations

import errno
import logging
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from test_retriever_unit import CFG, make_full, unit

from retriever import parts
from retriever.parts import PartReader
from retriever.state import BIG_PARTS, ServingState
from twotower.snapshot_parts import INDEX, encode_full
from twotower.snapshots import FULL, SnapshotError, SnapshotLayout, SnapshotStore

pytestmark = pytest.mark.integration


@pytest.fixture
def store(redis_url: str) -> Iterator[SnapshotStore]:
    client = redis.Redis.from_url(redis_url)
    # small chunks: every big part has several, read over several round trips
    yield SnapshotStore(client, SnapshotLayout(f"t{uuid.uuid4().hex[:12]}"), chunk_bytes=1000)
    client.close()


def results(state: ServingState) -> list[list[tuple[str, float]]]:
    queries = unit(np.random.default_rng(7).standard_normal((20, CFG.dim)))
    return [state.search(q, 10) for q in queries]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "hnsw-float16", "idmap"])
def test_shared_directory_gives_the_same_state_and_skips_redis(store: SnapshotStore, tmp_path: Path, kind: str) -> None:
    version = store.write(FULL, encode_full(make_full(kind=kind)), None, 0)
    chain = store.chain(version)
    plain = ServingState.from_chain(store, chain)
    first = ServingState.from_chain(store, chain, PartReader(tmp_path / "shared"))
    assert sorted(os.listdir(tmp_path / "shared")) == sorted(
        f"{name}-{chain[0].parts[name][1]}-{chain[0].parts[name][0]}" for name in BIG_PARTS
    )
    # a second worker maps the files: it no longer needs the big parts in Redis
    for name in BIG_PARTS:
        store.redis.delete(*(store.layout.chunk(version, name, i) for i in range(chain[0].parts[name][2])))
    second = ServingState.from_chain(store, chain, PartReader(tmp_path / "shared"))
    with pytest.raises(SnapshotError, match="missing chunks"):
        ServingState.from_chain(store, chain)
    want = results(plain)
    assert results(first) == want
    assert results(second) == want
    assert np.array_equal(second.base_vectors, plain.base_vectors)
    assert not second.base_vectors.flags.writeable


def test_a_directory_that_cannot_hold_a_part_falls_back_to_memory(
    store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full tmpfs (or any write error) costs the sharing, not the version."""
    version = store.write(FULL, encode_full(make_full(kind="hnsw")), None, 0)
    chain = store.chain(version)

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(parts, "_create", full)
    state = ServingState.from_chain(store, chain, PartReader(tmp_path / "shared"))
    assert results(state) == results(ServingState.from_chain(store, chain))
    assert os.listdir(tmp_path / "shared") == []


@pytest.mark.parametrize("shared", [False, True])
def test_corrupt_part_is_refused_and_not_shared(store: SnapshotStore, tmp_path: Path, shared: bool) -> None:
    version = store.write(FULL, encode_full(make_full()), None, 0)
    chain = store.chain(version)
    key = store.layout.chunk(version, INDEX, 1)
    chunk = bytearray(store.redis.get(key))
    chunk[3] ^= 0xFF
    store.redis.set(key, bytes(chunk))
    directory = tmp_path / "shared" if shared else None
    with pytest.raises(SnapshotError, match="fails its checksum"):
        ServingState.from_chain(store, chain, PartReader(directory))
    if directory is not None:
        assert not any(name.startswith(INDEX) or name.startswith(".tmp") for name in os.listdir(directory))


def test_keep_only_removes_other_versions_files(store: SnapshotStore, tmp_path: Path) -> None:
    reader = PartReader(tmp_path / "shared")
    old = store.write(FULL, encode_full(make_full(seed=1)), None, 0)
    new = store.write(FULL, encode_full(make_full(seed=2)), None, 0)
    state_old = ServingState.from_chain(store, store.chain(old), reader)
    ServingState.from_chain(store, store.chain(new), reader)
    assert len(os.listdir(tmp_path / "shared")) == 2 * len(BIG_PARTS)
    reader.keep_only(store.chain(new))
    assert len(os.listdir(tmp_path / "shared")) == len(BIG_PARTS)
    assert len(results(state_old)[0]) == 10  # what the old state mapped stays readable
    reader.keep_only([])
    assert not (tmp_path / "shared").exists()
    ServingState.from_chain(store, store.chain(new), reader)  # the directory is made again
    assert len(os.listdir(tmp_path / "shared")) == len(BIG_PARTS)


def test_a_directory_others_can_write_to_is_not_used(tmp_path: Path) -> None:
    """A shared file is trusted on its name and size: a directory another user could write to
    (or made first, or links elsewhere) is not used, and each worker reads Redis itself."""
    assert PartReader(tmp_path / "a" / "b").directory == tmp_path / "a" / "b"
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700  # made private, whatever the umask
    open_to_all = tmp_path / "open"
    open_to_all.mkdir(mode=0o700)
    os.chmod(open_to_all, 0o777)
    assert PartReader(open_to_all).directory is None
    assert PartReader(open_to_all / "inside").directory is None  # its parent is not safe either
    (tmp_path / "link").symlink_to(tmp_path / "a" / "b")
    assert PartReader(tmp_path / "link").directory is None


def test_keep_only_without_a_directory_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = PartReader(tmp_path / "shared")
    (tmp_path / "shared").rmdir()  # a worker stopping before any version was loaded, after another
    with caplog.at_level(logging.WARNING, logger="retriever.parts"):
        reader.keep_only([])
    assert caplog.records == []


MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
tmpfs /run/parts tmpfs rw,relatime,size=4194304k,mode=700,huge=within_size 0 0
tmpfs /run/parts/plain tmpfs rw,relatime,huge=never 0 0
tmpfs /srv/my\\040parts tmpfs rw,huge=always 0 0
/dev/vdb /srv/disk ext4 rw,relatime 0 0
"""


@pytest.mark.parametrize(
    ("path", "huge"),
    [
        ("/run/parts", True),
        ("/run/parts/abc/def", True),
        ("/run/parts/plain/abc", False),  # the innermost mount decides
        ("/run/partsx", False),  # a name that merely starts like a mount point
        ("/dev/shm/twotower", False),  # a tmpfs without huge pages
        ("/srv/my parts/x", True),  # /proc/mounts escapes spaces
        ("/srv/disk/x", False),
        ("/tmp/x", False),
    ],
)
def test_a_parts_directory_on_a_huge_page_tmpfs_is_recognised(path: str, huge: bool) -> None:
    from retriever.parts import on_huge_page_tmpfs

    assert on_huge_page_tmpfs(Path(path), MOUNTS) is huge


def test_the_workers_reader_copies_the_index_into_huge_pages_only_from_a_directory_without_them(
    tmp_path: Path,
) -> None:
    from retriever.parts import host_part_reader
    from twotower.config import RetrieverConfig

    shared = tmp_path / "parts"  # not a tmpfs with huge pages
    copied = host_part_reader("redis://x", "p", RetrieverConfig(parts_dir=str(shared), index_huge_pages=True))
    assert copied.directory == shared and copied.map_index is False
    mapped = host_part_reader("redis://x", "p", RetrieverConfig(parts_dir=str(shared), index_huge_pages=False))
    assert mapped.directory == shared and mapped.map_index is True
    none = host_part_reader("redis://x", "p", RetrieverConfig(parts_dir=""))
    assert none.directory is None  # every worker reads Redis itself
