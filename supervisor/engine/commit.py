"""Pipelined group commit: the loop appends each step's records and hands over the step's
effects and replies; this task makes the records durable (fdatasync, always in a worker
thread: one slow sync after fast ones must not freeze the loop) and then releases, in
order, the effects and replies that waited on them (the write-ahead rule). The loop goes
on deciding while a sync runs, so the next sync covers every step appended meanwhile,
and a slow disk does not stall heartbeats, the socket or the watchdog.

Records that nothing waits on (a pid learnt from Started) ride along with the next sync,
at most SYNC_LAG_S after the last one (this task keeps that timer). A failed fdatasync is
never retried: StoreFsyncError ends the task, and with it the daemon (the next start
recovers from what the log really holds).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from supervisor.core.effects import Effect
from supervisor.engine.call import Call
from supervisor.engine.ports import Durable

log = structlog.get_logger("orchd.engine")

# Longest a record that no effect waits on stays unsynced.
SYNC_LAG_S = 0.05


class GroupCommit:
    """See the module docstring; `run` is its service task."""

    def __init__(
        self,
        store: Durable,
        run_effect: Callable[[Effect], Awaitable[Any]],
        clock: Callable[[], float],
    ) -> None:
        self.store, self.run_effect, self.clock = store, run_effect, clock
        # (the seq that must be durable first, effects, replies), in step order.
        self._waiting: deque[tuple[int, list[Effect], list[Call]]] = deque()
        self._urgent = False
        self._kick = anyio.Event()
        self._progress = anyio.Event()
        self.last_sync = clock()
        self.sync_s = 0.0  # how long the last fdatasync took
        self.syncing = False  # an fdatasync is in its thread now
        # One thread syncs at a time: a sync covers everything appended before it began.
        self._syncer = anyio.CapacityLimiter(1)

    def submit(self, effects: list[Effect], calls: list[Call], *, urgent: bool) -> None:
        """A step is appended: release its effects and replies once it is durable."""
        if effects or calls:
            self._waiting.append((self.store.written_seq, effects, calls))
        self._urgent = self._urgent or urgent
        # Records nothing waits on start the lag timer of an idle commit task.
        if self._waiting or self._urgent or self.store.written_seq > self.store.synced_seq:
            self._kick.set()

    async def settle(self) -> None:
        """Wait until everything appended so far is durable and released."""
        target = self.store.written_seq
        while self.store.synced_seq < target or (self._waiting and self._waiting[0][0] <= target):
            self._urgent = True
            self._kick.set()
            progress = self._progress
            await progress.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self._next_round()
            self._kick = anyio.Event()
            store = self.store
            if store.written_seq > store.synced_seq and (self._urgent or self._waiting):
                self._urgent = False
                started = self.clock()
                self.syncing = True
                try:
                    await anyio.to_thread.run_sync(store.sync, limiter=self._syncer)
                finally:
                    self.syncing = False
                self.last_sync = self.clock()
                self.sync_s = self.last_sync - started
            synced = store.synced_seq
            while self._waiting and self._waiting[0][0] <= synced:
                _, effects, calls = self._waiting.popleft()
                for eff in effects:
                    await self._carry_out(eff)
                for call in calls:
                    call.finish()
            if self._waiting or self._urgent:
                self._kick.set()  # appended while this round ran: another round
            progress, self._progress = self._progress, anyio.Event()
            progress.set()

    async def _next_round(self) -> None:
        """Wait for a step to hand something over; records that nothing waits on are
        synced SYNC_LAG_S after the last sync at the latest."""
        store = self.store
        if store.written_seq > store.synced_seq and not (self._urgent or self._waiting):
            lag = self.last_sync + SYNC_LAG_S - self.clock()
            with anyio.move_on_after(max(0.0, lag)) as scope:
                await self._kick.wait()
            if scope.cancelled_caught:
                self._urgent = True
        else:
            await self._kick.wait()

    async def _carry_out(self, eff: Effect) -> None:
        try:
            await self.run_effect(eff)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.warning("effect_failed", effect=type(eff).__name__, error=str(exc))
        except Exception:
            log.exception("effect_failed", effect=type(eff).__name__)
