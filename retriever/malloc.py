"""How a retriever process's C allocator is set up: huge pages for the Faiss index, and memory
kept for the next version instead of handed back.

Both are glibc malloc tunables (``GLIBC_TUNABLES``), which glibc reads only when a process
starts: :func:`reexec_with` runs the current command again, same pid, with them added; the
worker processes it starts inherit them. Other C libraries and systems ignore or lack the
tunables: nothing happens there.

**Huge pages** (:data:`HUGE_PAGES`, ``retriever.index_huge_pages``). An HNSW search at 1M items
reads a few thousand vectors and graph rows scattered over ~0.5 GB. With 4 KiB pages nearly
every one of those reads misses the TLB, and in a virtual machine a TLB miss walks two page
tables. Backed by 2 MiB pages the same search costs about a third less (measured in-process at
1M items, four interleaved rounds: p50 0.70-0.93 → 0.48-0.59 ms, p99 1.2-7.0 → 0.7-1.0 ms).
Linux hands out huge pages only to memory that asks for them (``madvise``, the default THP mode
on most distributions), and Faiss allocates its arrays itself; ``glibc.malloc.hugetlb=1`` makes
glibc ask for every allocation it maps. A file mapping (the shared ``/dev/shm`` part files of
:mod:`retriever.parts`) cannot get huge pages while tmpfs is mounted without ``huge=``, so with
huge pages on each worker reads the index into its own memory instead of mapping it — unless
the parts directory is a tmpfs mounted with huge pages
(:func:`retriever.parts.on_huge_page_tmpfs`): then the mapped file has them, and every worker
maps the one copy.

**Freed memory kept** (:data:`RETAIN_FREED`, ``retriever.retain_freed_memory``). glibc serves
an allocation above its mmap threshold (128 KiB, rising to at most 32 MiB; an index's vectors
and graph are hundreds of MB) with a mapping of its own, and unmaps it when freed; and a thread
other than the main one (the snapshot watcher reads every version) gets its own mapping for
anything over 64 MiB, whatever that threshold. So every full version was read into memory the
kernel had just zeroed, and the previous version's pages went back to the kernel, which on a
virtual machine with free page reporting hands them to the host at once; faulting them in again
goes through the host. At 1M items that is ~0.6 GB per worker per full version, and the
measured cost was both workers' event loops stalled for tens to hundreds of ms together
(docs/BENCHMARKS.md, sessions 10 and 11). With one arena for all threads (``arena_max=1``), no
allocation served by its own mapping (``mmap_max=0``) and the heap never trimmed
(``trim_threshold``), freed memory stays in the process, already faulted in and backed by huge
pages, and the next version is read into it. The cost: a worker's resident memory stays at its
high-water mark (two indexes' worth during a swap, ~1.2 GB at 1M items) instead of falling
back between swaps.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, MutableMapping

from twotower.config import RetrieverConfig

ENV = "GLIBC_TUNABLES"
HUGE_PAGES: Mapping[str, str] = {"glibc.malloc.hugetlb": "1"}
"""Every allocation glibc maps is advised for transparent huge pages."""
RETAIN_FREED: Mapping[str, str] = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
}
"""One arena for all threads, no allocation with a mapping of its own, the heap never trimmed:
freed memory stays in the process for the next allocation."""
SMAPS_ROLLUP = "/proc/self/smaps_rollup"


def supported() -> bool:
    """Whether the tunables can take effect here: Linux with glibc."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def wanted(cfg: RetrieverConfig) -> dict[str, str]:
    """The tunables a retriever process runs with under ``cfg`` (``index_huge_pages``,
    ``retain_freed_memory``); empty when both are off."""
    out: dict[str, str] = {}
    if cfg.index_huge_pages:
        out.update(HUGE_PAGES)
    if cfg.retain_freed_memory:
        out.update(RETAIN_FREED)
    return out


def tunables_with(current: str | None, tunables: Mapping[str, str]) -> str:
    """``GLIBC_TUNABLES`` with ``tunables`` set, every other tunable kept (colon-separated
    ``name=value`` pairs; an earlier value of a tunable set here is replaced)."""
    kept = [item for item in (current or "").split(":") if item and item.split("=", 1)[0] not in tunables]
    return ":".join([*kept, *(f"{name}={value}" for name, value in tunables.items())])


def active(tunables: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started with all of ``tunables`` set."""
    present = set(environ.get(ENV, "").split(":"))
    return all(f"{name}={value}" in present for name, value in tunables.items())


def reexec_with(tunables: Mapping[str, str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Run this process's command again with ``tunables`` set, unless they already are, there
    are none, or they cannot take effect here. Call it first thing in a command, before threads,
    sockets or output: the process image is replaced (same pid, same arguments, ``sys.orig_argv``)."""
    if not tunables or active(tunables, environ) or not supported():
        return
    environ[ENV] = tunables_with(environ.get(ENV), tunables)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


HUGE_PAGE_FIELDS = ("AnonHugePages:", "ShmemPmdMapped:", "FilePmdMapped:")
"""The lines of ``smaps_rollup`` that count memory mapped by huge pages: the process's own, and
files it maps from a tmpfs (or file system) with huge pages (:func:`retriever.parts.on_huge_page_tmpfs`)."""


def huge_page_bytes() -> int | None:
    """Bytes of this process's memory mapped by transparent huge pages (the
    :data:`HUGE_PAGE_FIELDS` of ``/proc/self/smaps_rollup``); ``None`` where the kernel does not say."""
    total, seen = 0, False
    try:
        with open(SMAPS_ROLLUP) as f:
            for line in f:
                if line.startswith(HUGE_PAGE_FIELDS):
                    total += int(line.split()[1]) * 1024
                    seen = True
    except (OSError, ValueError, IndexError):
        return None
    return total if seen else None
