"""The dispatch queue and the timers of the engine. Pure: no I/O, no clock reads.

Queued tasks wait in heaps ordered by priority (higher first) then submission order
(FIFO), one heap per *lane*: the selector of where they may run (core/placement.py; ""
for any host). Dispatch looks only at the lanes that a worker free now can serve, so
tasks bound for a busy host are not touched while other hosts take work. A task whose
resource is full is parked on that resource and put back (into its lane) when the
resource frees up, so a scheduling step only touches what changed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

Entry = tuple[int, int, str, str]  # (-priority, order, task_id, lane)


class DispatchQueue:
    """Queued task ids in dispatch order by lane, with per-resource and per-workstream
    parking."""

    __slots__ = ("_lanes", "_parked", "_parked_ws")

    def __init__(self) -> None:
        self._lanes: dict[str, list[Entry]] = {}
        self._parked: dict[str, list[Entry]] = {}
        self._parked_ws: dict[str, list[Entry]] = {}

    def __len__(self) -> int:
        return sum(len(h) for h in self._lanes.values())

    def push(self, priority: int, order: int, task_id: str, lane: str = "") -> None:
        self._push((-priority, order, task_id, lane))

    def _push(self, entry: Entry) -> None:
        heap = self._lanes.get(entry[3])
        if heap is None:
            heap = self._lanes[entry[3]] = []
        heapq.heappush(heap, entry)

    def pop(self, lane: str = "") -> Entry | None:
        heap = self._lanes.get(lane)
        if not heap:
            return None
        entry = heapq.heappop(heap)
        if not heap:
            del self._lanes[lane]
        return entry

    def lanes(self) -> list[str]:
        """The lanes that hold entries (stale ones included)."""
        return list(self._lanes)

    def only_any(self) -> bool:
        """Every entry is in the lane of tasks that may run anywhere (the common case)."""
        lanes = self._lanes
        return not lanes or (len(lanes) == 1 and "" in lanes)

    def peek(self, lane: str) -> Entry | None:
        heap = self._lanes.get(lane)
        return heap[0] if heap else None

    def entries(self, lane: str) -> list[Entry]:
        """The entries of `lane`, in no particular order (for reports, not dispatch)."""
        return list(self._lanes.get(lane, ()))

    def park(self, resource_id: str, entry: Entry) -> None:
        """Hold `entry` until `resource_id` frees a slot. The entries parked on a key are
        a heap too: `unpark_one` gives back the first in dispatch order."""
        heapq.heappush(self._parked.setdefault(resource_id, []), entry)

    def park_ws(self, ws_id: str, entry: Entry) -> None:
        """Hold `entry` while its workstream does not dispatch (after a critical failure)."""
        self._parked_ws.setdefault(ws_id, []).append(entry)

    def unpark(self, resource_id: str) -> list[Entry]:
        """Put the entries parked on `resource_id` back in the queue; returns them."""
        moved = self._parked.pop(resource_id, [])
        for entry in moved:
            self._push(entry)
        return moved

    def unpark_one(self, resource_id: str) -> Entry | None:
        """Put the first entry parked on `resource_id` back in the queue; returns it."""
        parked = self._parked.get(resource_id)
        if not parked:
            return None
        entry = heapq.heappop(parked)
        if not parked:
            del self._parked[resource_id]
        self._push(entry)
        return entry

    def unpark_ws(self, ws_id: str) -> list[Entry]:
        moved = self._parked_ws.pop(ws_id, [])
        for entry in moved:
            self._push(entry)
        return moved

    def unpark_entry(self, resource_id: str, entry: Entry) -> None:
        """Take back one `park` (the entry is not queued again)."""
        parked = self._parked.get(resource_id)
        if parked and entry in parked:
            parked.remove(entry)
            heapq.heapify(parked)
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
        parked = self._parked.setdefault(resource_id, [])
        parked.extend(entries)
        heapq.heapify(parked)

    def repark_ws(self, ws_id: str, entries: list[Entry]) -> None:
        self._parked_ws.setdefault(ws_id, []).extend(entries)

    def forget(self, task_ids: set[str], ws_id: str) -> Callable[[], None] | None:
        """Drop every entry of `task_ids` (lanes, resource parking) and the parking of
        `ws_id`; returns what takes it back, or None when nothing was there."""
        lanes, parked, parked_ws = self._lanes, self._parked, self._parked_ws
        hit_lanes = [k for k, h in lanes.items() if any(e[2] in task_ids for e in h)]
        hit_res = [r for r, es in parked.items() if any(e[2] in task_ids for e in es)]
        if not hit_lanes and not hit_res and ws_id not in parked_ws:
            return None
        old_lanes = {k: list(lanes[k]) for k in hit_lanes}
        old_parked = {r: list(parked[r]) for r in hit_res}
        old_ws = parked_ws.pop(ws_id, None)
        for table, keys in ((lanes, hit_lanes), (parked, hit_res)):
            for k in keys:
                left = [e for e in table[k] if e[2] not in task_ids]
                if left:
                    heapq.heapify(left)
                    table[k] = left
                else:
                    del table[k]

        def undo() -> None:
            lanes.update(old_lanes)
            parked.update(old_parked)
            if old_ws is not None:
                parked_ws[ws_id] = old_ws

        return undo

    def waiting_on(self, resource_id: str) -> list[str]:
        """The task ids parked on `resource_id`, in dispatch order."""
        return [e[2] for e in sorted(self._parked.get(resource_id, ()))]

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
