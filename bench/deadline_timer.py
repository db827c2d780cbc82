"""Waking an asyncio loop at a given moment to within microseconds (a Linux ``timerfd``).

An event loop's own timers, asyncio's and uvloop's alike, end their wait in ``epoll_wait``,
whose timeout is whole milliseconds (rounded up), and uvloop keeps its clock in milliseconds
too: a sleep ends up to a millisecond or more after it was due. For the open-loop load
generator that lateness is added to every latency it reports (each counts from its scheduled
send time), and sends that should be evenly spaced go out bunched on millisecond ticks.

A ``timerfd`` armed for the moment becomes readable when the kernel's high-resolution timer
expires, and a readable file descriptor ends ``epoll_wait`` at once, whatever its timeout. So
:class:`DeadlineTimer` arms one and waits for it to be readable through the loop
(``add_reader``): the loop still serves every socket while it waits, and no core spins.
Where there is no ``timerfd`` (not Linux), it falls back to the loop's own timer
(:attr:`DeadlineTimer.kind` says which is in use).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import time

CLOCK_MONOTONIC = 1
"""The timer's clock. It is armed with a delay, not a time on that clock, so it needs only to
run at the same rate as ``time.perf_counter``."""
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "timerfd_create") and hasattr(libc, "timerfd_settime") else None


class DeadlineTimer:
    """Sleeps of one asyncio loop that end at their deadline (``time.perf_counter()`` seconds).

    One sleep at a time; :meth:`close` when done.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._fd = -1
        self._libc = _libc()
        if self._libc is not None:
            fd = self._libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                loop.add_reader(fd, self._expired)

    @property
    def kind(self) -> str:
        """``"timerfd"``, or ``"loop"`` for the loop's own (millisecond) timer."""
        return "timerfd" if self._fd >= 0 else "loop"

    def _arm(self, delay_s: float) -> None:
        assert self._libc is not None
        ns = max(1, round(delay_s * 1e9))  # an all-zero value would disarm it
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(ns // 1_000_000_000, ns % 1_000_000_000))
        if self._libc.timerfd_settime(self._fd, 0, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def _expired(self) -> None:
        try:
            os.read(self._fd, 8)  # the expiration count; reading it makes the fd unreadable again
        except BlockingIOError:
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def sleep_until(self, deadline: float) -> None:
        """Return at ``deadline`` (on ``time.perf_counter()``'s clock), at once if it has passed."""
        while (delay := deadline - time.perf_counter()) > 0:
            if self._fd < 0:
                await asyncio.sleep(delay)
                continue
            self._waiter = self._loop.create_future()
            self._arm(delay)
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Stop watching the timer and close it."""
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


__all__ = ["DeadlineTimer"]
