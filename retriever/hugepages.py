"""Transparent huge pages for the Faiss index a retriever process searches.

An HNSW search at 1M items reads a few thousand vectors and graph rows scattered over ~0.5 GB.
With 4 KiB pages nearly every one of those reads misses the TLB, and in a virtual machine a TLB
miss walks two page tables. Backed by 2 MiB pages the same search costs about a third less
(measured in-process at 1M items, four interleaved rounds: p50 0.70-0.93 → 0.48-0.59 ms, p99
1.2-7.0 → 0.7-1.0 ms).

Linux hands out huge pages only to memory that asks for them (``madvise``, the default THP
mode on most distributions), and Faiss allocates its arrays itself. glibc (2.35 on) can ask for
every allocation it maps: the ``glibc.malloc.hugetlb=1`` tunable, which glibc reads only when a
process starts. :func:`reexec_with_huge_pages` therefore runs the current command again, same
pid, with the tunable added to ``GLIBC_TUNABLES``; the worker processes it starts inherit it.
Other C libraries and systems ignore or lack the tunable: nothing happens there.

A file mapping (the shared ``/dev/shm`` part files of :mod:`retriever.parts`) cannot get huge
pages while tmpfs is mounted without ``huge=``, so with huge pages on each worker reads the
index into its own memory instead of mapping it (``retriever.index_huge_pages``) — unless the
parts directory is a tmpfs mounted with huge pages (:func:`retriever.parts.on_huge_page_tmpfs`):
then the mapped file has them, and every worker maps the one copy.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, MutableMapping

ENV = "GLIBC_TUNABLES"
TUNABLE = "glibc.malloc.hugetlb"
VALUE = "1"
SMAPS_ROLLUP = "/proc/self/smaps_rollup"


def supported() -> bool:
    """Whether the tunable can take effect here: Linux with glibc."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tunables_with_huge_pages(current: str | None) -> str:
    """``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1`` set, every other tunable kept
    (colon-separated ``name=value`` pairs; an earlier value of the same tunable is replaced)."""
    kept = [item for item in (current or "").split(":") if item and item.split("=", 1)[0] != TUNABLE]
    return ":".join([*kept, f"{TUNABLE}={VALUE}"])


def active(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started with the tunable set."""
    return f"{TUNABLE}={VALUE}" in environ.get(ENV, "").split(":")


def reexec_with_huge_pages(environ: MutableMapping[str, str] = os.environ) -> None:
    """Run this process's command again with the tunable set, unless it already is or cannot
    take effect here. Call it first thing in a command, before threads, sockets or output: the
    process image is replaced (same pid, same arguments, ``sys.orig_argv``)."""
    if active(environ) or not supported():
        return
    environ[ENV] = tunables_with_huge_pages(environ.get(ENV))
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
