"""The dispatch queue and the timers of the engine. Pure: no I/O, no clock reads.

Queued tasks wait in a heap ordered by priority (higher first) then submission order
(FIFO). A task whose resource is full is parked on that resource and put back when the
resource frees up, so a scheduling step only touches what changed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

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

    def forget(self, task_ids: set[str], ws_id: str) -> Callable[[], None] | None:
        """Drop every entry of `task_ids` (heap, resource parking) and the parking of
        `ws_id`; returns what takes it back, or None when nothing was there."""
        heap, parked, parked_ws = self._heap, self._parked, self._parked_ws
        hit_heap = any(e[2] in task_ids for e in heap)
        hit_res = [r for r, es in parked.items() if any(e[2] in task_ids for e in es)]
        if not hit_heap and not hit_res and ws_id not in parked_ws:
            return None
        old_heap = list(heap)
        old_parked = {r: list(parked[r]) for r in hit_res}
        old_ws = parked_ws.pop(ws_id, None)
        if hit_heap:
            heap[:] = [e for e in heap if e[2] not in task_ids]
            heapq.heapify(heap)
        for r in hit_res:
            left = [e for e in parked[r] if e[2] not in task_ids]
            if left:
                parked[r] = left
            else:
                del parked[r]

        def undo() -> None:
            heap[:] = old_heap
            parked.update(old_parked)
            if old_ws is not None:
                parked_ws[ws_id] = old_ws

        return undo

    def waiting_on(self, resource_id: str) -> list[str]:
        return [e[2] for e in self._parked.get(resource_id, ())]

    def parked_resources(self) -> Iterable[str]:
        return self._parked.keys()


class Timers:
    """Deadlines keyed by (kind, key); re-arming replaces, and stale entries are skipped."""

    __slots__ = ("_armed", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[float, str, str]] = []
        self._armed: dict[tuple[str, str], float] = {}

    def arm(self, kind: str, key: str, when: float) -> None:
        self._armed[(kind, key)] = when
        heapq.heappush(self._heap, (when, kind, key))

    def disarm(self, kind: str, key: str) -> None:
        if self._armed.pop((kind, key), None) is not None:
            self._compact()

    def _compact(self) -> None:
        """Drop the heap's stale entries once they outnumber the armed ones: a timeout
        disarmed when its attempt ends long before it would fire (most of them) must not
        stay in memory for the whole timeout."""
        heap, armed = self._heap, self._armed
        if len(heap) > 2 * len(armed) + 1024:
            heap[:] = [e for e in heap if armed.get((e[1], e[2])) == e[0]]
            heapq.heapify(heap)

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
