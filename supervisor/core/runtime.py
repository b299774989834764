"""The engine's bookkeeping beside the durable state: the dispatch queue, the timers, idle
workers, agent generations, heartbeats and the other maps a step consults. Pure: no I/O,
no clock reads; every time is a monotonic `now` passed in.

Every change goes through a method. While a step is open (`begin`), each change records
how to undo itself, so a step whose records could not be written is taken back whole
(`rollback`): timers it fired are armed again, tasks it took off the queue are queued
again, workers it took stay idle. Heartbeats are observations, not decisions: they are
kept even when a step is taken back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from supervisor.core.queue import DispatchQueue, Entry, Timers

Undo = Callable[[], None]
V = TypeVar("V")


class Runtime:
    """The loop's in-memory bookkeeping (see the module docstring)."""

    def __init__(self) -> None:
        self._queue = DispatchQueue()
        self._timers = Timers()
        self._idle: dict[str, None] = {}
        self._gen: dict[str, int] = {}
        self._heartbeat: dict[str, float] = {}
        self._up_since: dict[str, float] = {}
        self._start_failures: dict[str, int] = {}
        self._unresponsive_since: dict[str, float] = {}
        self._start_killed: dict[str, int] = {}
        self._parked_on: dict[str, str] = {}
        self._res_alerted: set[str] = set()
        self._blocked_ws: set[str] = set()
        self._dirty_ws: set[str] = set()
        self._queued_at: dict[str, float] = {}
        self._backoff_until: dict[str, float] = {}
        # Retention: workstreams whose archive is being written (and by whose cause), the
        # wall time the next one falls due, and whether that must be worked out again.
        self._archiving: dict[str, str] = {}
        self._archive_retry: dict[str, float] = {}  # ws -> wall time of the next try
        self._retention_at: float | None = None
        self._retention_stale = True
        self.counters: dict[str, int] = {}
        self.queue_waits: list[float] = []
        self.draining = False
        self._journal: list[Undo] | None = None

    # -- the undo journal --------------------------------------------------------------

    def begin(self) -> None:
        """Open a step: changes from now on can be taken back."""
        self._journal = []

    def mark(self) -> int:
        """A savepoint inside the open step."""
        return len(self._journal) if self._journal is not None else 0

    def rollback(self, mark: int = 0) -> None:
        """Undo every change made since `mark` (the start of the step by default)."""
        j = self._journal
        if j is None:
            return
        while len(j) > mark:
            j.pop()()

    def end(self) -> None:
        """Close the step: its changes stay."""
        self._journal = None

    def on_undo(self, fn: Undo) -> None:
        """Have `fn` run if the open step is taken back."""
        self._undo(fn)

    def _undo(self, fn: Undo) -> None:
        if self._journal is not None:
            self._journal.append(fn)

    def _set(self, d: dict[str, V], key: str, value: V) -> None:
        if self._journal is not None:
            if key in d:
                old = d[key]
                self._journal.append(lambda: d.__setitem__(key, old))
            else:
                self._journal.append(lambda: d.__delitem__(key))
        d[key] = value

    def _del(self, d: dict[str, V], key: str) -> None:
        if key in d:
            old = d.pop(key)
            self._undo(lambda: d.__setitem__(key, old))

    def _add(self, s: set[str], key: str) -> None:
        if key not in s:
            s.add(key)
            self._undo(lambda: s.discard(key))

    def _discard(self, s: set[str], key: str) -> None:
        if key in s:
            s.discard(key)
            self._undo(lambda: s.add(key))

    # -- idle workers ------------------------------------------------------------------

    def idle(self) -> Iterator[str]:
        return iter(self._idle)

    def has_idle(self) -> bool:
        return bool(self._idle)

    def is_idle(self, wid: str) -> bool:
        return wid in self._idle

    def set_idle(self, wid: str) -> None:
        self._set(self._idle, wid, None)

    def take_idle(self, wid: str) -> None:
        self._del(self._idle, wid)

    # -- agent generations, heartbeats, ages --------------------------------------------

    def generation(self, wid: str) -> int:
        return self._gen.get(wid, 0)

    def knows_generation(self, wid: str) -> bool:
        return wid in self._gen

    def set_generation(self, wid: str, gen: int) -> None:
        self._set(self._gen, wid, gen)

    def beat(self, wid: str, now: float) -> None:
        """A sign of life from the worker's agent (kept even if the step is taken back)."""
        self._heartbeat[wid] = now

    def expect_beat(self, wid: str, at: float) -> None:
        """Count the worker's silence from `at` (a spawn, possibly delayed)."""
        self._set(self._heartbeat, wid, at)

    def heartbeat_at(self, wid: str) -> float | None:
        return self._heartbeat.get(wid)

    def set_up_since(self, wid: str, now: float) -> None:
        self._set(self._up_since, wid, now)

    def up_since(self, wid: str) -> float | None:
        return self._up_since.get(wid)

    def start_failures(self, wid: str) -> int:
        return self._start_failures.get(wid, 0)

    def set_start_failures(self, wid: str, n: int | None) -> None:
        if n is None:
            self._del(self._start_failures, wid)
        else:
            self._set(self._start_failures, wid, n)

    def unresponsive_since(self, wid: str) -> float | None:
        return self._unresponsive_since.get(wid)

    def set_unresponsive_since(self, wid: str, now: float | None) -> None:
        if now is None:
            self._del(self._unresponsive_since, wid)
        else:
            self._set(self._unresponsive_since, wid, now)

    def start_killed(self, wid: str, restarts: int) -> bool:
        """The agent of start `restarts` of `wid` was already killed for its silence."""
        return self._start_killed.get(wid) == restarts

    def set_start_killed(self, wid: str, restarts: int) -> None:
        self._set(self._start_killed, wid, restarts)

    # -- timers ------------------------------------------------------------------------

    def arm(self, kind: str, key: str, when: float) -> None:
        old = self._timers.armed(kind, key)
        self._timers.arm(kind, key, when)
        self._undo(
            (lambda: self._timers.disarm(kind, key))
            if old is None
            else (lambda: self._timers.arm(kind, key, old))
        )

    def disarm(self, kind: str, key: str) -> None:
        old = self._timers.armed(kind, key)
        if old is not None:
            self._timers.disarm(kind, key)
            self._undo(lambda: self._timers.arm(kind, key, old))

    def armed(self, kind: str, key: str) -> float | None:
        return self._timers.armed(kind, key)

    def next_due(self) -> float | None:
        return self._timers.next_due()

    def pop_due(self, now: float) -> list[tuple[str, str]]:
        """Every due (kind, key), disarmed; a rollback arms them again."""
        due = self._timers.pop_due(now)
        if due:
            self._undo(lambda: self._rearm(due, now))
        return due

    def _rearm(self, due: list[tuple[str, str]], when: float) -> None:
        for kind, key in due:
            self._timers.arm(kind, key, when)

    # -- the dispatch queue ------------------------------------------------------------

    def push(self, priority: int, order: int, task_id: str) -> None:
        # No undo: an entry whose task is no longer queued is skipped when popped.
        self._queue.push(priority, order, task_id)

    def pop(self) -> Entry | None:
        entry = self._queue.pop()
        if entry is not None:
            self._undo(lambda: self._queue.push(-entry[0], entry[1], entry[2]))
        return entry

    def park(self, resource_id: str, entry: Entry) -> None:
        self._queue.park(resource_id, entry)
        self._undo(lambda: self._queue.unpark_entry(resource_id, entry))

    def park_ws(self, ws_id: str, entry: Entry) -> None:
        self._queue.park_ws(ws_id, entry)
        self._undo(lambda: self._queue.unpark_ws_entry(ws_id, entry))

    def unpark(self, resource_id: str) -> None:
        moved = self._queue.unpark(resource_id)
        if moved:
            # The entries stay in the heap too; a duplicate is skipped when popped.
            self._undo(lambda: self._queue.repark(resource_id, moved))

    def unpark_ws(self, ws_id: str) -> None:
        moved = self._queue.unpark_ws(ws_id)
        if moved:
            self._undo(lambda: self._queue.repark_ws(ws_id, moved))

    def waiting_on(self, resource_id: str) -> list[str]:
        return self._queue.waiting_on(resource_id)

    def parked_resources(self) -> Iterable[str]:
        return self._queue.parked_resources()

    def queue_length(self) -> int:
        return len(self._queue)

    # -- per-task and per-workstream marks ---------------------------------------------

    def parked_on(self, task_id: str) -> str | None:
        return self._parked_on.get(task_id)

    def set_parked_on(self, task_id: str, resource_id: str | None) -> None:
        if resource_id is None:
            self._del(self._parked_on, task_id)
        else:
            self._set(self._parked_on, task_id, resource_id)

    def resource_alerted(self, resource_id: str) -> bool:
        return resource_id in self._res_alerted

    def set_resource_alerted(self, resource_id: str, on: bool) -> None:
        if on:
            self._add(self._res_alerted, resource_id)
        else:
            self._discard(self._res_alerted, resource_id)

    def alerted_resources(self) -> list[str]:
        return list(self._res_alerted)

    def is_blocked(self, ws_id: str) -> bool:
        return ws_id in self._blocked_ws

    def block(self, ws_id: str) -> None:
        """No new dispatch in `ws_id` (a critical task failed for good)."""
        self._add(self._blocked_ws, ws_id)

    def unblock(self, ws_id: str) -> None:
        self._discard(self._blocked_ws, ws_id)
        self.unpark_ws(ws_id)

    def mark_dirty(self, ws_id: str) -> None:
        """`ws_id` needs a new checkpoint (no undo: an extra checkpoint is harmless)."""
        self._dirty_ws.add(ws_id)

    def has_dirty(self) -> bool:
        return bool(self._dirty_ws)

    def take_dirty(self) -> set[str]:
        out, self._dirty_ws = self._dirty_ws, set()
        return out

    def queued_at(self, task_id: str) -> float | None:
        return self._queued_at.get(task_id)

    def set_queued_at(self, task_id: str, now: float | None) -> None:
        if now is None:
            self._del(self._queued_at, task_id)
        else:
            self._set(self._queued_at, task_id, now)

    def backoff_until(self, task_id: str) -> float | None:
        return self._backoff_until.get(task_id)

    def set_backoff_until(self, task_id: str, when: float | None) -> None:
        if when is None:
            self._del(self._backoff_until, task_id)
        else:
            self._set(self._backoff_until, task_id, when)

    # -- retention -------------------------------------------------------------------

    def archiving(self, ws_id: str) -> str | None:
        """The cause of the archive being written for `ws_id`, None when there is none."""
        return self._archiving.get(ws_id)

    def set_archiving(self, ws_id: str, cause: str | None) -> None:
        if cause is None:
            self._del(self._archiving, ws_id)
        else:
            self._set(self._archiving, ws_id, cause)

    def archive_retry_at(self, ws_id: str) -> float | None:
        """After a failed archive: the wall time before which it is not tried again."""
        return self._archive_retry.get(ws_id)

    def set_archive_retry_at(self, ws_id: str, wall: float | None) -> None:
        if wall is None:
            self._del(self._archive_retry, ws_id)
        else:
            self._set(self._archive_retry, ws_id, wall)

    def retention_due(self, wall: float) -> bool:
        """Retention has something to look at: the workstreams changed, or the wall time
        of the next one due has come."""
        at = self._retention_at
        return self._retention_stale or (at is not None and wall >= at)

    def retention_changed(self) -> None:
        """A workstream moved (no undo: one more look is harmless)."""
        self._retention_stale = True

    def set_retention_at(self, wall: float | None) -> None:
        """Looked at: the next look is due at wall time `wall` (None: only on a change)."""
        self._retention_stale = False
        self._retention_at = wall

    def forget_tasks(self, ws_id: str, task_ids: Iterable[str]) -> None:
        """Workstream `ws_id` and its tasks left the state: nothing of them stays here
        (taken back whole with the step)."""
        ids = set(task_ids)
        self.set_archive_retry_at(ws_id, None)
        for tid in ids & self._parked_on.keys():
            self._del(self._parked_on, tid)
        for times in (self._queued_at, self._backoff_until):
            for tid in ids & times.keys():
                self._del(times, tid)
        self._discard(self._blocked_ws, ws_id)
        self._dirty_ws.discard(ws_id)
        for tid in ids:
            for kind in ("timeout", "backoff", "survivors", "queue_alert", "resource_alert"):
                self.disarm(kind, tid)
        undo = self._queue.forget(ids, ws_id)
        if undo is not None:
            self._undo(undo)

    # -- figures -----------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        c = self.counters
        c[name] = c.get(name, 0) + n
        self._undo(lambda: c.__setitem__(name, c[name] - n))

    def queue_wait(self, seconds: float) -> None:
        waits = self.queue_waits
        waits.append(seconds)
        if len(waits) > 10000:
            del waits[:5000]

    def set_draining(self) -> None:
        if not self.draining:
            self.draining = True
            self._undo(lambda: setattr(self, "draining", False))
