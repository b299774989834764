"""The dispatch queue and the timers of the engine. Pure: no I/O, no clock reads.

Queued tasks wait in a heap ordered by priority (higher first) then submission order
(FIFO). A task whose resource is full is parked on that resource and put back when the
resource frees up, so a scheduling step only touches what changed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

Entry = tuple[int, int, str]  # (-priority, order, task_id)


class DispatchQueue:
    """Queued task ids in dispatch order, with per-resource and per-workstream parking."""

    __slots__ = ("_heap", "_parked", "_parked_ws")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._parked: dict[str, list[Entry]] = {}
        self._parked_ws: dict[str, list[Entry]] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, priority: int, order: int, task_id: str) -> None:
        heapq.heappush(self._heap, (-priority, order, task_id))

    def pop(self) -> Entry | None:
        return heapq.heappop(self._heap) if self._heap else None

    def park(self, resource_id: str, entry: Entry) -> None:
        """Hold `entry` until `resource_id` frees a slot."""
        self._parked.setdefault(resource_id, []).append(entry)

    def park_ws(self, ws_id: str, entry: Entry) -> None:
        """Hold `entry` while its workstream does not dispatch (after a critical failure)."""
        self._parked_ws.setdefault(ws_id, []).append(entry)

    def unpark(self, resource_id: str) -> list[Entry]:
        """Put the entries parked on `resource_id` back in the queue; returns them."""
        moved = self._parked.pop(resource_id, [])
        for entry in moved:
            heapq.heappush(self._heap, entry)
        return moved

    def unpark_ws(self, ws_id: str) -> list[Entry]:
        moved = self._parked_ws.pop(ws_id, [])
        for entry in moved:
            heapq.heappush(self._heap, entry)
        return moved

    def unpark_entry(self, resource_id: str, entry: Entry) -> None:
        """Take back one `park` (the entry is not queued again)."""
        parked = self._parked.get(resource_id)
        if parked and entry in parked:
            parked.remove(entry)
            if not parked:
                del self._parked[resource_id]

    def unpark_ws_entry(self, ws_id: str, entry: Entry) -> None:
        parked = self._parked_ws.get(ws_id)
        if parked and entry in parked:
            parked.remove(entry)
            if not parked:
                del self._parked_ws[ws_id]

    def repark(self, resource_id: str, entries: list[Entry]) -> None:
        """Take back one `unpark`: the entries wait on the resource again. The copies left
        in the heap are harmless: a popped entry is checked against its task's state and
        its resources before anything is dispatched."""
        self._parked.setdefault(resource_id, []).extend(entries)

    def repark_ws(self, ws_id: str, entries: list[Entry]) -> None:
        self._parked_ws.setdefault(ws_id, []).extend(entries)

    def waiting_on(self, resource_id: str) -> list[str]:
        return [e[2] for e in self._parked.get(resource_id, ())]

    def parked_resources(self) -> Iterable[str]:
        return self._parked.keys()


# Stale heap entries tolerated beyond the armed ones before the heap is rebuilt.
STALE_SLACK = 1024


class Timers:
    """Deadlines keyed by (kind, key); re-arming replaces, and stale entries are skipped.

    A disarmed (or re-armed) deadline leaves its old entry in the heap until it would have
    come due. Behind one long deadline (an hour-long build's timeout) that is every
    deadline disarmed since, so once stale entries outnumber the armed ones (plus a
    slack) the heap is rebuilt from the armed ones: O(1) amortised per change, and the
    heap never holds more than twice what is armed (plus the slack)."""

    __slots__ = ("_armed", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[float, str, str]] = []
        self._armed: dict[tuple[str, str], float] = {}

    def __len__(self) -> int:
        """Entries in the heap, stale ones included (a figure for tests)."""
        return len(self._heap)

    def arm(self, kind: str, key: str, when: float) -> None:
        self._armed[(kind, key)] = when
        heapq.heappush(self._heap, (when, kind, key))
        self._compact()

    def disarm(self, kind: str, key: str) -> None:
        self._armed.pop((kind, key), None)
        self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._armed) + STALE_SLACK:
            self._heap = [(when, kind, key) for (kind, key), when in self._armed.items()]
            heapq.heapify(self._heap)

    def armed(self, kind: str, key: str) -> float | None:
        return self._armed.get((kind, key))

    def next_due(self) -> float | None:
        while self._heap:
            when, kind, key = self._heap[0]
            if self._armed.get((kind, key)) == when:
                return when
            heapq.heappop(self._heap)
        return None

    def pop_due(self, now: float) -> list[tuple[str, str]]:
        """Every (kind, key) whose deadline is at or before `now`, disarmed."""
        out: list[tuple[str, str]] = []
        while self._heap and self._heap[0][0] <= now:
            when, kind, key = heapq.heappop(self._heap)
            if self._armed.get((kind, key)) == when:
                del self._armed[(kind, key)]
                out.append((kind, key))
        return out
