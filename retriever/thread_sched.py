"""How the kernel schedules a worker's threads: the watcher's lower priority and the request
thread's shorter time slice (Linux; elsewhere both are logged and skipped).

Linux's scheduler (EEVDF, since 6.6) gives each runnable thread a time slice and a virtual
deadline one slice ahead, and lets the running thread use up its slice: a thread that wakes
preempts it before then only if it asked for a *shorter* slice (since 6.12: ``sched_setattr``
with ``sched_runtime`` for ``SCHED_OTHER``; 0.1-100 ms, any thread may ask it for itself).
Otherwise it waits until the running thread's slice ends: by default 0.7 ms times
1 + log2(CPUs), 1.4 ms on two cores. A worker's event loop sleeps between requests and wakes
for each one, and again for each Redis reply; on a host whose cores Redis, a reload or another
process keep busy, every one of those wakes could wait out somebody's slice. A thread's slice
is inherited by the threads it starts: a worker asks for its request thread's before it starts
the snapshot watcher, which gets the same (``retriever.request_slice_us``; docs/BENCHMARKS.md,
session 13, measured it both ways).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

log = logging.getLogger(__name__)

_SCHED_ATTR_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
"""``sched_setattr`` and ``sched_getattr`` by machine (Linux)."""
_SETATTR, _GETATTR = 0, 1
_SCHED_OTHER = 0


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` (linux/sched/types.h), as far as ``SCHED_FLAG_UTIL_CLAMP``."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


def _sched_syscall(which: int, *args: object) -> None:
    """``sched_setattr`` (``which``: ``_SETATTR``) or ``sched_getattr`` (``_GETATTR``) with ``args``.

    Raises:
        OSError: not Linux on a known machine, or the kernel refused.
    """
    calls = _SCHED_ATTR_SYSCALLS.get(platform.machine()) if platform.system() == "Linux" else None
    if calls is None:
        raise OSError(f"no sched_setattr here ({platform.system()} {platform.machine()})")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(calls[which], *args):
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def thread_slice_us(tid: int = 0) -> int | None:
    """The time slice the kernel gives thread ``tid`` (0: the calling thread), in microseconds;
    ``None`` where it does not say (not Linux, a kernel before 6.12, another policy)."""
    attr = _SchedAttr()
    try:
        _sched_syscall(_GETATTR, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    except OSError:
        return None
    if attr.sched_policy != _SCHED_OTHER or attr.sched_runtime == 0:
        return None
    return attr.sched_runtime // 1000


def shorten_thread_slice(slice_us: int) -> int | None:
    """Ask for a time slice of ``slice_us`` for the calling thread (its niceness kept), so that
    it preempts threads with longer slices when it wakes (see the module doc).

    Returns:
        The slice in effect afterwards (the kernel clamps to 100 µs-100 ms), or ``None`` where
        the kernel has no per-thread slice; then nothing changed. Logged, never raised.
    """
    before = thread_slice_us()
    if before is None:
        log.info("the kernel sets no per-thread time slice here; the request thread keeps its own")
        return None
    attr = _SchedAttr(
        size=ctypes.sizeof(_SchedAttr),
        sched_policy=_SCHED_OTHER,
        sched_nice=os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
        sched_runtime=slice_us * 1000,
    )
    try:
        _sched_syscall(_SETATTR, 0, ctypes.byref(attr), 0)  # thread 0: the caller
    except OSError as exc:
        log.warning("cannot set the request thread's time slice: %s", exc)
        return None
    after = thread_slice_us()
    log.info("request thread's time slice: %s µs (was %d µs)", after, before)
    return after


def lower_thread_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness (Linux: ``setpriority`` on a thread id
    applies to that thread alone). Logged and ignored where it cannot be done."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as exc:
        log.warning("cannot lower the snapshot watcher's priority: %s", exc)
