"""The request thread's time slice and the watcher's priority, asked of the real kernel."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from retriever import thread_sched
from retriever.thread_sched import lower_thread_priority, shorten_thread_slice, thread_slice_us


def _on_a_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on a new thread (whose scheduling it may change), its result."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_a_thread_gets_the_slice_it_asks_for_and_keeps_its_niceness() -> None:
    if thread_slice_us() is None:
        pytest.skip("the kernel sets no per-thread time slice (Linux 6.12 and later)")
    default = thread_slice_us()

    def ask() -> tuple[int | None, int | None, int, int | None]:
        lower_thread_priority(3)
        got = shorten_thread_slice(250)
        tid = threading.get_native_id()
        return got, thread_slice_us(), os.getpriority(os.PRIO_PROCESS, tid), thread_slice_us(tid)

    nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert _on_a_thread(ask) == (250, 250, min(19, nice + 3), 250)
    assert thread_slice_us() == default  # the calling thread alone
    assert _on_a_thread(lambda: shorten_thread_slice(10)) == 100  # the kernel's least


def test_where_there_is_no_per_thread_slice_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thread_sched.platform, "machine", lambda: "s390x")
    assert thread_slice_us() is None
    assert _on_a_thread(lambda: shorten_thread_slice(250)) is None
