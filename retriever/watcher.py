"""Keeps a retriever process on the current snapshot version, swapping without a pause.

A background thread holds the reference to the :class:`~retriever.state.ServingState`
that request handlers read. It follows ``layout.current`` (the pointer the publisher moves):
woken by a notice on ``layout.channel`` and, in case a notice is missed (pub/sub is
fire-and-forget), by polling the pointer every ``poll_interval_s``. The notice's payload is
only a wake-up; the pointer is the truth, so a rollback (pointer moved back) is followed too.

When the pointer names another version, the watcher builds the new state off to the side:

* if the served version lies on the new version's chain (the usual case: the next delta, or
  a few deltas when notices were missed), it applies only the deltas after it;
* otherwise (a new full version, a rollback, the first load) it loads the whole chain.

A whole load (not the first one) waits for this host's *reload turn*, a short-lived Redis lock,
so that the worker processes of one host reload a new full version one after another rather
than all at once (each reload takes a core for seconds at 1M items; the others keep serving the
old version meanwhile). The request thread's share of the GIL during a build comes from the
worker's switch interval (``retriever.gil_switch_interval_ms``, set by the app); its share of
the CPU from the watcher thread's lower priority (``retriever.reload_nice``): most of a build is
C code with the GIL released, which the kernel then runs on the time requests leave. A full
load does not hand the new id tables the ids the old ones were asked about (an earlier version
did, 0.2-0.6 s of GIL-holding Python per worker and reload at 1M items): requests fill them
again at a few tens of microseconds per id the first time each is asked.

Then it publishes the new state with one attribute assignment. The state swapped out stays
with the watcher until no request holds it and is freed on the watcher thread (freeing a
1M-item index takes tens of milliseconds, which on a request's thread every request of the
worker would wait out). A failure (missing version, corrupt part, Redis down) is logged and
counted, and the old state keeps serving; a version that failed is retried after
``retry_failed_s``.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable

import redis
from prometheus_client import Counter, Gauge, Histogram

from retriever.malloc import huge_page_bytes
from retriever.parts import PartReader
from retriever.state import ServingState
from retriever.thread_sched import lower_thread_priority
from twotower.blobs import BlobError
from twotower.snapshots import SnapshotError, SnapshotStore

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = Gauge(
    "twotower_retriever_snapshot_version",
    "Snapshot version this retriever process serves (0: none yet).",
    multiprocess_mode="liveall",
)
SNAPSHOT_CREATED = Gauge(
    "twotower_retriever_snapshot_created_seconds",
    "Unix time at which the served snapshot version was written (freshness = now - this).",
    multiprocess_mode="liveall",
)
HUGE_PAGE_BYTES = Gauge(
    "twotower_retriever_huge_page_bytes",
    "Memory of this retriever process mapped by transparent huge pages after its last swap, its own "
    "and shared files' (retriever.index_huge_pages, retriever.parts_dir; -1: the kernel does not say).",
    multiprocess_mode="liveall",
)
SWAPS = Counter(
    "twotower_retriever_swaps_total",
    "Serving-state swaps; kind=delta applied deltas to the served state, kind=full loaded a whole chain.",
    ["kind"],
)
SWAP_SECONDS = Histogram(
    "twotower_retriever_swap_seconds",
    "Time to read and build a new serving state (the old one serves meanwhile).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
SNAPSHOT_ERRORS = Counter(
    "twotower_retriever_snapshot_errors_total",
    "Failed attempts to check or load a snapshot version (the previous state kept serving).",
)

SwapHook = Callable[[ServingState | None, ServingState], None]
"""Called with (the state the new one was derived from by deltas, or ``None`` when it was
loaded whole; the new state) before a swap."""

RELOAD_TURN_TTL_S = 120.0
"""A reload turn not released within this long (a crashed worker) lapses."""
RELOAD_TURN_MAX_WAIT_S = 90.0
"""Longest wait for the reload turn; then the worker reloads anyway."""
_RELEASE_TURN = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _refcounts(items: list[object]) -> list[int]:
    """``sys.getrefcount`` of each of ``items`` (counting the list's own reference)."""
    return [sys.getrefcount(item) for item in items]


_LISTED_ONLY = _refcounts([object()])[0]
"""What :func:`_refcounts` says of an object nothing but its list refers to (measured, not
assumed: it depends on how the interpreter counts the references of a loop and a call)."""

_EXPECTED_ERRORS = (SnapshotError, BlobError, redis.RedisError, ValueError, RuntimeError, OSError)


class SnapshotWatcher:
    """Follows the current snapshot version on a daemon thread; :attr:`state` is what to serve.

    Args:
        store: the snapshot store (its Redis client is used from the watcher thread only,
            plus a pub/sub connection from the same pool).
        poll_interval_s: how often the pointer is polled when no notice arrives.
        retry_failed_s: how long a version that failed to load is left alone.
        on_swap: called on the watcher thread with (old state, new state) just before the
            new state is published, e.g. to invalidate caches of what the new version changed;
            old is ``None`` unless the new state was derived from it by applying deltas (not
            for a full load, a rollback or the first load). An exception it raises is logged
            and does not stop the swap.
        stagger_reloads: take this host's reload turn before a whole (non-first) load.
        parts: reads the big parts of a full version (see :mod:`retriever.parts`; give every
            worker of a host one directory so that they decode a full version once per host);
            default: from Redis into memory.
        nice: added to the watcher thread's niceness when it starts (Linux threads have their
            own; elsewhere, or when the system refuses, it runs at the process's priority).
    """

    def __init__(
        self,
        store: SnapshotStore,
        poll_interval_s: float = 1.0,
        retry_failed_s: float = 10.0,
        on_swap: SwapHook | None = None,
        stagger_reloads: bool = True,
        parts: PartReader | None = None,
        nice: int = 0,
    ) -> None:
        self.store = store
        self.nice = nice
        self.parts = parts if parts is not None else PartReader()
        self.on_swap = on_swap
        self.stagger_reloads = stagger_reloads
        self._turn_key = f"{store.layout.prefix}:retriever:reload-turn:{socket.gethostname()}"
        self.poll_interval_s = poll_interval_s
        self.retry_failed_s = retry_failed_s
        self.state: ServingState | None = None
        """The state to serve; replaced by one assignment, never mutated. ``None`` before the first load."""
        self.errors = 0
        """Failed refreshes so far (also exported as a metric)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: tuple[int, float] | None = None
        self._last_error = ""
        self._retired: list[ServingState] = []
        """States swapped out and not freed yet (see :meth:`_release_retired`)."""

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start following in the background (returns at once; :attr:`state` stays ``None``
        until a version exists and has loaded)."""
        if self._thread is not None:
            raise RuntimeError("watcher already started")
        self._thread = threading.Thread(target=self._run, name="snapshot-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the thread to stop and wait for it (a load in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("snapshot watcher did not stop within %.1f s", timeout_s)
            self._thread = None

    def _run(self) -> None:
        if self.nice:
            lower_thread_priority(self.nice)
        pubsub = None
        while not self._stop.is_set():
            if pubsub is None:
                pubsub = self._subscribe()
            try:
                self.refresh()
            except Exception as exc:  # the thread must outlive any one failure, or the worker serves stale
                log.exception("snapshot refresh failed")
                self._note_error(f"snapshot refresh failed: {exc!r}")
            try:
                if pubsub is not None:
                    # any message (or the timeout) triggers a check of the pointer
                    pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll_interval_s)
                else:
                    self._stop.wait(self.poll_interval_s)
            except (redis.RedisError, OSError) as exc:
                log.warning("snapshot notice subscription lost (%s); polling until it is back", exc)
                _close(pubsub)
                pubsub = None
                self._stop.wait(self.poll_interval_s)
        _close(pubsub)

    def _subscribe(self) -> redis.client.PubSub | None:
        try:
            pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.store.layout.channel)
            return pubsub
        except (redis.RedisError, OSError) as exc:
            self._note_error(f"cannot subscribe to {self.store.layout.channel}: {exc}")
            return None

    # --- following --------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Check the pointer once and swap to its version if it differs from the served one.

        Returns:
            True if a new state was published. Never raises for snapshot or Redis failures
            (they are logged and counted).
        """
        self._release_retired()
        try:
            target = self.store.current_version()
        except redis.RedisError as exc:
            self._note_error(f"cannot read the current snapshot pointer: {exc}")
            return False
        state = self.state
        if target is None:
            if state is not None:  # Redis lost its data (or someone deleted the pointer)
                self._note_error("the current-version pointer is gone from Redis")
            return False
        if state is not None and state.version == target and self._still_stored(state):
            return False
        if self._failed is not None and self._failed[0] == target and time.monotonic() < self._failed[1]:
            return False
        started = time.perf_counter()
        try:
            new_state, kind = self._build(target, state)
        except _EXPECTED_ERRORS as exc:
            self._failed = (target, time.monotonic() + self.retry_failed_s)
            self._note_error(f"cannot load snapshot version {target}: {exc}")
            return False
        except Exception as exc:  # a bug, or memory short: the same wait, the traceback logged once
            self._failed = (target, time.monotonic() + self.retry_failed_s)
            self._note_error(f"cannot load snapshot version {target}: {exc!r}", traceback=True)
            return False
        elapsed = time.perf_counter() - started
        if self.on_swap is not None:
            try:
                self.on_swap(state if kind == "delta" else None, new_state)
            except Exception:
                log.exception("the swap hook failed; swapping anyway")
        self.state = new_state  # the swap: requests that already hold the old state finish with it
        if state is not None:
            self._retired.append(state)
        self._failed = None
        self._last_error = ""
        SWAPS.labels(kind=kind).inc()
        SWAP_SECONDS.observe(elapsed)
        SNAPSHOT_VERSION.set(new_state.version)
        SNAPSHOT_CREATED.set(new_state.created_ms / 1000.0)
        huge = huge_page_bytes()
        HUGE_PAGE_BYTES.set(-1 if huge is None else huge)
        log.info(
            "serving snapshot version %d (%s swap from %s in %.3f s, %d items, %d users)",
            new_state.version,
            kind,
            state.version if state else None,
            elapsed,
            new_state.n_items,
            len(new_state.user_rows),
        )
        return True

    def _release_retired(self) -> None:
        """Free, here on the watcher thread, the swapped-out states no request holds any more.

        Freeing a full version's state takes tens of milliseconds (Faiss frees the index: 23-35
        ms at 1M items). Left to Python, that happens on whichever thread drops the last
        reference, often a request that began before the swap, and then every request of the
        worker waits for it. So the watcher keeps each swapped-out state until a check finds no
        other reference to it (no request can take a new one: :attr:`state` points elsewhere),
        then drops it itself. Called at every refresh, i.e. at least every ``poll_interval_s``.
        """
        retired = self._retired
        self._retired = [old for old, n in zip(retired, _refcounts(retired), strict=True) if n > _LISTED_ONLY]

    def _still_stored(self, state: ServingState) -> bool:
        """Whether Redis still holds ``state.version`` as written when ``state`` was read (not
        another version of that number, written after Redis lost its data); when it cannot
        say (the meta is gone, Redis fails), yes: there is nothing better to serve."""
        try:
            created = self.store.redis.hget(self.store.layout.meta(state.version), "created_ms")
            return created is None or int(created) == state.created_ms
        except (redis.RedisError, ValueError):
            return True

    def _build(self, target: int, state: ServingState | None) -> tuple[ServingState, str]:
        chain = self.store.chain(target)
        if state is not None:
            at = [i for i, meta in enumerate(chain) if meta.version == state.version]
            # the served version, as written when it was read: a version of the same number
            # written after Redis lost its data is another one, and so is its chain
            if at and chain[at[0]].created_ms == state.created_ms:
                return state.extend(self.store, chain[at[0] + 1 :]), "delta"
        if state is None or not self.stagger_reloads:
            return ServingState.from_chain(self.store, chain, self.parts), "full"
        token = self._take_turn()
        try:
            new_state = ServingState.from_chain(self.store, chain, self.parts)
            # during the turn, so that no other worker of the host is reading a file meanwhile
            # (one that does anyway reads from Redis again)
            self.parts.keep_only(chain[:1])
            return new_state, "full"
        finally:
            if token is not None:
                self._release_turn(token)

    def _take_turn(self) -> str | None:
        """Wait for this host's reload turn; its token, or ``None`` when the wait timed out
        (or Redis failed: reloading then is better than serving an old version longer)."""
        token = uuid.uuid4().hex
        deadline = time.monotonic() + RELOAD_TURN_MAX_WAIT_S
        waited = False
        while not self._stop.is_set():
            try:
                if self.store.redis.set(self._turn_key, token, nx=True, px=int(RELOAD_TURN_TTL_S * 1000)):
                    if waited:
                        log.info("got the reload turn after waiting for another worker")
                    return token
            except redis.RedisError as exc:
                log.warning("cannot take the reload turn (%s); reloading without it", exc)
                return None
            if time.monotonic() >= deadline:
                log.warning("waited %.0f s for the reload turn; reloading without it", RELOAD_TURN_MAX_WAIT_S)
                return None
            waited = True
            self._stop.wait(0.05)
        return None

    def _release_turn(self, token: str) -> None:
        try:
            self.store.redis.eval(_RELEASE_TURN, 1, self._turn_key, token)
        except redis.RedisError as exc:  # it lapses after RELOAD_TURN_TTL_S
            log.warning("cannot release the reload turn: %s", exc)

    def _note_error(self, message: str, traceback: bool = False) -> None:
        """Count a failure; log it unless it is the one logged last (with the exception being
        handled when ``traceback``)."""
        self.errors += 1
        SNAPSHOT_ERRORS.inc()
        if message != self._last_error:  # the same failure every second is logged once
            log.warning(
                "%s; still serving version %s", message, self.state.version if self.state else None, exc_info=traceback
            )
            self._last_error = message
        else:
            log.debug("%s (again)", message)


def _close(pubsub: redis.client.PubSub | None) -> None:
    if pubsub is None:
        return
    try:
        pubsub.close()
    except (redis.RedisError, OSError) as exc:
        log.debug("closing the notice subscription failed: %s", exc)
