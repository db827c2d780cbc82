"""Event-time merge of several partitions, and the offsets that are safe to commit.

Records are held until the watermark passes them, then released in event-time order. The
watermark is the later of

* the oldest of the partitions' newest event times: every partition has shown a record at
  or after it, and a partition delivers in order, so nothing older can still come — in a busy
  stream this releases a record within milliseconds instead of after the allowance. The
  partitions counted are those seen and those announced with :meth:`expect` (the assigned
  ones): one that has delivered nothing yet leaves only the second rule;
* the newest event time seen minus the out-of-orderness allowance: the bound on how long a
  slow or idle partition can hold the others back.

A record older than one already released (a partition out of its own order, or later than
the allowance) is *late*: it is still released (never dropped) and counted.

Offsets: a partition's safe offset is its oldest record still held (or one past the last
record seen). Records of that partition released although they sit above the safe offset
are listed in :meth:`applied_above`, so that a restart from the safe offset skips them and
applies nothing twice.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

Partition = tuple[str, int]


class EventTimeMerger:
    """Bounded out-of-orderness reordering buffer.

    Args:
        allowance_ms: how far behind the newest event time a record may arrive and still be
            released in order.
    """

    def __init__(self, allowance_ms: int) -> None:
        self.allowance_ms = allowance_ms
        self._heap: list[tuple[int, int, Partition, int, Any]] = []
        self._tiebreak = itertools.count()
        self._held: dict[Partition, set[int]] = defaultdict(set)
        self._next: dict[Partition, int] = {}
        self._newest: dict[Partition, int | None] = {}
        """Per partition, the newest event time it delivered (None: nothing yet)."""
        self._released_above: dict[Partition, set[int]] = defaultdict(set)
        self._skip: dict[Partition, set[int]] = {}
        self.max_ts_ms = 0
        self.last_released_ts_ms = 0
        self.late = 0

    def __len__(self) -> int:
        return len(self._heap)

    def skip_on_replay(self, applied_above: dict[Partition, list[int]]) -> None:
        """Offsets already applied before a restart (from the checkpoint): never release them again.

        They stay listed in :meth:`applied_above` until the safe offset passes them, so that a
        checkpoint written before they are read again (or while an older record is held) keeps
        them, and a second restart skips them too."""
        self._skip = {tp: set(offs) for tp, offs in applied_above.items()}
        for tp, offs in applied_above.items():
            self._released_above[tp].update(offs)

    def push(self, tp: Partition, offset: int, ts_ms: int, value: Any) -> bool:
        """Hold a record; False if it was applied before the restart and is skipped."""
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)
        newest = self._newest.get(tp)
        self._newest[tp] = ts_ms if newest is None else max(newest, ts_ms)
        skip = self._skip.get(tp)
        if skip and offset in skip:
            skip.discard(offset)
            return False
        heapq.heappush(self._heap, (ts_ms, next(self._tiebreak), tp, offset, value))
        self._held[tp].add(offset)
        self.max_ts_ms = max(self.max_ts_ms, ts_ms)
        return True

    def mark_done(self, tp: Partition, offset: int) -> None:
        """A record handled without the buffer (e.g. dead-lettered): its offset advances, and it
        is listed as applied above the safe offset while an older record is held, so that a
        restart does not handle it again."""
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)
        if self._held.get(tp):
            self._released_above[tp].add(offset)

    def replayed(self, tp: Partition, offset: int) -> bool:
        """Whether a record was handled before the restart (:meth:`skip_on_replay`): then it is
        passed over, before anything is done with it (a dead letter is not sent twice)."""
        skip = self._skip.get(tp)
        if not skip or offset not in skip:
            return False
        skip.discard(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)
        return True

    def pop_ready(self, force: bool = False) -> list[tuple[Partition, int, Any]]:
        """Release, in event-time order, every record at or below the watermark (all if ``force``)."""
        watermark = self.watermark()
        out = []
        while self._heap and (force or self._heap[0][0] <= watermark):
            ts, _, tp, offset, value = heapq.heappop(self._heap)
            if ts < self.last_released_ts_ms:
                self.late += 1
            else:
                self.last_released_ts_ms = ts
            self._held[tp].discard(offset)
            self._released_above[tp].add(offset)
            out.append((tp, offset, value))
        return out

    def expect(self, partitions: Iterable[Partition]) -> None:
        """Partitions that will deliver records: until each has, none is known to be past any time."""
        for tp in partitions:
            self._newest.setdefault(tp, None)

    def watermark(self) -> int:
        """Event time up to which records are released (see the module docstring)."""
        bound = self.max_ts_ms - self.allowance_ms
        newest = self._newest.values()
        if not newest or None in newest:
            return bound
        return max(bound, min(t for t in newest if t is not None))

    def safe_offsets(self) -> dict[Partition, int]:
        """Per partition, the offset a restart must resume from."""
        return {tp: min(self._held[tp]) if self._held.get(tp) else nxt for tp, nxt in self._next.items()}

    def applied_above(self) -> dict[Partition, list[int]]:
        """Per partition, released offsets at or above its safe offset (pruned of older ones)."""
        safe = self.safe_offsets()
        out = {}
        for tp, offs in self._released_above.items():
            keep = {o for o in offs if o >= safe.get(tp, 0)}
            self._released_above[tp] = keep
            if keep:
                out[tp] = sorted(keep)
        return out
